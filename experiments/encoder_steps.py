"""
What the toy's ImageBind keeps in its pooled embedding, against its training steps: the recipe's 4,000 and half that.

The released NExT-GPT reads each input as one vector, ImageBind's pooled embedding, through a linear projection
(the toy ships that). A description can only say what that vector keeps. On the toy's first edition (ImageBind
trained 2,000 steps) `python toy.py --probe-encoder` found the motion of a video and the shapes of a two-object scene
only partly in it (a linear probe read them at 54-67% where colors and one-object shapes read at 88-100%), which is
where video -> text and two-object image -> text missed (`python toy.py --eval`'s list of misses: the motion, the
shapes). Is that the encoder stopping short, or the size of the vector (32 numbers)? This experiment retrains only
ImageBind on one world, at the recipe's steps and at half as many, and probes each (toy.probe_encoder: ridge
regression per attribute, fit on fresh draws, scored on the eval's held-out inputs). The variants differ only in the
steps (the schedule is AdamW with warmup and a cosine decay to the last step, so each is a run of its own): the same
world, seed, batch and learning rate.

    half        2,000
    recipe      toy.ToyConfig.imagebind_steps, 4,000 (what the world's backbones hold)

Columns: the held-out probe accuracy of the attributes the descriptions miss (video motion, the two-object scene's
shapes and colors), every attribute of a video and of a two-object scene right at once ("all"), ImageBind's final
contrastive loss (the mean over its last 10% of steps) and its training seconds.

    python experiments/encoder_steps.py           # one seed, 24 held-out inputs per kind
    python experiments/encoder_steps.py --small   # the wiring: 20 and 40 steps on the CI world (about a minute)

Time at the default size: about 45 minutes on 2 cores (ImageBind at about 0.46 s a step at one thread: 6,000 steps
in all, and 90 s of probing a variant).
"""

import os
from dataclasses import replace

import lab

import toy

NAME = "encoder_steps"
PROBED = [("video", "motion"), ("video", "all"), ("pair", "left shape"), ("pair", "right shape"),
          ("pair", "left color"), ("pair", "right color"), ("pair", "all")]
COLUMNS = [f"{kind} {attribute}" for kind, attribute in PROBED] + ["contrastive loss", "train seconds"]


def main():
    args = lab.parse(lab.parser(__doc__))
    base = lab.setup(args, NAME, seeds=[0])
    recipe = 40 if args.small else base.imagebind_steps  # --small: the wiring only
    steps = {"half": recipe // 2, "recipe": recipe}
    files = lab.world_files(base.world)
    rows = {}
    for name, n in steps.items():
        for seed in args.seeds:
            cfg = replace(lab.variant(base, args, name, seed), imagebind_steps=n)
            log = {}
            ib = toy.train_imagebind(cfg, files, log)
            ckpt = lab.link_world(cfg.world, cfg.out, skip=("imagebind.safetensors",))
            toy.save_safetensors(ib, os.path.join(ckpt, "backbones", "imagebind.safetensors"))
            probe = toy.probe_encoder(cfg, os.path.join(ckpt, "backbones"))
            row = {f"{k} {a}": probe[k][a] for k, a in PROBED}
            lab.add(rows, name, {**row, "contrastive loss": log["imagebind"],
                                 "train seconds": log["imagebind seconds"]})
            print(f"{name} ({n} steps) seed {seed}: {row}", flush=True)
    notes = (f"ImageBind steps: {steps}; batch {base.batch}; seeds {args.seeds}; probe: toy.probe_encoder, fit on "
             f"fresh draws of the world's sizes, {base.eval_n} held-out inputs per kind; world {base.world}.")
    lab.report(args, NAME, rows, COLUMNS, notes=notes)


if __name__ == "__main__":
    main()
