"""
The decoding side: 4 image signal tokens ([IMG0..3], the released NExT-GPT's count and the toy's) against 1, and what
the output projector makes of them.

The paper (NExT-GPT, Wu et al. 2024, section 4.2) ends an image reply with signal tokens whose hidden states the
output projector (a small transformer: 77 learnable queries read the tokens) turns into the image decoder's text
conditioning; stage 2 trains it by pulling that output towards the decoder's own embedding of the caption. The paper
says the tokens carry the instructions for the decoder and uses 4 for images; it reports no other count. The LLM is
causal, so [IMG0]'s hidden state has already read the whole caption: is one token enough?

    img4   4 image signal tokens, the world as it is (through lab.world_variant too, so both runs read a copy)
    img1   1 image signal token: a world whose nextgpt.json says signal_tokens["image"] = 1

The variants differ only in that config field, from which train.py builds the new token rows and the replies' signal
runs (train.signal_text) and NextGPT the projector's input; the run checks that the training template holds exactly
that many tokens. Same data, epochs, learning rates, batch, seeds and noise seeds. Each run trains stage 1 (8 of the
recipe's 25 epochs, as experiments/grouping.py: text -> image reads nothing stage 1 trains but the new token rows, and
the time saved buys a third seed), then stage 2 as the recipe has it (4 epochs, lr 2e-3, denoising weight 1) on the
image pairs only (cc3m.json), less every 4th of the 132 two-object scenes: 33 captions the projector never trains on
(the LLM and the decoder were pretrained on every caption). No stage 3: the question is what stage 2 trains, asked in
its own template (the caption in; the caption and its signal run out), not stage 3's "Draw {}.".

    text -> image            a one-object caption (each of the 12 in turn) -> NextGPT.generate(want=["image"]), the
                             decoded image right by toy.measure_image
    held-out pair            a held-out scene's caption -> an image with both objects right (toy.measure_pair)
    align MSE                the projector's output (project_signal on the signal tokens' hidden states, the reply
                             given as training gives it) against the decoder's embed_text of the caption: the mean
                             squared error per element over the 12 one-object captions / the 33 held-out scenes
    held-out: caption / pad  the held-out MSE on CLIP's positions of the caption (start, words, end) / of the padding
    stage 1 s, stage 2 s     toy.run_stages' seconds (the features are prepared once, before any run is timed; a
                             stage's seconds include its model's load)

    python experiments/signal_tokens.py           # 3 seeds, 24 prompts per generation column
    python experiments/signal_tokens.py --small   # the wiring: one seed, one epoch a stage, 2 prompts (30-40 s)

Time at the default size: about 26 minutes on 2 cores (six runs of about 250 s: stage 1's 1,472 steps at the
recipe's 0.048 s a step, stage 2's 292 image-only steps at 0.4-0.6 s, and 21-24 s of scoring).
"""

import json
import os
from dataclasses import replace

import lab
import torch

import media
import nextgpt
import toy
import train

NAME = "signal_tokens"
SIGNALS = {"img4": 4, "img1": 1}  # variant -> image signal tokens
HELD_OUT = toy.PAIRS[3::4]  # the 33 two-object scenes stage 2 never sees
COLUMNS = ["text -> image", "held-out pair", "align MSE, one object", "align MSE, held-out pairs",
           "held-out: caption", "held-out: pad", "stage 1 s", "stage 2 s"]


def stage2_data(world, out):
    """The world's cc3m.json less the held-out scenes -> its path (its media resolve against the world's data/)."""
    with open(os.path.join(world, "data", "cc3m.json")) as f:
        records = json.load(f)
    held = {toy.pair_caption(a, b) for a, b in HELD_OUT}
    path = os.path.join(out, "cc3m_stage2.json")
    toy.dump(path, [r for r in records if r["caption"] not in held])
    return path


@torch.no_grad()
def alignment(model, captions):
    """-> [MSE per element, on the caption's CLIP positions, on the padding]: the projector's output against the
    decoder's embedding of each caption. The hidden states are those training projects: the reply given, not sampled."""
    d, n, ids = model.decoder("image"), model.config.signal_tokens["image"], model.signal_ids("image")
    sums, counts = [0.0, 0.0, 0.0], [0, 0, 0]
    for c in captions:
        embeds, labels = model.prompt_embeds([(c, c + train.signal_text(model.config, "image"))], labels=True)
        if sum(int(t) in ids for t in labels) != n:  # the variant is what it says
            raise RuntimeError(f"the training template's signal run is not the config's {n} tokens")
        prompt = model.prompt_embeds([(c, None)])  # what generate answers: the training example cut at its reply
        if not torch.equal(embeds[:, :prompt.shape[1]], prompt):
            raise RuntimeError("generate's prompt is not stage 2's template: the scores would not be stage 2's")
        s = labels.tolist().index(ids[0])  # training projects the hidden states where the signal tokens are the input
        _, h = model.llm(embeds=embeds, return_hidden=True)
        err = (model.project_signal("image", h[:, s:s + n])[0] - d.embed_text([c])[0]) ** 2  # (77, W)
        k = len(d.tokenizer.encode(c)) + 2  # CLIP's start token, the caption's, its end token; then the padding
        for j, part in enumerate((err, err[:k], err[k:])):
            sums[j] += float(part.sum())
            counts[j] += part.numel()
    return [s / c for s, c in zip(sums, counts)]


@torch.no_grad()
def accuracy(model, cfg, targets, caption, measure):
    """The share of targets whose image, generated from the caption alone (stage 2's prompt), measures as the target.
    Prompt k starts from the noise of seed eval_seed + k in every run."""
    right = 0
    for k, t in enumerate(targets):
        out = model.generate(caption(t), want=["image"], config=toy.generation_config(cfg), seed=cfg.eval_seed + k,
                             progress=False)
        right += measure(media.to_uint8(out["image"][0])) == tuple(t)
    return right / len(targets)


def evaluate(cfg):
    model = nextgpt.NextGPT.from_pretrained(toy.latest(cfg, 2), dtype=torch.float32, device="cpu",
                                            decoders=("image",), keep_decoders=True)
    ones = [toy.CLASSES[k % len(toy.CLASSES)] for k in range(cfg.eval_n)]
    pairs = [HELD_OUT[k * len(HELD_OUT) // cfg.eval_n] for k in range(cfg.eval_n)]  # spread over the 33
    one_mse = alignment(model, [toy.image_caption(*c) for c in toy.CLASSES])[0]
    pair_mse, on_caption, on_pad = alignment(model, [toy.pair_caption(a, b) for a, b in HELD_OUT])
    return {"text -> image": accuracy(model, cfg, ones, lambda c: toy.image_caption(*c), toy.measure_image),
            "held-out pair": accuracy(model, cfg, pairs, lambda p: toy.pair_caption(*p), toy.measure_pair),
            "align MSE, one object": one_mse, "align MSE, held-out pairs": pair_mse,
            "held-out: caption": on_caption, "held-out: pad": on_pad}


def main():
    args = lab.parse(lab.parser(__doc__))
    base = lab.setup(args, NAME, seeds=[0, 1, 2])
    # --small: one epoch a stage, two prompts a column; the default: 8 epochs of stage 1, the recipe's stage 2
    base = replace(base, stage_epochs=(1, 1, 1), eval_n=2) if args.small else \
        replace(base, stage_epochs=(8, *base.stage_epochs[1:]))
    with open(os.path.join(base.world, "backbones", nextgpt.MANIFEST)) as f:
        signals = json.load(f)["config"]["signal_tokens"]  # video's and audio's stay the world's
    feats = lab.features(args)  # ImageBind features and caption embeddings: the same for every run
    extra = {1: [feats], 2: [f"--data={stage2_data(base.world, args.out)}",
                             f"--media_dir={os.path.join(base.world, 'data')}", feats]}
    lab.prepare(base, (1, 2), extra)  # before any run is timed
    rows = {}
    for name, n in SIGNALS.items():
        world = lab.world_variant(base, args, name, signal_tokens={**signals, "image": n})
        for seed in args.seeds:
            cfg = lab.variant(world, args, name, seed)
            losses = toy.run_stages(cfg, (1, 2), extra)
            scores = {**evaluate(cfg), "stage 1 s": losses[1]["seconds"], "stage 2 s": losses[2]["seconds"]}
            lab.add(rows, name, scores)
            print(f"{name} seed {seed}: {scores}", flush=True)
    notes = (f"Epochs: stage 1 {base.stage_epochs[0]}, stage 2 {base.stage_epochs[1]} ({losses[2]['steps']} steps "
             f"of batch {base.stage_batch}) on cc3m.json less {len(HELD_OUT)} held-out two-object scenes; "
             f"{base.eval_n} prompts per generation column ({base.sample_steps} DDIM steps, guidance {base.guidance}); "
             f"mean ± sd over seeds {args.seeds}; world {base.world}.")
    lab.report(args, NAME, rows, COLUMNS, fmt="{:.4g}", notes=notes)


if __name__ == "__main__":
    main()
