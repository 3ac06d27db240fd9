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
import subprocess
import sys
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the project's flat folder of modules

import toy  # noqa: E402

DEFAULT_WORLD = os.path.join("out", "toy")  # where python toy.py writes the world and its backbones


def parser(doc):
    """An experiment's command line: --small, --world, --out, --seeds. Add the experiment's own options to it."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true",
                   help="the CI size: a small world (built once in OUT/world unless --world is given) and a few "
                        "steps per variant; the numbers say only that the wiring runs")
    p.add_argument("--world", default="", help=f"a folder with the toy's data/ and backbones/ (default: "
                                               f"{DEFAULT_WORLD}, or OUT/world with --small)")
    p.add_argument("--out", default="", help="where each variant's stages and the results go (default: "
                                             "out/experiments/NAME, NAME_small with --small)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="train.py --seed of each run (default: the "
                                                                      "experiment's)")
    return p


def setup(args, name):
    """-> the ToyConfig every variant starts from (its world, its size). Fills args.out. A missing world is a one-line
    error that says how to build it."""
    args.out = args.out or os.path.join("out", "experiments", name + ("_small" if args.small else ""))
    base = toy.ToyConfig.small() if args.small else toy.ToyConfig()
    world = args.world or (os.path.join(args.out, "world") if args.small else DEFAULT_WORLD)
    manifest = os.path.join(world, "backbones", "nextgpt.json")
    if not os.path.isfile(manifest):
        if not args.small or args.world:
            sys.exit(f"experiments/{name}.py: no toy world in {world} ({manifest} is missing): build it with "
                     f"`python toy.py --out={world}` (about 50 minutes on 2 cores), pass --world=DIR, or run --small")
        print(f"building the small world in {world} (once)", flush=True)
        toy.main([f"--out={world}", "--small"])
    return replace(base, world=world)


def world_variant(base, args, name, **config):
    """A copy of base's world whose model config differs in the given NextGPTConfig fields (e.g.
    signal_tokens={"image": 1, ...}, group_tokens=[16, 8]): OUT/world_NAME, its data/ and every backbone file linked,
    only backbones/nextgpt.json rewritten. -> base with world= that folder."""
    src = base.world
    dst = os.path.join(args.out, f"world_{name}")
    os.makedirs(os.path.join(dst, "backbones"), exist_ok=True)
    links = [("data", "data")] + [(os.path.join("backbones", f), os.path.join("backbones", f))
                                  for f in os.listdir(os.path.join(src, "backbones")) if f != "nextgpt.json"]
    for a, b in links:
        if not os.path.lexists(os.path.join(dst, b)):
            os.symlink(os.path.abspath(os.path.join(src, a)), os.path.join(dst, b))
    with open(os.path.join(src, "backbones", "nextgpt.json")) as f:
        manifest = json.load(f)
    unknown = set(config) - set(manifest["config"])
    if unknown:
        raise ValueError(f"world_variant: {sorted(unknown)} are not NextGPTConfig fields")
    manifest["config"].update(config)
    with open(os.path.join(dst, "backbones", "nextgpt.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return replace(base, world=dst)


def variant(base, args, name, seed, **fields):
    """The ToyConfig of one run: its own out folder (OUT/name/sSEED), train.py --seed=seed, fields over base."""
    return replace(base, out=os.path.join(args.out, name, f"s{seed}"), seed=seed, **fields)


def mean_spread(values):
    """'mean ± sample standard deviation' of a list of numbers (± 0 for one)."""
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def table(rows, columns, fmt="{:.2f}"):
    """rows: {variant: {column: [number per seed]}} -> a markdown table of mean ± spread (n seeds)."""
    lines = ["| variant | " + " | ".join(columns) + " |", "| --- " * (len(columns) + 1) + "|"]
    for name, cols in rows.items():
        cells = []
        for c in columns:
            m, sd = mean_spread(cols[c])
            cells.append(f"{fmt.format(m)} ± {fmt.format(sd)}" if len(cols[c]) > 1 else fmt.format(m))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine():
    try:
        import torch
        threads = torch.get_num_threads()
        version = torch.__version__
    except ImportError:  # pragma: no cover
        threads, version = None, None
    return f"{platform.machine()} {os.cpu_count()} cores ({threads} torch threads), {platform.system()}, " \
           f"python {platform.python_version()}, torch {version}"


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(args, name, rows, columns, fmt="{:.2f}", notes=""):
    """Print the table and write OUT/NAME.json: the command, date, commit, machine, and every number per seed."""
    text = table(rows, columns, fmt)
    record = {"experiment": name, "command": "python " + " ".join([f"experiments/{name}.py"] + sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "commit": commit(), "machine": machine(), "small": args.small, "seeds": args.seeds,
              "columns": columns, "rows": rows, "table": text, "notes": notes}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print(f"\n{record['command']}  ({record['date']}, commit {record['commit']}, {record['machine']})\n\n{text}")
    if notes:
        print("\n" + notes)
    print(f"\nnumbers in {path}")
    return record
