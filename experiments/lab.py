"""
What every experiment in this folder shares: its command line, the toy world it runs on, and how it reports.

An experiment is one file: it trains its variants on the toy world (toy.py, train.py; nothing copied from them), at
one budget and the same seeds for every variant, prints a markdown table and writes the numbers as JSON beside the
command, date, commit and machine that made them. Copy one to start your own:

    python experiments/grouping.py               # the default size, on the world python toy.py builds (out/toy)
    python experiments/grouping.py --small       # every variant's wiring in a minute or two (what CI runs)
    python experiments/grouping.py --world=DIR   # another world (its data/ and backbones/)
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the project's flat folder of modules

import torch  # noqa: E402

import cli  # noqa: E402
import toy  # noqa: E402
import train  # noqa: E402

DEFAULT_WORLD = os.path.join("out", "toy")  # where python toy.py writes the world and its backbones
SMALL_WORLD = os.path.join("out", "experiments", "world_small")  # --small's, built once and shared by every file


def positive(text):
    """argparse type: a whole number above 0 (a count of steps, prompts or epochs)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return value


def parser(doc):
    """An experiment's command line: --small, --world, --out, --seeds. Add the experiment's own options to it, then
    read it with parse() (which takes --a_b as --a-b)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true",
                   help=f"the CI size: a small world (built once in {SMALL_WORLD} unless --world is given) and a "
                        "few steps per variant; the numbers say only that the wiring runs")
    p.add_argument("--world", default="", help=f"a folder with the toy's data/ and backbones/ (default: "
                                               f"{DEFAULT_WORLD}, or {SMALL_WORLD} with --small)")
    p.add_argument("--out", default="", help="where each variant's stages and the results go (default: "
                                             "out/experiments/NAME, NAME_small with --small)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="train.py --seed of each run (default: the "
                                                                      "experiment's)")
    return p


def parse(p, argv=None):
    return p.parse_args(cli.underscores_to_dashes(sys.argv[1:] if argv is None else argv))


def setup(args, name, seeds, small_seeds=(0,)):
    """-> the ToyConfig every variant starts from: its world, its size, out = args.out. Fills args.out and args.seeds
    (seeds, or small_seeds with --small, unless given). A missing world is a one-line error that says how to build
    it. What OUT caches from another world (train.py's features, linked worlds) is removed."""
    args.out = args.out or os.path.join("out", "experiments", name + ("_small" if args.small else ""))
    args.seeds = args.seeds or list(small_seeds if args.small else seeds)
    args.t0, args.commit = time.time(), commit()  # the code as it starts: the tree may change while it runs
    base = toy.ToyConfig.small() if args.small else toy.ToyConfig()
    torch.set_num_threads(base.threads)  # as toy.py: one thread, which on shared cores beats two
    world = args.world or (SMALL_WORLD if args.small else DEFAULT_WORLD)
    manifest = os.path.join(world, "backbones", "nextgpt.json")
    if not os.path.isfile(manifest):
        if not args.small or args.world:
            sys.exit(f"experiments/{name}.py: no toy world in {world} ({manifest} is missing): build it with "
                     f"`python toy.py --out={world}` (about 55 minutes on 2 cores), pass --world=DIR, or run --small")
        print(f"building the small world in {world} (once)", flush=True)
        toy.main([f"--out={world}", "--small"])
    forget_other_worlds(args.out, world)
    return replace(base, world=world, out=args.out)


def forget_other_worlds(out, world):
    """train.py --prepare keeps the features it finds (keyed by file name), so OUT's cache of another world, or of
    this one before its backbones were retrained, would be read as this one's: OUT/world.json records which world
    (its path, each backbone file's size and time) OUT's caches come from, and a change empties them."""
    stamp = {"world": os.path.abspath(world), "backbones": {}}
    for root, _, names in os.walk(os.path.join(world, "backbones")):
        for f in sorted(names):
            st = os.stat(os.path.join(root, f))
            stamp["backbones"][os.path.relpath(os.path.join(root, f), world)] = [st.st_size, st.st_mtime]
    path = os.path.join(out, "world.json")
    if os.path.isfile(path) and json.load(open(path)) != stamp:
        print(f"{out} was made on another world (or older backbones): its caches go", flush=True)
        for f in os.listdir(out):
            if f == "features" or f.startswith("world_"):
                shutil.rmtree(os.path.join(out, f), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(stamp, f)


def features(args):
    """The train.py argument every run of an experiment shares: one folder of ImageBind features and caption
    embeddings (they depend on the world's backbones only, not on what the variants change)."""
    return f"--features_dir={os.path.join(args.out, 'features')}"


def prepare(cfg, order, extra):
    """train.py --prepare of every stage in order, before any run is timed, so no variant's seconds pay for it."""
    for args in toy.stage_commands(cfg, order, extra):
        train.main(["--prepare"] + [a for a in args if not a.startswith("--delta")])


def world_files(world):
    """{modality: [(path, caption)]} of the world's stage-1 data files (cc3m.json, webvid.json, audiocap.json), as
    toy.write_world returns them: what toy's backbones train on."""
    d = os.path.join(world, "data")
    out = {}
    for m, name in (("image", "cc3m.json"), ("video", "webvid.json"), ("audio", "audiocap.json")):
        with open(os.path.join(d, name)) as f:
            out[m] = [(os.path.join(d, r[f"{m}_name"]), r["caption"]) for r in json.load(f)]
    return out


def link_world(src, dst, skip=()):
    """dst: src's data/ and every backbone file linked (made anew, so a changed src is followed), but for the
    backbones entries in skip, which the caller writes."""
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(os.path.join(dst, "backbones"))
    os.symlink(os.path.abspath(os.path.join(src, "data")), os.path.join(dst, "data"))
    for f in os.listdir(os.path.join(src, "backbones")):
        if f not in skip:
            os.symlink(os.path.abspath(os.path.join(src, "backbones", f)), os.path.join(dst, "backbones", f))
    return dst


def world_variant(base, args, name, **config):
    """A copy of base's world whose model config differs in the given NextGPTConfig fields (e.g.
    signal_tokens={"image": 1, ...}, group_tokens=[16, 8]): OUT/world_NAME, its data/ and every backbone file linked,
    only backbones/nextgpt.json rewritten. -> base with world= that folder."""
    with open(os.path.join(base.world, "backbones", "nextgpt.json")) as f:
        manifest = json.load(f)
    unknown = set(config) - set(manifest["config"])
    if unknown:
        raise ValueError(f"world_variant: {sorted(unknown)} are not NextGPTConfig fields")
    manifest["config"].update(config)
    dst = link_world(base.world, os.path.join(args.out, f"world_{slug(name)}"), skip=("nextgpt.json",))
    with open(os.path.join(dst, "backbones", "nextgpt.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return replace(base, world=dst)


def variant(base, args, name, seed, **fields):
    """The ToyConfig of one run: its own out folder (OUT/<name as a file name>/sSEED), train.py --seed=seed, fields
    over base."""
    return replace(base, out=os.path.join(args.out, slug(name), f"s{seed}"), seed=seed, **fields)


def slug(name):
    """A variant's name as a file name: "group, 8 tokens" -> "group__8_tokens"."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def add(rows, name, row):
    """rows[name][column] gets row's numbers, one per seed."""
    for column, value in row.items():
        rows.setdefault(name, {}).setdefault(column, []).append(float(value))


def mean_spread(values):
    """-> (mean, sample standard deviation) of a list of numbers (0 for one)."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def table(rows, columns, fmt="{:.2f}"):
    """rows: {variant: {column: [number per seed]}} -> a markdown table of the mean ± the spread over seeds."""
    lines = ["| variant | " + " | ".join(columns) + " |", "| --- " * (len(columns) + 1) + "|"]
    for name, cols in rows.items():
        cells = []
        for c in columns:
            m, sd = mean_spread(cols[c])
            cells.append(f"{fmt.format(m)} ± {fmt.format(sd)}" if len(cols[c]) > 1 else fmt.format(m))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine():
    return f"{platform.machine()} {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), " \
           f"{platform.system()}, python {platform.python_version()}, torch {torch.__version__}"


def commit():
    """The commit the code ran from, '-dirty' if the working tree differed from it."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(args, name, rows, columns, fmt="{:.2f}", notes=""):
    """Print the table and write OUT/NAME.json: the command, date, commit, machine, seconds, every number per seed."""
    text = table(rows, columns, fmt)
    seconds = round(time.time() - args.t0)
    record = {"experiment": name, "command": shlex.join(["python", f"experiments/{name}.py", *sys.argv[1:]]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": args.commit, "machine": machine(), "seconds": seconds, "small": args.small,
              "seeds": args.seeds, "world": args.world or (SMALL_WORLD if args.small else DEFAULT_WORLD),
              "columns": columns, "rows": rows, "table": text, "notes": notes}
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"\n{record['command']}  ({record['date']}, commit {record['commit']}, {record['machine']}, "
          f"{seconds} s)\n\n{text}")
    if notes:
        print("\n" + notes)
    print(f"\nnumbers in {os.path.join(args.out, name + '.json')}")
    return record
