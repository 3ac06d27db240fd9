"""
The decoding side's bottleneck on the toy: how wide must the output projector be to carry a two-object caption?

The output projector (the legacy TextFcLayer: signal-token hidden states -> a transformer whose decoder reads 77
learned queries -> the decoder's text conditioning, nextgpt.OutputProjector) is at toy size 128 wide with four encoder
and four decoder layers for images and videos, 64 wide with one and one for sounds (toy.toy_config; the official one
is 512 wide with 4 + 4). `python toy.py --eval --bypass` tells its misses from the decoders': it draws each output a
second time, from the same noise, from the decoder's own text embedding of the reply's caption. This experiment
trains the projectors at 64 wide with 1 + 1 layers, at 128 with 2 + 2, at that with the audio one at 64 and 1 + 1,
and with the picture ones at the official depth (the toy's), on one world, and scores what they drive:

    narrow                proj_hidden 64, proj_layers 1
    wider                 proj_hidden 128, proj_layers 2
    wider, audio narrow   the image and video projectors 128 wide with 2 + 2 layers, the audio one 64 with 1 + 1
    deeper, audio narrow  the image and video projectors 128 wide with 4 + 4 layers (the official depth), the
                          audio one 64 with 1 + 1 (the toy's): what still fits the shipped checkpoint's 25 MB in fp16

Each variant's world is a copy of the given one whose nextgpt.json says its two fields (lab.world_variant).
Each variant runs the three stages: stage 1 as the recipe's (it trains the input projection only, but a checkpoint
holds every projector, so each variant has its own), stage 2 as the recipe's (4 epochs, the alignment and the latent
denoising losses) and a stage 3 of 3 epochs (the recipe's 12 would not fit the hour twice;
experiments/instruction_tuning.py does the same; --stage3-epochs=12 runs the recipe's). The variants differ only in
those two config fields: the same data, seeds, learning rates, batch, steps and held-out prompts. Scored with
toy.evaluate on the generation tasks whose misses the output projection makes (accuracy, 24 prompts each; the audio
ones too, where the toy's width lost beeps; the three-turn dialogue, whose video turn loses its shape there),
and each variant's stage-2 and stage-3 seconds.

    python experiments/output_projector.py           # one seed, about 95 minutes on 2 cores
    python experiments/output_projector.py --small   # the wiring: a few steps a stage, one prompt a task
    python experiments/output_projector.py --variants wider narrow   # some of the variants only

Time at the default size, measured (2026-12-02, 2 cores, AMD EPYC, another run on the other core): per variant
stage 1 90-140 s, stage 2 about 1,100 s (its denoising runs the image, video and audio UNets), stage 3 90-140 s
(1,647 steps) and about 65 s of eval: about 23 minutes a variant, 70 for the first three; the deeper one's stage 3
takes about 1.5x as long (996 s against 660 at --stage3-epochs=12, 6,588 steps, side by side with the toy's).
"""

import json
import os
from dataclasses import replace

import lab

import toy

NAME = "output_projector"
VARIANTS = {"narrow": dict(proj_hidden=64, proj_layers=1), "wider": dict(proj_hidden=128, proj_layers=2),
            "wider, audio narrow": dict(proj_hidden={"image": 128, "video": 128, "audio": 64},
                                        proj_layers={"image": 2, "video": 2, "audio": 1}),
            "deeper, audio narrow": dict(proj_hidden={"image": 128, "video": 128, "audio": 64},
                                         proj_layers={"image": 4, "video": 4, "audio": 1})}
TASKS = ["text -> image", "text -> two-object image", "text -> video", "text -> video + image", "text -> audio",
         "image -> audio (rule)", "dialogue: image, video, audio"]
SMALL_STEPS = {1: [], 2: ["--max_steps=8"], 3: ["--max_steps=24"]}  # --small: stage 2's denoising is the slow step


def main():
    p = lab.parser(__doc__)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
                   help=f"the variants to run, of {list(VARIANTS)} (default: all)")
    p.add_argument("--stage3-epochs", type=lab.positive, default=3,
                   help=f"stage 3's epochs (default 3; the recipe's: {toy.ToyConfig().stage_epochs[2]})")
    args = lab.parse(p)
    base = lab.setup(args, NAME, seeds=[0])
    e1, e2, _ = base.stage_epochs
    base = replace(base, stage_epochs=(1, 1, 1), eval_n=1) if args.small else \
        replace(base, stage_epochs=(e1, e2, args.stage3_epochs))
    caps = SMALL_STEPS if args.small else {1: [], 2: [], 3: []}
    more = {stage: [lab.features(args)] + caps[stage] for stage in caps}  # one features folder for every run
    lab.prepare(base, (1, 2, 3), more)  # before any run is timed
    worlds = {name: lab.world_variant(base, args, name, **VARIANTS[name]) for name in args.variants}
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
