"""
The encoding side: the released linear projection of ImageBind's pooled feature against the paper's concept grouping
of its grid features (train.py --input_proj=group), and the grouping's number of concept tokens, 4 against 8.

The paper (NExT-GPT, Wu et al. 2024) says the linear projection of the one pooled embedding loses information that
grouping the patch features into concept tokens keeps. Each variant here trains stage 1 from the world's backbones,
the stage in which the input projection alone learns to be read by the frozen LLM (stage 3 trains it too, beside the
LoRA, which would mix the two), and is scored on held-out media: the inputs of toy.eval_cases' understanding tasks (a
seed training never used), asked stage 1's instruction, the share of exact captions (and, for two-object scenes, of
each object apart). Variants differ only in the projection: the same data, epochs, learning rate, batch, seeds and
held-out inputs. Also reported: stage 1's seconds (toy.run_stages': the steps and two model loads, the features being
prepared once before) and its final caption NLL (the mean over its last 10% of steps, toy.stage_losses).

    linear            one token an input: the pooled ImageBind embedding through nn.Linear (the released weights)
    group, 4 tokens   256 patch features (228 for audio) -> 16 groups -> 4 concept tokens (the toy's group_tokens)
    group, 8 tokens   the same with group_tokens (16, 8): a world whose nextgpt.json says so (lab.world_variant)

    python experiments/grouping.py            # 3 seeds, 8 epochs of stage 1, 24 held-out inputs per column
    python experiments/grouping.py --small    # the wiring: one seed, one epoch, 2 inputs per column (~80 s)

Time at the default size: 21 minutes measured on 2 cores (AMD EPYC, another experiment on the other core): stage 1
takes 0.03 s a step linear and 0.12 s grouped (8 epochs of 184 steps: 44 s and 180 s a run, about 400 s a seed),
plus about 2 minutes of feature preparation, model loads and answers. On the slower CPU of the first edition's runs
it took 70 minutes beside other work.
"""

import os
from dataclasses import replace

import lab
import torch

import nextgpt
import toy
import train

NAME = "grouping"
COLUMNS = {"image -> text": "one-object image", "two-object image -> text": "two-object image",
           "video -> text": "video", "audio -> text": "audio"}  # toy.eval_cases' understanding tasks -> columns
OBJECTS = "two-object: objects right"
VARIANTS = {"linear": ("linear", 1), "group, 4 tokens": ("group", 4), "group, 8 tokens": ("group", 8)}  # (proj, tokens)


def held_out(base, n, folder):
    """[(column, modality, file, caption)]: the inputs and captions of toy.eval_cases' understanding tasks, n per task,
    written once into folder as the files training reads (png, gif, wav): every run answers the same inputs."""
    os.makedirs(folder, exist_ok=True)
    cases = []
    for k, (task, turns) in enumerate(toy.eval_cases(replace(base, eval_n=n))):
        if task in COLUMNS:
            _, (modality, x), (caption,), _ = turns[0]
            path = os.path.join(folder, f"{k:04d}.{toy.EXT[modality]}")
            toy.SAVE[modality](path, x)  # always: a file left by another run could be another draw
            cases.append((COLUMNS[task], modality, path, caption))
    return cases


def score(cfg, ckpt, cases):
    """-> ({column: the share of exact captions}, the set of LLM tokens an input became). Asked with stage 1's
    instruction: the understanding prompts of toy.UNDERSTAND are stage 3's, which this model never saw."""
    model = nextgpt.NextGPT.from_pretrained(ckpt, dtype=torch.float32, device="cpu")
    right, tokens = {c: [] for c in [*COLUMNS.values(), OBJECTS]}, set()
    for column, modality, path, caption in cases:
        out = model.generate(toy.STAGE1_PROMPT, **{modality + "s": [path]}, config=toy.generation_config(cfg),
                             official_inference=False, progress=False)
        tokens.add(out["media"][0][1].shape[0])
        right[column].append(out["text"].strip().rstrip(".") == caption)
        if column == "two-object image":  # each object apart (color, shape and side): a finer measure of what is kept
            said, expected = toy.parse_caption(out["text"]), toy.parse_caption(caption)
            right[OBJECTS] += [said.get(side) == expected[side] for side in ("left", "right")]
    # train.py builds a stage-1 example as the turn (TrainConfig.prompt, caption) with the input unmarked, which
    # prompt_embeds puts first: "### Human: <Img>tokens</Img> generate a caption\n### Assistant: " + caption. The prompt
    # generate answers (official_inference=False) is that example cut where its caption's labels begin: checked here.
    train_embeds, labels = model.prompt_embeds([(train.TrainConfig.prompt, caption)], out["media"], labels=True)
    prompt = model.prompt_embeds([(toy.STAGE1_PROMPT, None)], out["media"])
    T = prompt.shape[1]
    if not (torch.equal(train_embeds[:, :T], prompt) and (labels[:T] == -100).all() and labels[T] != -100):
        raise RuntimeError("generate's prompt is not train.py's stage-1 template: the scores would not be stage 1's")
    return {c: sum(v) / len(v) for c, v in right.items()}, tokens


def main():
    p = lab.parser(__doc__)
    p.add_argument("--epochs", type=lab.positive, default=None, help="stage 1's train.py --epochs (default 8; "
                                                                     "--small 1)")
    p.add_argument("--eval-n", type=lab.positive, default=None, help="held-out inputs per column (default 24; "
                                                                     "--small 2)")
    args = lab.parse(p)
    base = lab.setup(args, NAME, seeds=[0, 1, 2])
    epochs, eval_n = args.epochs or (1 if args.small else 8), args.eval_n or (2 if args.small else 24)
    base = replace(base, stage_epochs=(epochs, *base.stage_epochs[1:]))
    worlds = {"linear": base, "group, 4 tokens": base,
              "group, 8 tokens": lab.world_variant(base, args, "group8", group_tokens=[16, 8])}
    # one features folder for every run: the grid features do not depend on the number of concept tokens, so the
    # 8-token world reads those the 4-token runs use
    extra = {1: [lab.features(args)]}
    cases = held_out(base, eval_n, os.path.join(args.out, "held_out"))
    for proj in ("linear", "group"):  # the features once, before any run is timed
        lab.prepare(replace(base, input_proj=proj), (1,), extra)
    columns = [*COLUMNS.values(), OBJECTS, "stage-1 NLL", "stage-1 seconds"]
    rows = {}
    for name, (proj, n_tokens) in VARIANTS.items():
        for seed in args.seeds:
            cfg = lab.variant(worlds[name], args, name, seed, input_proj=proj)
            losses = toy.run_stages(cfg, order=(1,), extra=extra)[1]
            acc, tokens = score(cfg, toy.latest(cfg, 1), cases)
            if tokens != {n_tokens}:  # the variant is what it says: the 8-token world really gives 8 concepts
                raise RuntimeError(f"{name}: an input became {sorted(tokens)} LLM tokens, not {n_tokens}")
            lab.add(rows, name, {**acc, "stage-1 NLL": losses["nll"], "stage-1 seconds": losses["seconds"]})
            print(f"{name} seed {seed}: {acc}, NLL {losses['nll']}, {losses['seconds']} s", flush=True)
    notes = (f"The share of exact captions on {eval_n} held-out inputs per column (toy.eval_cases' understanding "
             f"inputs) after stage 1 only ({epochs} epochs, {losses['steps']} steps of batch {base.stage_batch}, "
             f"lr {base.stage_lr[0]}), asked '{toy.STAGE1_PROMPT}'; mean ± sd over seeds {args.seeds}; world "
             f"{base.world}.")
    lab.report(args, NAME, rows, columns, fmt="{:.4g}", notes=notes)


if __name__ == "__main__":
    main()
