"""
The decoding side: which of stage 2's three losses make the output projector drive the frozen decoders?

NExT-GPT's stage 2 (decoding-side instruction-following alignment) shows the LLM a caption and trains the output
projectors, and the signal tokens' new rows, so that the projected hidden states at the signal tokens stand in for
the decoder's own text encoding of that caption. The paper minimises the distance between the two (the caption
alignment loss: text only, no media, hence cheap), beside the NLL of the reply; its later code adds the conditional
latent denoising loss, the frozen UNet's noise prediction on the target media's latents conditioned on the projector's
output. The claim: the alignment alone gives the decoders a condition they follow, and the NLL teaches the LLM when
to emit the signal tokens but not what they mean to a decoder. Here the three losses are added one at a time:

    nll                    the NLL of the reply (the caption echoed, then the signal tokens): --align_weight=0
                           --denoise_weight=0. Stage 2 freezes the LLM, so only the new token rows learn; the
                           projector moves only by weight decay
    nll + align            plus the caption alignment (--denoise_weight=0)
    nll + align + denoise  plus the latent denoising (--denoise_weight=1, the toy recipe's: ToyConfig.denoise)

Variants differ in these two loss weights only: for each seed, stage 1 runs once and every variant's stage 2 starts
from its checkpoint, with the same data, epochs (the recipe's 4), learning rate and train.py --seed.

Measured on the held-out prompts of toy.eval_cases (16 per task, drawn from cfg.seed, so each seed has its own; the
captions are all in the training data, as the world has only 12 image, 48 video and 9 sound captions, and what is new
is each prompt's noise):
- text -> image / video / audio: the share of decoded outputs that toy's measurers read as the caption says;
- distance: nextgpt.caption_distance (the training's alignment loss: the Euclidean distance per token, averaged over
  the condition's tokens; not an MSE) between the condition the decoder got and its own text embedding of the caption.
  The scales differ per decoder (77 x 64 CLIP tokens for image and video, one normalised 32-wide CLAP vector for
  audio), so each modality has its own column;
- the seconds of each variant's stage 2 (the features are prepared once, before any run is timed).

Time at the default size (2 seeds, 736 stage-2 steps, 16 prompts per task): about 46 minutes on 2 cores, from the
recipe's stage times (stage 1 219 s, stage 2 with denoising 646 s) and this file's small-world timings (stage 2
without denoising at an eighth of the cost a step; 6.7 s to generate an image, a video and a sound).

    python experiments/decoding_losses.py           # the default size, on out/toy
    python experiments/decoding_losses.py --small   # every variant's wiring in about a minute
"""

import os
import time
from dataclasses import replace

import lab
import torch

import nextgpt
import toy

# name -> (train.py --align_weight, --denoise_weight); the last is the toy recipe's stage 2
VARIANTS = {"nll": (0.0, 0.0), "nll + align": (1.0, 0.0), "nll + align + denoise": (1.0, toy.ToyConfig.denoise)}
TASKS = {"image": "text -> image", "video": "text -> video", "audio": "text -> audio"}
MODALITY = {t: m for m, t in TASKS.items()}
COLUMNS = [*TASKS.values(), "image distance", "video distance", "audio distance", "stage-2 seconds"]
SMALL_STEPS = 8  # --small: stage 2's steps per variant (the denoising costs ~1 s a step)


def score(cfg, ckpt):
    """Text -> X after stage 2 only: accuracy of the decoded media and the condition's distance to the caption.

    The eval's "Draw {}." prompts (toy.GENERATE) are stage-3 instructions, which nothing has trained yet. Stage 2
    trains on the caption as the user's text and the caption + signal tokens as the reply (train.py's _example, as the
    official build_one_instance_stage_2), so the caption alone is the prompt here, and want=[modality] forces the
    signal run if the reply has none: this measures what stage 2 trains (the projector, the signal rows), not the
    instruction following that stage 3 adds."""
    model = nextgpt.NextGPT.from_pretrained(ckpt, dtype=torch.float32, device="cpu", keep_decoders=True)
    generation = toy.generation_config(cfg)
    right, distance = {m: [] for m in TASKS}, {m: [] for m in TASKS}
    for k, (task, dialogue) in enumerate(toy.eval_cases(cfg)):
        m = MODALITY.get(task)
        if m is None:
            continue  # k stays the prompt's place among all tasks', so its noise seed is the one toy.evaluate uses
        _, _, captions, outputs = dialogue[0]
        out = model.generate(captions[0], want=[m], config=generation, seed=cfg.eval_seed + k, progress=False)
        right[m].append(float(toy.score_turn(out, captions, outputs)[0]))
        cond = next(r["cond"] for r in out["runs"] if r["modality"] == m)  # (Q, W), what the decoder was given
        with torch.no_grad():
            target = model.decoder(m).embed_text(captions).float().reshape(cond.shape)
        distance[m].append(float(nextgpt.caption_distance(cond, target)))
    mean = lambda xs: sum(xs) / len(xs)
    return {**{TASKS[m]: mean(right[m]) for m in TASKS}, **{f"{m} distance": mean(distance[m]) for m in TASKS}}


def main():
    p = lab.parser(__doc__)
    p.add_argument("--epochs", type=lab.positive, default=toy.ToyConfig().stage_epochs[1], help="stage 2's train.py "
                   "--epochs (default: the recipe's; --small runs a few steps instead)")
    p.add_argument("--eval-n", type=lab.positive, default=16, help="held-out prompts per task and seed (--small: 2)")
    args = lab.parse(p)
    base = lab.setup(args, "decoding_losses", seeds=[0, 1])
    base = replace(base, eval_n=2 if args.small else args.eval_n)  # --small: the wiring, not the numbers
    features = [lab.features(args)]  # one cache: the backbones are the same
    steps = [f"--max_steps={SMALL_STEPS}"] if args.small else [f"--epochs={args.epochs}"]
    lab.prepare(base, (1, 2), {1: features, 2: features})  # before any run is timed
    rows = {}
    for seed in args.seeds:
        # one stage 1 per seed, whose checkpoint every variant's stage 2 starts from: only the losses differ
        first = lab.variant(base, args, "stage1", seed)
        toy.run_stages(first, order=(1,), extra={1: features})
        delta = os.path.join(toy.latest(first, 1), "nextgpt.safetensors")
        for name, (align, denoise) in VARIANTS.items():
            cfg = lab.variant(base, args, name, seed)
            extra = [f"--delta={delta}", f"--align_weight={align}", f"--denoise_weight={denoise}", *features, *steps]
            t = time.time()
            toy.run_stages(cfg, order=(2,), extra={2: extra})
            row = {**score(cfg, toy.latest(cfg, 2)), "stage-2 seconds": time.time() - t}
            lab.add(rows, name, row)
            print(f"{name}, seed {seed}: {row}", flush=True)
    size = "CI size: the numbers say only that the wiring runs" if args.small else f"{args.epochs} stage-2 epochs"
    notes = (f"{size}; {base.eval_n} held-out prompts per task and seed; distance: nextgpt.caption_distance, the mean "
             "per-token L2 between the projector's output and the decoder's text embedding of the caption.")
    lab.report(args, "decoding_losses", rows, COLUMNS, notes=notes)


if __name__ == "__main__":
    main()
