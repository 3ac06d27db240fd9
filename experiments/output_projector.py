"""
The decoding side's bottleneck on the toy: how wide must the output projector be to carry a two-object caption?

The output projector (the legacy TextFcLayer: signal-token hidden states -> a transformer whose decoder reads 77
learned queries -> the decoder's text conditioning, nextgpt.OutputProjector) is at toy size 128 wide with two encoder
and two decoder layers (toy.toy_config; the official one is 512 wide with 4 + 4). `python toy.py --eval --bypass`
tells its misses from the decoders': it draws each output a second time, from the same noise, from the decoder's own
text embedding of the reply's caption. This experiment trains the projector at half that width and depth and at the
toy's, on one world, and scores what it drives:

    narrow       proj_hidden 64, proj_layers 1
    wider        proj_hidden 128, proj_layers 2 (the toy's)

Each variant's world is a copy of the given one whose nextgpt.json says its two fields (lab.world_variant).
Each variant runs the three stages: stage 1 as the recipe's (it trains the input projection only, but a checkpoint
holds every projector, so each variant has its own), stage 2 as the recipe's (4 epochs, the alignment and the latent
denoising losses) and a stage 3 of 3 epochs (the recipe's 12 would not fit the hour twice;
experiments/instruction_tuning.py does the same). The variants differ only in those two config fields: the same data,
seeds, learning rates, batch, steps and held-out prompts. Scored with toy.evaluate on the generation tasks whose
misses the output projection makes (accuracy, 24 prompts each), and each variant's stage-2 and stage-3 seconds.

    python experiments/output_projector.py           # one seed, about 45 minutes on 2 cores
    python experiments/output_projector.py --small   # the wiring: a few steps a stage, one prompt a task

Time at the default size: per variant stage 1 about 225 s, stage 2 about 600 s (its denoising runs the image, video
and audio UNets), stage 3 about 215 s (1,647 steps at 0.13 s) and about 250 s of eval: about 45 minutes.
"""

import json
import os
from dataclasses import replace

import lab

import toy

NAME = "output_projector"
VARIANTS = {"narrow": dict(proj_hidden=64, proj_layers=1), "wider": dict(proj_hidden=128, proj_layers=2)}
TASKS = ["text -> image", "text -> two-object image", "text -> video", "text -> video + image"]
SMALL_STEPS = {1: [], 2: ["--max_steps=8"], 3: ["--max_steps=24"]}  # --small: stage 2's denoising is the slow step


def main():
    args = lab.parse(lab.parser(__doc__))
    base = lab.setup(args, NAME, seeds=[0])
    e1, e2, _ = base.stage_epochs
    base = replace(base, stage_epochs=(1, 1, 1), eval_n=1) if args.small else replace(base, stage_epochs=(e1, e2, 3))
    caps = SMALL_STEPS if args.small else {1: [], 2: [], 3: []}
    more = {stage: [lab.features(args)] + caps[stage] for stage in caps}  # one features folder for every run
    lab.prepare(base, (1, 2, 3), more)  # before any run is timed
    worlds = {name: lab.world_variant(base, args, name, **fields) for name, fields in VARIANTS.items()}
    rows = {}
    for seed in args.seeds:
        for name, world in worlds.items():
            cfg = lab.variant(world, args, name, seed)
            losses = toy.run_stages(cfg, order=(1, 2, 3), extra=more)
            acc = toy.evaluate(cfg, toy.latest(cfg, 3), tasks=TASKS)
            with open(os.path.join(cfg.out, "eval.json")) as f:
                parts = json.load(f)["parts"]  # the two-object scene's objects one at a time
            row = {**acc, "two-object: objects right": parts["text -> two-object image"],
                   "stage 2 s": losses[2]["seconds"], "stage 3 s": losses[3]["seconds"]}
            lab.add(rows, name, row)
            print(f"{name} seed {seed}: {row}", flush=True)
    columns = [*TASKS, "two-object: objects right", "stage 2 s", "stage 3 s"]
    notes = (f"Output projector {VARIANTS}; stage epochs {base.stage_epochs}; "
             f"{base.eval_n} held-out prompts per task, {base.sample_steps} DDIM steps, guidance {base.guidance} "
             f"(video {base.video_guidance}); seeds {args.seeds}; world {base.world}.")
    lab.report(args, NAME, rows, columns, notes=notes)


if __name__ == "__main__":
    main()
