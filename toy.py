"""
A tiny synthetic any-to-any world in which the whole of NExT-GPT trains on a laptop CPU in minutes.

    32 x 32 images of a colored shape ("a red circle"), 8-frame GIFs of one moving ("a blue square moving left"),
    1 s of 16 kHz beeps ("two high beeps"), and a stated cross-modal rule:
        pitch <-> shape (low circle, mid square, high triangle), number of beeps <-> color (1 red, 2 green, 3 blue)

    python toy.py                     # world + data files + stand-in backbones -> out/toy/{data,backbones}
    python toy.py --stages            # train.py --prepare, then stages 1, 2, 3 on them (--first_stage=2: resume)
    python toy.py --recipe            # both, then --eval of the stage-3 checkpoint
    python toy.py --ship              # the stage-3 checkpoint + backbones -> assets/toy (what `python sample.py` loads)
    python toy.py --eval [CKPT]       # accuracy table per task (default CKPT: assets/toy)
    python toy.py --pictures [CKPT]   # the README's pictures -> assets/toy_text_to_*
    python toy.py --small --recipe    # the CI size (tests/test_toy.py); --key=value sets any ToyConfig field

The stand-ins for the frozen official backbones are the project's own classes at toy size, pretrained here on the
world: ImageBind (contrastive over image, video, audio and text), LLaMA (next-token on the world's text, its own
sentencepiece), and the three latent diffusion decoders (VAE + UNet conditioned on their own CLIP / CLAP text
encoders, AudioLDM's class-embedding UNet and a HiFi-GAN vocoder). They are written in the official on-disk formats
(diffusers / transformers folders, an HF LLaMA folder, ImageBind's key names), so NextGPT.from_pretrained and train.py
read them unchanged. Every accuracy is measured by deterministic measurers (hue, fill ratio, centroid track, FFT peak,
envelope), which tests/test_toy.py checks on ground-truth media.

References
- NExT-GPT: Wu et al., ICML 2024, https://arxiv.org/abs/2309.05519 (the three stages, the data formats)
- ImageBind: Girdhar et al., CVPR 2023, https://arxiv.org/abs/2305.05665 (InfoNCE against a shared anchor)
- Latent diffusion: Rombach et al., CVPR 2022, https://arxiv.org/abs/2112.10752 (VAE + eps-prediction UNet, CFG by
  caption dropout: Ho & Salimans 2022, https://arxiv.org/abs/2207.12598); AudioLDM: Liu et al. 2023,
  https://arxiv.org/abs/2301.12503; HiFi-GAN: Kong et al. 2020 (here trained without the GAN, on STFT losses:
  Yamamoto et al., Parallel WaveGAN 2020, https://arxiv.org/abs/1910.11480)
- nanoGPT's shakespeare_char: the idea of a world small enough to train on a laptop
"""

import copy
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets", "toy")

# ----------------------------------------------------------------------------------------------------------------------
# The world

SIZE, FRAMES, SR, SECONDS = 32, 8, 16000, 1.0
COLORS = {"red": (225, 35, 35), "yellow": (230, 215, 35), "green": (35, 205, 35), "blue": (40, 70, 235)}
HUES = {"red": 0.0, "yellow": 55.0, "green": 120.0, "blue": 230.0}  # what the hue measurer compares against
SHAPES = ("circle", "square", "triangle")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) per frame in image axes
PITCHES = {"low": 400.0, "mid": 800.0, "high": 1600.0}  # Hz, an octave apart: far apart on any mel scale
COUNTS = ("one", "two", "three")
# the cross-modal rule: an image's shape sets the pitch, its color the number of beeps (yellow has no sound)
RULE_PITCH = dict(zip(SHAPES, PITCHES))
RULE_COUNT = {"red": 1, "green": 2, "blue": 3}


def image_caption(color, shape):
    return f"a {color} {shape}"


def video_caption(color, shape, motion):
    return f"a {color} {shape} moving {motion}"


def audio_caption(pitch, count):
    return f"{COUNTS[count - 1]} {pitch} beep{'s' if count > 1 else ''}"


def draw(color, shape, cx, cy, r):
    """One frame: a filled shape of radius r centred at (cx, cy) on black, (SIZE, SIZE, 3) uint8."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    d = ImageDraw.Draw(im)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:  # pointing up
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=COLORS[color])
    return np.asarray(im)


def make_image(rng, color, shape):
    """(SIZE, SIZE, 3): the shape at a random position, radius 5 as in the videos. (Radii 5-7 made the shape the
    hardest thing to learn: the toy ImageBind retrieved held-out r = 5, 6, 7 images 98%, 81%, 58% right.)"""
    r = 5
    return draw(color, shape, rng.randint(r + 1, SIZE - r - 2), rng.randint(r + 1, SIZE - r - 2), r)


def make_video(rng, color, shape, motion):
    """(FRAMES, SIZE, SIZE, 3): the shape moves 2 px a frame (14 px in all) in its direction."""
    r, step = 5, 2
    dx, dy = MOTIONS[motion]
    travel = step * (FRAMES - 1)
    lo, hi = r + 1, SIZE - r - 2

    def start(d):  # a start from which the whole path stays inside the frame
        return rng.randint(lo + travel, hi) if d < 0 else rng.randint(lo, hi - travel) if d > 0 else rng.randint(lo, hi)
    x0, y0 = start(dx), start(dy)
    return np.stack([draw(color, shape, x0 + dx * step * f, y0 + dy * step * f, r) for f in range(FRAMES)])


def make_audio(rng, pitch, count):
    """
    (SR * SECONDS,) float32: count beeps of 150 ms, 150 ms apart, with 10 ms ramps, at a jittered start and loudness.
    The tone is phase-locked to the clock, and every pitch fits a whole number of periods in a 10 ms mel hop, so the
    waveform is a function of the mel frames: a vocoder can learn it with a plain waveform loss in minutes (a real
    HiFi-GAN needs its discriminators and days for free phase).
    """
    t = np.arange(int(SR * SECONDS)) / SR
    wave = np.zeros_like(t)
    t0 = rng.uniform(0.06, 0.14)
    for k in range(count):
        a, b = t0 + 0.3 * k, t0 + 0.3 * k + 0.15
        env = np.clip(np.minimum(t - a, b - t) / 0.01, 0, 1)  # trapezoid: 0 outside [a, b]
        wave += env * np.sin(2 * math.pi * PITCHES[pitch] * t)
    return (rng.uniform(0.4, 0.6) * wave).astype(np.float32)


def save_png(path, x):
    from PIL import Image
    Image.fromarray(x).save(path)


def save_gif(path, frames):
    from PIL import Image
    pil = [Image.fromarray(f) for f in frames]
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=125, loop=0)  # 8 fps: 1 s


def save_wav(path, wave):
    import soundfile
    soundfile.write(path, np.clip(wave, -1, 1), SR, subtype="PCM_16")


def read_media(modality, path):
    """A file of the world back as an array: image (H, W, 3), video (F, H, W, 3) uint8, audio (samples,) float."""
    from PIL import Image, ImageSequence
    if modality == "audio":
        import soundfile
        return soundfile.read(path, dtype="float32")[0]
    with Image.open(path) as im:
        if modality == "image":
            return np.array(im.convert("RGB"))
        return np.stack([np.array(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


# ----------------------------------------------------------------------------------------------------------------------
# Measurers: simple, deterministic, checked on ground truth by tests/test_toy.py

def foreground(img):
    """Pixels that belong to the shape: saturated and bright enough (the background is black). (H, W) bool."""
    x = img.astype(np.float32) / 255
    mx, mn = x.max(-1), x.min(-1)
    return (mx > 0.35) & (mx - mn > 0.25)


def measure_color(img):
    """The foreground's circular-mean hue -> the nearest color name (None if there is no foreground)."""
    fg = foreground(img)
    if fg.sum() < 6:
        return None
    x = img[fg].astype(np.float32) / 255
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    hue = np.degrees(np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b))  # the hexagonal hue approximation
    h = math.degrees(math.atan2(np.sin(np.radians(hue)).mean(), np.cos(np.radians(hue)).mean())) % 360
    return min(HUES, key=lambda c: min(abs(h - HUES[c]), 360 - abs(h - HUES[c])))


def measure_shape(img):
    """Fill ratio of the foreground in its bounding box: square ~1, circle ~pi/4, triangle ~1/2."""
    fg = foreground(img)
    if fg.sum() < 6:
        return None
    ys, xs = np.nonzero(fg)
    fill = fg.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.89 else "circle" if fill > 0.64 else "triangle"


def measure_motion(frames):
    """The foreground centroid's track from the first frame to the last: its dominant axis and sign."""
    cs = []
    for f in frames:
        fg = foreground(f)
        if fg.sum() >= 6:
            ys, xs = np.nonzero(fg)
            cs.append((xs.mean(), ys.mean()))
    if len(cs) < 2:
        return None
    dx, dy = np.subtract(cs[-1], cs[0])
    if max(abs(dx), abs(dy)) < 3:
        return None
    return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")


def measure_video(frames):
    """(color, shape, motion): color and shape from the middle frame."""
    mid = frames[len(frames) // 2]
    return measure_color(mid), measure_shape(mid), measure_motion(frames)


def measure_pitch(wave):
    """The FFT peak (Hz) -> the nearest pitch name on a log scale."""
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    freqs = np.fft.rfftfreq(len(wave), 1 / SR)
    spec[freqs < 100] = 0
    f = freqs[spec.argmax()]
    return min(PITCHES, key=lambda p: abs(math.log(f / PITCHES[p])))


def measure_count(wave):
    """Beeps = runs of 10 ms frames whose RMS is over a third of the loudest, ignoring gaps under 50 ms."""
    n = len(wave) // 160
    rms = np.sqrt((wave[:n * 160].reshape(n, 160) ** 2).mean(1))
    on = rms > max(rms.max() / 3, 1e-3)
    runs, k = [], 0
    while k < n:  # (start, end) of each run of loud frames
        if on[k]:
            e = k
            while e < n and on[e]:
                e += 1
            runs.append([k, e])
            k = e
        else:
            k += 1
    merged = []
    for r in runs:
        if merged and r[0] - merged[-1][1] < 5:
            merged[-1][1] = r[1]
        else:
            merged.append(r)
    return sum(1 for a, b in merged if b - a >= 4)  # at least 40 ms long


def measure_audio(wave):
    return measure_pitch(wave), measure_count(wave)


def parse_caption(text):
    """A caption of the world -> its attributes, or {} (exact wording, as the exact-match text measure wants)."""
    words = text.strip().rstrip(".").split()
    for c in COLORS:
        for s in SHAPES:
            if words == image_caption(c, s).split():
                return {"color": c, "shape": s}
            for m in MOTIONS:
                if words == video_caption(c, s, m).split():
                    return {"color": c, "shape": s, "motion": m}
    for p in PITCHES:
        for n in (1, 2, 3):
            if words == audio_caption(p, n).split():
                return {"pitch": p, "count": n}
    return {}


# ----------------------------------------------------------------------------------------------------------------------
# The recipe's knobs

@dataclass
class ToyConfig:
    out: str = "out/toy"  # data/, backbones/ (the folder train.py's --ckpt reads), stage1-3/
    seed: int = 0
    # training media per class: 12 image, 48 video and 9 audio classes
    per_image: int = 24
    per_video: int = 12
    per_audio: int = 24
    eval_n: int = 24  # held-out prompts per task
    # --eval: prompt k starts from the noise of seed eval_seed + k. (With one seed for all, a task's score was one draw
    # of noise: the same checkpoint got text -> video 16, 23, 17 and 19 of 24 with seeds 0, 1, 2, 3 for all prompts.)
    eval_seed: int = 0
    threads: int = 1  # 2 threads on 2 shared cores are up to 10x slower than 1 when another process runs
    workers: int = 2  # backbones: lanes trained side by side in their own processes (1: one after the other)
    # backbones: steps (batch sizes below)
    imagebind_steps: int = 2000
    llm_steps: int = 400
    vae_steps: int = 1000
    unet_steps: int = 2500
    # from the image UNet (inflate): only the motion is left to learn. Measured: motion comes in 200 steps; the
    # direction, with frame positions, zero SNR, half of each batch at high noise and the video text encoder's code,
    # in 1,200 (48/48). The decoder alone, all three right: 42/48 after 1,200 steps, 45/48 after 1,500 (guidance 1.5);
    # 1,800 no better (128 of 144 clips, three noises per caption, as 1,500)
    video_steps: int = 1500
    motion_text_steps: int = 800
    audio_vae_steps: int = 600
    audio_steps: int = 1000
    vocoder_steps: int = 400
    batch: int = 32
    # the three NExT-GPT stages (train.py)
    # measured: stage 3 at 30 epochs instead of 15 took text -> image from 67% to 88% (its alignment 0.66 -> 0.43)
    stage_epochs: tuple = (25, 5, 25)
    stage_lr: tuple = (2e-3, 2e-3, 1e-3)
    stage_batch: int = 8
    denoise: float = 1.0  # stage 2's latent denoising loss weight (measured: text -> image 54% without, 83% with)
    first_stage: int = 1  # --stages: start here (the earlier stages' outputs must be in out/)
    # generation
    sample_steps: int = 20
    guidance: float = 3.0
    # the video decoder alone on the 48 video captions (20 steps): every attribute right for 45 at guidance 1.5, 36
    # at 3, 31 at 5 (the direction code pulls hard: at 3 color and shape go wrong, at 5 the direction too); with
    # three noises per caption, 101, 128 and 125 of 144 at 1, 1.5 and 2
    video_guidance: float = 1.5

    @classmethod
    def small(cls, **kw):
        """The CI size (tests/test_toy.py): every step of the recipe in ~2-3 minutes on 2 cores. The LLM side learns
        its dialogues; the backbones barely start, so media accuracies stay near chance at this size."""
        return replace(cls(per_image=8, per_video=1, per_audio=8, eval_n=8, imagebind_steps=100, llm_steps=200,
                           vae_steps=100, unet_steps=100, video_steps=20, motion_text_steps=50, audio_vae_steps=60,
                           audio_steps=80, vocoder_steps=50, batch=16, stage_epochs=(10, 5, 4), sample_steps=10), **kw)


# the toy model's shape (every width small enough for a CPU)
IB_DIM = 32  # ImageBind's shared space
W_IMAGE, W_AUDIO = 64, 32  # the decoders' conditioning widths: CLIP hidden size, CLAP projection
N_MELS, HOP = 32, 160  # AudioLDM's hop (100 mel frames a second), fewer mel bands


# ----------------------------------------------------------------------------------------------------------------------
# Dialogues and data files in the official formats

UNDERSTAND = {"image": "Describe this image.", "video": "Describe this video.", "audio": "Describe this sound."}
GENERATE = {"image": "Draw {}.", "video": "Show {}.", "audio": "Play {}."}
CROSS = {("image", "audio"): "Play the sound of this image.", ("audio", "image"): "Draw the picture of this sound."}
STAGE1_PROMPT = "generate a caption"  # train.py's default stage-1 instruction


def all_captions():
    img = [image_caption(c, s) for c in COLORS for s in SHAPES]
    vid = [video_caption(c, s, m) for c in COLORS for s in SHAPES for m in MOTIONS]
    aud = [audio_caption(p, n) for p in PITCHES for n in (1, 2, 3)]
    return {"image": img, "video": vid, "audio": aud}


def rule_audio(color, shape):
    return RULE_PITCH[shape], RULE_COUNT[color]


def rule_image(pitch, count):
    return {v: k for k, v in RULE_COUNT.items()}[count], {v: k for k, v in RULE_PITCH.items()}[pitch]


def world_items(seed, per_image, per_video, per_audio):
    """Every class of each modality `per_*` times, each with its own random draw: [(name, caption, attributes)]."""
    rng = random.Random(seed)
    items = {"image": [], "video": [], "audio": []}
    for k in range(per_image):
        for c in COLORS:
            for s in SHAPES:
                items["image"].append((make_image(rng, c, s), image_caption(c, s), dict(color=c, shape=s)))
    for k in range(per_video):
        for c in COLORS:
            for s in SHAPES:
                for m in MOTIONS:
                    items["video"].append((make_video(rng, c, s, m), video_caption(c, s, m),
                                           dict(color=c, shape=s, motion=m)))
    for k in range(per_audio):
        for p in PITCHES:
            for n in (1, 2, 3):
                items["audio"].append((make_audio(rng, p, n), audio_caption(p, n), dict(pitch=p, count=n)))
    return items


def write_world(cfg):
    """Media files + cc3m.json, webvid.json, audiocap.json (stages 1, 2), t2x.json and instruct.json (stage 3)."""
    d = os.path.join(cfg.out, "data")
    items = world_items(cfg.seed, cfg.per_image, cfg.per_video, cfg.per_audio)
    names = {m: [] for m in items}
    ext = {"image": "png", "video": "gif", "audio": "wav"}
    save = {"image": save_png, "video": save_gif, "audio": save_wav}
    for m, rows in items.items():
        os.makedirs(os.path.join(d, m), exist_ok=True)
        for k, (x, cap, attr) in enumerate(rows):
            name = f"{m}/{m[:3]}_{k:04d}.{ext[m]}"  # unique stems across modalities: train.py caches by stem
            save[m](os.path.join(d, name), x)
            names[m].append((name, cap, attr))
    key = {"image": "image_name", "video": "video_name", "audio": "audio_name"}
    files = {"image": "cc3m.json", "video": "webvid.json", "audio": "audiocap.json"}
    for m in items:
        dump(os.path.join(d, files[m]), [{key[m]: n, "caption": c} for n, c, _ in names[m]])
    # T2X (legacy instruction data): text in, X out, the caption as the reply
    t2x = [{"mm_name": n, "conversation": [
        {"from": "human", "value": GENERATE[m].format(c), "input_modality": "text"},
        {"from": "gpt", "value": c, "caption": c, "output_modality": m}]} for m in items for n, c, _ in names[m]]
    # the new code's format: X in, text out; and the cross-modal switches through the rule
    inst = [{f"input_{m}": n, "conversations": [{"from": "human", "value": f"<{m}>\n{UNDERSTAND[m]}"},
                                                 {"from": "gpt", "value": c}]} for m in items for n, c, _ in names[m]]
    audio_of = {(a["pitch"], a["count"]): (n, c) for n, c, a in names["audio"]}
    image_of = {(a["color"], a["shape"]): (n, c) for n, c, a in names["image"]}
    for n, c, a in names["image"]:
        if a["color"] in RULE_COUNT:
            an, ac = audio_of[rule_audio(a["color"], a["shape"])]
            inst.append({"input_image": n, "output_audio": an, "audio_captions": [ac], "conversations": [
                {"from": "human", "value": "<image>\n" + CROSS["image", "audio"]},
                {"from": "gpt", "value": ac + "<audio-placeholder>"}]})
    for n, c, a in names["audio"]:
        for _ in range(2):  # 9 sound classes against 12 image ones: seen twice, so both switches get as many examples
            iname, ic = image_of[rule_image(a["pitch"], a["count"])]
            inst.append({"input_audio": n, "output_image": iname, "image_captions": [ic], "conversations": [
                {"from": "human", "value": "<audio>\n" + CROSS["audio", "image"]},
                {"from": "gpt", "value": ic + "<image-placeholder>"}]})
    dump(os.path.join(d, "t2x.json"), t2x)
    dump(os.path.join(d, "instruct.json"), inst)
    return {m: [(os.path.join(d, n), c) for n, c, _ in names[m]] for m in names}


def dump(path, obj):
    """JSON, indented; the folder made if missing."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def llm_corpus():
    """The world's text: (user, reply) for every dialogue the stages will show, with every caption."""
    caps = all_captions()
    turns = []
    for m, cs in caps.items():
        for c in cs:
            turns += [(STAGE1_PROMPT, c), (UNDERSTAND[m], c), (GENERATE[m].format(c), c), (c, c)]
    for c in caps["image"]:
        color, shape = c.split()[1:]
        if color in RULE_COUNT:
            turns.append((CROSS["image", "audio"], audio_caption(*rule_audio(color, shape))))
    for p in PITCHES:
        for n in (1, 2, 3):
            turns.append((CROSS["audio", "image"], image_caption(*rule_image(p, n))))
    return turns


# ----------------------------------------------------------------------------------------------------------------------
# Backbones: the project's classes at toy size, pretrained on the world

def char_vocab(kind):
    """A vocabulary of single bytes (no merges) in the tokenizer-folder format of CLIP (with </w> ends) or RoBERTa."""
    from encoder import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    if kind == "clip":
        return chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return ["<s>", "<pad>", "</s>", "<unk>"] + chars


def train_sentencepiece(text, vocab_size, prefix, add_dummy_prefix=True):
    """A LLaMA-style sentencepiece model (no normalisation, spaces kept, digits split) trained on text.
    add_dummy_prefix=False: "###" alone is one piece (with the prefix it is ['▁', '###']), as 835 is in LLaMA's."""
    import sentencepiece as spm
    with open(prefix + ".txt", "w") as f:
        f.write(text)
    spm.SentencePieceTrainer.train(
        input=prefix + ".txt", model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, user_defined_symbols=["###", "\n"], byte_fallback=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False,
        add_dummy_prefix=add_dummy_prefix, num_threads=1, minloglevel=2)
    return prefix + ".model"


BAR_POSITION = 0  # the tqdm line of this process (build_backbones runs two)


def fit(desc, steps, params, loss_fn, lr, warmup=20):
    """AdamW with linear warmup and cosine decay; loss_fn(step) -> scalar. Returns the mean loss of the last 10%."""
    from tqdm import tqdm
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(steps), desc=desc, mininterval=2, position=BAR_POSITION)
    for i in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps))
        loss = loss_fn(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    tail = losses[-max(1, steps // 10):]
    return sum(tail) / len(tail)


def clip_tokenizer(pad_id):
    """A CLIP tokenizer over single bytes (no merges): the world's text needs no BPE."""
    from encoder import CLIPTokenizer
    vocab = {t: i for i, t in enumerate(char_vocab("clip"))}
    return CLIPTokenizer(vocab, [], pad_id=vocab["<|endoftext|>"] if pad_id == "eot" else pad_id, clean="hf")


def roberta_tokenizer():
    import decoders as dec
    return dec.RobertaTokenizer({t: i for i, t in enumerate(char_vocab("roberta"))}, [], max_length=32)


def imagebind_config():
    from encoder import ImageBindConfig
    return replace(ImageBindConfig.tiny(), out_dim=IB_DIM, vocab_size=len(char_vocab("clip")))


def encoder_inputs(files):
    """ImageBind's inputs through the loaders NExT-GPT itself uses (224 px, fbanks), one clip each, kept in fp16."""
    import encoder
    out = {}
    for m, rows in files.items():
        if m == "image":
            xs = [encoder.load_image(p) for p, _ in rows]
        elif m == "video":
            xs = [encoder.load_video(p)[0] for p, _ in rows]  # a 1 s GIF: 5 x 3 identical clips of frames 0 and 7
        else:
            xs = [encoder.load_audio(p)[0] for p, _ in rows]  # 1 s: 3 identical clips
        out[m] = torch.stack(xs).half()
    return out


SIZE_PATCHES = 224 // 14  # ImageBind's patch grid


def sincos_2d(n, dim):
    """(n * n, dim) 2-D sine-cosine positions, row-major: x in the first half of the channels, y in the second."""
    q = dim // 4
    freqs = 1.0 / 100 ** (torch.arange(q) / q)
    ys, xs = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
    angles = [a.flatten()[:, None] * freqs for a in (xs, ys)]  # 2 x (n * n, q)
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)


def train_imagebind(cfg, files, log):
    """InfoNCE of each modality against the text tower's embeddings of every caption of that modality."""
    from encoder import ImageBind
    torch.manual_seed(cfg.seed)  # each backbone draws its own init, whatever the others consumed
    ib = ImageBind(imagebind_config(), modalities=("vision", "audio", "text"))
    # The vision patches' positions start as strong 2-D sine-cosine ones (MAE's fixed positions, x 3), and learn from
    # there (ImageBind-huge learns its own from a small init). Telling "moving left" from "moving right" needs where
    # the shape is in each of the clip's two frames: from the usual small init the loss sat at log 4 on the motion
    # (measured: 2,000 steps, bigger trunks too); with these positions kept fixed, held-out video retrieval was 96/96
    # but image retrieval 85%; learnt from them, 96/96 and 93% (and the training loss 0.01 instead of 1.0).
    pos = ib.modality_preprocessors.vision.pos_embedding_helper.pos_embed  # (1, 1 + 16 * 16, IB_DIM), CLS first
    with torch.no_grad():
        pos[0, 1:] = 3.0 * sincos_2d(SIZE_PATCHES, pos.shape[-1])
    tok = clip_tokenizer(pad_id=0)  # ImageBind pads with 0 and reads the EOT position by argmax
    X = encoder_inputs(files)
    caps = all_captions()
    ids = {m: tok(caps[m]) for m in caps}  # (n_captions, 77)
    labels = {m: torch.tensor([caps[m].index(c) for _, c in files[m]]) for m in files}
    # every video's first frame is one more image of its shape and color
    X["image"] = torch.cat([X["image"], X["video"][:, :, 0]])  # (N + N_video, 3, 224, 224)
    first = [image_caption(**{k: v for k, v in parse_caption(c).items() if k != "motion"}) for _, c in files["video"]]
    labels["image"] = torch.cat([labels["image"], torch.tensor([caps["image"].index(c) for c in first])])
    B = cfg.batch // 2
    g = torch.Generator().manual_seed(cfg.seed)

    def loss_fn(step):
        loss = 0.0
        for m in ("image", "video", "audio"):
            idx = torch.randint(len(X[m]), (2 * B if m == "video" else B,), generator=g)  # motion: the hard part
            x = X[m][idx].float()
            x = x[:, None] if m == "video" else x  # (B, 1 clip, 3, 2, 224, 224)
            emb = ib.embed("audio" if m == "audio" else "vision", x)  # (B, IB_DIM), unit norm
            text = F.normalize(ib._pooled("text", ids[m]), dim=-1)  # (n_captions, IB_DIM)
            loss = loss + F.cross_entropy(emb @ text.T / 0.07, labels[m][idx])
        return loss / 3

    ib.train()
    log["imagebind"] = fit("imagebind", cfg.imagebind_steps, ib.parameters(), loss_fn, 1e-3)
    return ib.eval()


def llm_config(vocab_size):
    from llm import LLaMAConfig
    return LLaMAConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=vocab_size, hidden_dim=344,
                       max_seq_len=256)


def train_llm(cfg, folder, log):
    """LLaMA on the world's dialogues (next-token), with its own sentencepiece; saved as an HF folder."""
    import llm
    turns = llm_corpus()
    os.makedirs(folder, exist_ok=True)
    text = "\n".join(f"### Human: {u}\n### Assistant: {r}\n###" for u, r in turns)
    # NextGPT.reply stops only on a one-piece stop text: "###" must be one piece, so no dummy prefix
    sp_path = train_sentencepiece(text * 3, 256, os.path.join(folder, "..", "sp"), add_dummy_prefix=False)
    tok = llm.Tokenizer(sp_path)
    torch.manual_seed(cfg.seed)
    model = llm.LLaMA(llm_config(tok.sp.get_piece_size()))
    # tokenized as NextGPT.prompt_embeds does: the prompt (ending in "Assistant: ") and the reply apart. Generation
    # ends the prompt at "Assistant:", so the model must have learnt that the space comes next.
    seqs = [torch.tensor(tok.encode(f"### Human: {u}\n### Assistant: ") + tok.encode(f"{r}\n###", bos=False)
                         + [tok.eos_id]) for u, r in turns]
    g = torch.Generator().manual_seed(cfg.seed)

    def loss_fn(step):
        batch = [seqs[i] for i in torch.randint(len(seqs), (32,), generator=g)]
        T = max(len(s) for s in batch)
        x = torch.full((len(batch), T), -100)
        for b, s in enumerate(batch):
            x[b, :len(s)] = s
        logits = model(x.clamp(min=0))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), ignore_index=-100)

    model.train()
    log["llm"] = fit("llm", cfg.llm_steps, model.parameters(), loss_fn, 3e-3)
    model.eval().save_pretrained(folder, sp_path)
    return model


def vae_config(in_channels):
    from decoders import VAEConfig
    # 3 levels: 32 x 32 pixels -> 8 x 8 latents; 100 x 32 mels -> 25 x 8
    return VAEConfig(in_channels=in_channels, out_channels=in_channels, latent_channels=4,
                     block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)


def train_vae(cfg, x, steps, desc, log, salient):
    """AutoencoderKL on x (N, C, H, W): L1 reconstruction + a small KL, then the scaling factor that gives the
    latents unit variance (SD's 0.18215 is the same idea). The salient pixels (the shape, the beep's mel bands: ~10%
    of each picture) weigh 10x: with a plain mean the VAE learns the black background and the shape's outline first,
    and its color last. For pictures, salient() must cover the ring just outside the shape too: when only the shape
    weighed 10x, missing a corner cost 10x more than painting one, so circles came back as rounded squares (measured
    on 96 held-out images: shape right in 63-70 reconstructions after 1,000-2,500 steps; with the ring, 96 at 1,000)."""
    from decoders import VAE
    torch.manual_seed(cfg.seed)
    vae = VAE(vae_config(x.shape[1]))
    g = torch.Generator().manual_seed(cfg.seed)

    def loss_fn(step):
        xb = x[torch.randint(len(x), (cfg.batch,), generator=g)]
        mean, logvar = vae.encode(xb)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        w = 1 + 9 * salient(xb).float()
        return ((vae.decode(z) - xb).abs() * w).mean() + 1e-4 * kl

    vae.train()
    log[desc] = fit(desc, steps, vae.parameters(), loss_fn, 2e-3)
    vae.eval().requires_grad_(False)
    vae.cfg.scaling_factor = 1.0
    vae.cfg.scaling_factor = float(1 / latents(vae, x).std())  # the unscaled latents' std
    return vae


def latents(vae, x):
    with torch.no_grad():
        return torch.cat([vae.encode(x[i:i + 64])[0] for i in range(0, len(x), 64)]) * vae.cfg.scaling_factor


def pixels(a):
    """uint8 media (..., H, W, 3) -> what the VAE reads: float in [-1, 1], (..., 3, H, W)."""
    return a.float().div(127.5).sub(1).movedim(-1, -3)


def video_latents(vae, clips):
    """uint8 clips (N, F, H, W, 3) -> latents (N, 4, F, h, w): every frame through the image VAE, as Zeroscope does."""
    return latents(vae, pixels(clips).flatten(0, 1)).unflatten(0, clips.shape[:2]).transpose(1, 2)


DDIM_CONFIG = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_schedule="scaled_linear",
                   beta_start=0.00085, beta_end=0.012, set_alpha_to_one=False, steps_offset=1, clip_sample=False)


# The video decoder's: zero terminal SNR, so that the first sampling step sees pure noise as training did and has to
# take the clip's layout (where the shape starts, which way it goes) from the caption; then eps is undefined at the
# last step, hence v-prediction; trailing steps start sampling there (README, "text -> video")
VIDEO_DDIM_CONFIG = {**DDIM_CONFIG, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                     "timestep_spacing": "trailing", "steps_offset": 0}


def sampler(kind="image"):
    import decoders as dec
    return dec.DDIM(**{k: v for k, v in (VIDEO_DDIM_CONFIG if kind == "video" else DDIM_CONFIG).items()
                       if k != "_class_name"})


def train_unet(cfg, kind, unet, text_encoder, z, captions, steps, log, train_text=True):
    """
    Denoising (eps or v, as sampler(kind) says) on latents z (N, C, [F,] h, w), conditioned on the decoder's own text
    encoder. With train_text the text encoder learns together with the UNet (the official decoders come with theirs
    pretrained; here both learn the world together); without, it stays as it is. 10% of captions are dropped to "",
    the unconditional embedding NExT-GPT passes for classifier-free guidance.
    """
    tok = roberta_tokenizer() if kind == "audio" else clip_tokenizer(pad_id="eot")
    unique = sorted(set(captions)) + [""]
    cap_idx = torch.tensor([unique.index(c) for c in captions])
    ids = tok(unique)
    s = sampler(kind)
    g = torch.Generator().manual_seed(cfg.seed)
    B = cfg.batch if kind != "video" else max(2, cfg.batch // 4)
    if not train_text:
        with torch.no_grad():
            fixed = text_encoder.eval()(ids)  # (n_captions, 77, W): computed once

    def loss_fn(step):
        idx = torch.randint(len(z), (B,), generator=g)
        ci = cap_idx[idx].clone()
        ci[torch.rand(B, generator=g) < 0.1] = len(unique) - 1
        spread = 0.0
        if kind == "audio":  # CLAP: normalised projection (B, 32), the class label of AudioLDM's UNet
            emb = F.normalize(text_encoder(*ids), dim=-1)  # (n_captions, 32)
            cond = emb[ci]
            # CLAP's contrastive training keeps different captions apart; without it the pooled <s> token starts the
            # same for every caption and the diffusion loss alone never separates them (the UNet then ignores the
            # label). The mean squared cosine between different captions stands in for it.
            spread = ((emb @ emb.T) ** 2 - torch.eye(len(emb))).mean()
        else:
            cond = (text_encoder(ids) if train_text else fixed)[ci]  # (B, 77, W)
        z0 = z[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, s.num_train_timesteps, (B,), generator=g)
        if kind == "video":  # half of each batch at t >= 850, where only the caption can set the direction
            t[::2] = torch.randint(850, s.num_train_timesteps, t[::2].shape, generator=g)
        x_t = s.add_noise(z0, noise, t)
        out = unet(x_t, t, None, class_labels=cond) if kind == "audio" else unet(x_t, t, cond)
        return F.mse_loss(out, s.target(z0, noise, t)) + spread

    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    unet.train(), text_encoder.train(train_text)
    log[f"{kind} unet"] = fit(f"{kind} unet", steps, params, loss_fn, 2e-3)
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


def motion_text_encoder(cfg, image_enc, captions, log):
    """
    The video decoder's own text encoder (Zeroscope has its own, OpenCLIP's), from the image decoder's. That one
    learned on image captions, which never say "moving ...": after the caption its tokens (EOT and padding, all that
    a causal encoder can fill once it has read the last word) told the four directions apart by 0.2 where colors were
    2.6 apart (measured), and the video UNet never tied the direction to the caption. Here those tokens learn to carry
    a code per direction, the same in every caption that says it and large beside the rest (as a big pretrained
    encoder's feature for a word is), on top of what they carried; every other token, and the empty caption of
    classifier-free guidance, are held to theirs (README, "text -> video").
    """
    enc = copy.deepcopy(image_enc).train().requires_grad_(True)
    unique = sorted(set(captions))
    ids = clip_tokenizer(pad_id="eot")(unique + [""])  # (n + 1, 77)
    with torch.no_grad():
        before = enc(ids)  # (n + 1, 77, W)
    eot = ids[0, -1]
    after = torch.arange(ids.shape[1]) >= (ids == eot).int().argmax(1, keepdim=True)  # (n + 1, 77): EOT on
    after[-1] = False  # the empty caption
    g = torch.Generator().manual_seed(cfg.seed)
    code = 3.0 * torch.randn(len(MOTIONS), before.shape[-1], generator=g)  # (4, W), about 3x a token's norm
    motion = torch.tensor([list(MOTIONS).index(parse_caption(c)["motion"]) for c in unique] + [0])  # "": no code
    target = before + after[..., None] * code[motion][:, None]  # (n + 1, 77, W)
    log["video text encoder"] = fit("video text encoder", cfg.motion_text_steps, enc.parameters(),
                                    lambda step: F.mse_loss(enc(ids), target), 5e-3)
    return enc.eval().requires_grad_(False)


def inflate(cfg, image_unet):
    """
    The video UNet from the image one, as Zeroscope's ancestor ModelScope T2V starts from Stable Diffusion: every
    spatial tensor copied (the image blocks' 1x1-conv proj_in/out become the video blocks' linear ones), the temporal
    layers' last projections zeroed, so that at step 0 it draws every frame as the image UNet does and training has
    only the motion left to learn (48 video classes from scratch need far more CPU than the budget).
    """
    import decoders as dec
    torch.manual_seed(cfg.seed)
    video = dec.UNet3D(unet_config("video"))
    sd = video.state_dict()  # views of the parameters
    with torch.no_grad():
        for k, v in image_unet.state_dict().items():
            sd[k].copy_(v.reshape(sd[k].shape))
        for k, v in sd.items():
            # the temporal convs' last conv starts at zero already (TemporalConv); the temporal attentions' output too
            if ("temp_attentions" in k or k.startswith("transformer_in.")) and ".proj_out." in k:
                v.zero_()
    return video.requires_grad_(True)


def unet_config(kind):
    from decoders import UNetConfig
    base = UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                      attention_head_dim=(2, 4), cross_attention_dim=W_IMAGE, norm_num_groups=8,
                      down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2)
    # heads of 16 channels everywhere: the 2-D blocks read attention_head_dim as the number of heads, the 3-D ones
    # (Zeroscope) as their width, so (2, 4) and 16 are the same attention and inflate() copies the image UNet exactly
    if kind == "video":
        return replace(base, video=True, attention_head_dim=16, use_linear_projection=True, temporal_positions=FRAMES,
                       down_block_types=("CrossAttnDownBlock3D",) * 2, up_block_types=("CrossAttnUpBlock3D",) * 2)
    if kind == "audio":  # AudioLDM: the text embedding is a class label; attn2 attends to the image itself
        return replace(base, sample_size=25, cross_attention_dim=(32, 64), class_embed_type="simple_projection",
                       projection_class_embeddings_input_dim=W_AUDIO, class_embeddings_concat=True)
    return base


def new_unet(cfg, kind):
    import decoders as dec
    torch.manual_seed(cfg.seed)
    return dec.UNet2D(unet_config(kind)), text_encoder(kind)


def text_encoder(kind):
    import decoders as dec
    if kind == "audio":
        return dec.CLAPTextEncoder(dec.CLAPTextConfig(
            vocab_size=len(char_vocab("roberta")), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=40, projection_dim=W_AUDIO, layer_norm_eps=1e-5))
    return dec.CLIPTextEncoder(dec.CLIPTextConfig(vocab_size=len(char_vocab("clip")), hidden_size=W_IMAGE,
                                                  intermediate_size=2 * W_IMAGE, num_hidden_layers=2,
                                                  num_attention_heads=2))


def vocoder_config():
    from decoders import HiFiGANConfig
    # one transposed convolution from each 10 ms frame to its 160 samples (a learned template per frame), then the
    # usual multi-receptive-field resblocks at 16 kHz
    return HiFiGANConfig(model_in_dim=N_MELS, upsample_initial_channel=32, upsample_rates=(HOP,),
                         upsample_kernel_sizes=(HOP,), resblock_kernel_sizes=(3, 7),
                         resblock_dilation_sizes=((1, 3), (1, 3)))


def log_mel(wave):
    """(samples,) -> (100, N_MELS): train.py's AudioLDM log-mel, the frames the VAE and the vocoder see."""
    from train import mel_spectrogram
    return mel_spectrogram(wave, N_MELS, HOP)[:int(SR * SECONDS) // HOP]


def stft_loss(y, x):
    """Multi-resolution log-magnitude STFT L1 (Parallel WaveGAN's auxiliary loss, the log part)."""
    loss = 0.0
    for n in (256, 512, 1024):
        w = torch.hann_window(n)
        Y, X = (torch.stft(a, n, n // 4, n, w, return_complex=True).abs() for a in (y, x))
        loss = loss + F.l1_loss(torch.log(Y + 1e-5), torch.log(X + 1e-5)) + (Y - X).norm() / (X.norm() + 1e-5)
    return loss / 3


def train_vocoder(cfg, waves, mels, log):
    """HiFi-GAN's generator on mel -> wave: waveform MSE (the world's tones are phase-locked, see make_audio) plus the
    STFT losses; no discriminators. Not L1: its gradient is only a sign, and from a slightly wrong phase the best L1
    answer is silence (measured: with L1 the high beeps came out at peak 0.01, in two variants every beep; with MSE
    all 18 test beeps have the right pitch and count after 400 steps)."""
    import decoders as dec
    torch.manual_seed(cfg.seed)
    voc = dec.HiFiGAN(vocoder_config())
    g = torch.Generator().manual_seed(cfg.seed)

    def loss_fn(step):
        idx = torch.randint(len(waves), (8,), generator=g)
        y = voc(mels[idx])  # (8, 16000)
        return F.mse_loss(y, waves[idx]) * 100 + stft_loss(y, waves[idx]) * 0.1

    voc.train()
    log["vocoder"] = fit("vocoder", cfg.vocoder_steps, voc.parameters(), loss_fn, 2e-3)
    return voc.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# Writing the backbones in the official on-disk formats

def save_safetensors(module, path, rename=lambda k: k):
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({rename(k): v.detach().contiguous() for k, v in module.state_dict().items()}, path)


CLAP_OFFICIAL = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                 "attention_dense": "attention.output.dense", "attention_norm": "attention.output.LayerNorm",
                 "intermediate": "intermediate.dense", "output": "output.dense", "output_norm": "output.LayerNorm"}


def clap_official_name(k):
    """Ours -> transformers ClapTextModelWithProjection (decoders._clap_rename read backwards)."""
    if k.startswith("layers."):  # layers.N.<ours>.weight -> text_model.encoder.layer.N.<official>.weight
        _, n, name, leaf = k.split(".")
        return f"text_model.encoder.layer.{n}.{CLAP_OFFICIAL[name]}.{leaf}"
    if k.startswith("pooler."):
        return "text_model.pooler.dense." + k[len("pooler."):]
    return "text_model." + k if k.startswith("embeddings.") else k


def save_vocoder(folder, vocoder):
    """AudioLDM's vocoder/ (transformers SpeechT5HifiGan)."""
    dump(os.path.join(folder, "vocoder", "config.json"), {"architectures": ["SpeechT5HifiGan"], **asdict(vocoder.cfg)})
    save_safetensors(vocoder, os.path.join(folder, "vocoder", "model.safetensors"))


def save_decoder(folder, kind, unet, vae, enc):
    """A diffusers pipeline folder: unet/ vae/ scheduler/ text_encoder/ tokenizer/, the official names."""
    sub = lambda *p: os.path.join(folder, *p)  # noqa: E731
    c = {k: v for k, v in asdict(unet.cfg).items() if k != "video"}
    dump(sub("unet", "config.json"), {"_class_name": "UNet3DConditionModel" if unet.cfg.video
                                     else "UNet2DConditionModel", **c})
    save_safetensors(unet, sub("unet", "diffusion_pytorch_model.safetensors"))
    n = len(vae.cfg.block_out_channels)
    dump(sub("vae", "config.json"), {"_class_name": "AutoencoderKL", **asdict(vae.cfg),
                                    "down_block_types": ["DownEncoderBlock2D"] * n,
                                    "up_block_types": ["UpDecoderBlock2D"] * n})
    save_safetensors(vae, sub("vae", "diffusion_pytorch_model.safetensors"))
    dump(sub("scheduler", "scheduler_config.json"), VIDEO_DDIM_CONFIG if kind == "video" else DDIM_CONFIG)
    if kind == "audio":
        dump(sub("text_encoder", "config.json"), {"architectures": ["ClapTextModelWithProjection"], **asdict(enc.cfg)})
        save_safetensors(enc, sub("text_encoder", "model.safetensors"), clap_official_name)
        vocab, special = char_vocab("roberta"), {"tokenizer_config.json": {"model_max_length": 32}}
    else:
        dump(sub("text_encoder", "config.json"), {"architectures": ["CLIPTextModel"], **asdict(enc.cfg)})
        save_safetensors(enc, sub("text_encoder", "model.safetensors"), lambda k: "text_model." + k)
        vocab, special = char_vocab("clip"), {"special_tokens_map.json": {"pad_token": "<|endoftext|>"}}
    dump(sub("tokenizer", "vocab.json"), {t: i for i, t in enumerate(vocab)})
    with open(sub("tokenizer", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")  # no merges: one token per byte
    for name, obj in special.items():
        dump(sub("tokenizer", name), obj)


def toy_config(vocab_size):
    from nextgpt import NextGPTConfig
    return NextGPTConfig(llm=llm_config(vocab_size), imagebind=imagebind_config(),
                         signal_tokens={"image": 4, "video": 8, "audio": 4},
                         cond_shape={"image": (77, W_IMAGE), "video": (77, W_IMAGE), "audio": (1, W_AUDIO)},
                         proj_hidden=64, proj_layers=1, proj_heads=2, lora_r=8, lora_alpha=16, lora_dropout=0.0)


BACKBONE_FILES = {"imagebind": "imagebind.safetensors", "vicuna": "llama", "image": "image", "video": "video",
                  "audio": "audio"}


def write_manifest(folder, config, files):
    dump(os.path.join(folder, "nextgpt.json"), {"config": config.to_dict(), "files": files})


def build_backbones(cfg, files):
    """Train every stand-in and write the folder train.py --ckpt and NextGPT.from_pretrained read. -> losses.
    The backbones are independent, so two lanes of about equal length run side by side, one process (and one
    thread) per core: LLaMA, ImageBind and the audio decoder with its vocoder; the picture decoders (image VAE, image
    and video UNets). Each backbone seeds its own init, so the result does not depend on the lanes."""
    folder = os.path.join(cfg.out, "backbones")
    shutil.rmtree(os.path.join(cfg.out, "features"), ignore_errors=True)  # cached outputs of the old backbones
    t0 = time.time()
    lanes = (understanding_lane, picture_lane)
    if cfg.workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            logs = [f.result() for f in [pool.submit(lane, cfg, files, folder, k) for k, lane in enumerate(lanes)]]
    else:
        logs = [lane(cfg, files, folder, 0) for lane in lanes]
    log = {k: v for lg in logs for k, v in lg.items()}
    from llm import LLaMAConfig
    vocab_size = LLaMAConfig.from_hf(os.path.join(folder, "llama", "config.json")).vocab_size  # its tokenizer's
    write_manifest(folder, toy_config(vocab_size), BACKBONE_FILES)
    log["seconds"] = round(time.time() - t0)
    dump(os.path.join(folder, "losses.json"), log)
    return log


def lane_start(cfg, position):
    """A lane's process: one thread, and its own tqdm line."""
    global BAR_POSITION
    torch.set_num_threads(cfg.threads)
    BAR_POSITION = position


def understanding_lane(cfg, files, folder, position):
    lane_start(cfg, position)
    log = {}
    train_llm(cfg, os.path.join(folder, "llama"), log)
    ib = train_imagebind(cfg, files, log)
    save_safetensors(ib, os.path.join(folder, "imagebind.safetensors"))
    del ib
    mels = torch.stack([log_mel(torch.from_numpy(read_media("audio", p))) for p, _ in files["audio"]])  # (N, 100, M)
    avae = train_vae(cfg, mels[:, None], cfg.audio_vae_steps, "audio vae", log,
                     salient=lambda x: x > -6)  # silence is log(1e-5) = -11.5
    unet, enc = train_unet(cfg, "audio", *new_unet(cfg, "audio"), latents(avae, mels[:, None]),
                           [c for _, c in files["audio"]], cfg.audio_steps, log)
    save_decoder(os.path.join(folder, "audio"), "audio", unet, avae, enc)
    waves = torch.stack([torch.from_numpy(read_media("audio", p)) for p, _ in files["audio"]])
    voc = train_vocoder(cfg, waves, torch.stack([log_mel(w) for w in waves]), log)
    save_vocoder(os.path.join(folder, "audio"), voc)
    return log


def picture_lane(cfg, files, folder, position):
    lane_start(cfg, position)
    log = {}
    # images and videos share one VAE (Zeroscope uses Stable Diffusion's too)
    img = torch.stack([torch.from_numpy(read_media("image", p)) for p, _ in files["image"]])
    vid = torch.stack([torch.from_numpy(read_media("video", p)) for p, _ in files["video"]])  # (N, F, H, W, 3)
    frames = pixels(vid).flatten(0, 1)  # (N * F, 3, H, W)
    vae = train_vae(cfg, torch.cat([pixels(img), frames[::2]]), cfg.vae_steps, "image vae", log,
                    salient=lambda x: F.max_pool2d((x.amax(1, keepdim=True) > -0.6).float(), 3, 1, 1) > 0)
    unet, enc = train_unet(cfg, "image", *new_unet(cfg, "image"), latents(vae, pixels(img)),
                           [c for _, c in files["image"]], cfg.unet_steps, log)
    save_decoder(os.path.join(folder, "image"), "image", unet, vae, enc)
    video_caps = [c for _, c in files["video"]]
    video_enc = motion_text_encoder(cfg, enc, video_caps, log)  # its own text encoder, as Zeroscope's
    video, _ = train_unet(cfg, "video", inflate(cfg, unet), video_enc, video_latents(vae, vid), video_caps,
                          cfg.video_steps, log, train_text=False)
    save_decoder(os.path.join(folder, "video"), "video", video, vae, video_enc)
    return log


# ----------------------------------------------------------------------------------------------------------------------
# The three NExT-GPT stages: train.py, unchanged, on the toy folder

def stage_commands(cfg):
    """The train.py command lines of the recipe (printed by --recipe, run in-process through train.main)."""
    d, ckpt, feats = (os.path.join(cfg.out, x) for x in ("data", "backbones", "features"))
    pairs = ",".join(os.path.join(d, f) for f in ("cc3m.json", "webvid.json", "audiocap.json"))
    inst = ",".join(os.path.join(d, f) for f in ("t2x.json", "instruct.json"))
    cmds = []
    for k, data in enumerate((pairs, pairs, inst)):
        stage = k + 1
        args = [f"--stage={stage}", f"--ckpt={ckpt}", f"--data={data}", f"--features_dir={feats}",
                f"--out_dir={os.path.join(cfg.out, f'stage{stage}')}", f"--epochs={cfg.stage_epochs[k]}",
                f"--batch_size={cfg.stage_batch}", f"--lr={cfg.stage_lr[k]}", f"--seed={cfg.seed}", "--log_every=0",
                "--device=cpu"]  # --prepare does not resolve the default "auto" (train.py builds the model first)
        if stage == 2:
            args.append(f"--denoise_weight={cfg.denoise}")
        if stage > 1:
            args.append(f"--delta={latest(cfg, stage - 1)}/nextgpt.safetensors")
        cmds.append(args)
    return cmds


def latest(cfg, stage):
    folder = os.path.join(cfg.out, f"stage{stage}")
    path = os.path.join(folder, "latest")
    return os.path.join(folder, open(path).read().strip() if os.path.isfile(path) else "step_<latest>")


def run_stages(cfg):
    """--prepare (ImageBind features and caption embeddings, once), then stages 1, 2, 3. -> {stage: final losses}."""
    import train
    path = os.path.join(cfg.out, "stage_losses.json")
    seconds = {int(k): v.get("seconds") for k, v in json.load(open(path)).items()} if os.path.isfile(path) else {}
    for stage in range(cfg.first_stage, 4):
        args = stage_commands(cfg)[stage - 1]
        print("python train.py " + " ".join(args), flush=True)
        t0 = time.time()
        shutil.rmtree(os.path.join(cfg.out, f"stage{stage}"), ignore_errors=True)  # train.py appends to its log
        train.main(["--prepare"] + [a for a in args if not a.startswith("--delta")])
        train.main(args)
        seconds[stage] = round(time.time() - t0)
    return stage_losses(cfg, seconds)


def stage_losses(cfg, seconds):
    """Each stage's losses, the mean over its last 10% of steps (from train.py's log) -> stage_losses.json."""
    out = {}
    for stage in (1, 2, 3):
        with open(os.path.join(cfg.out, f"stage{stage}", "log.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        tail = rows[-max(1, len(rows) // 10):]
        out[stage] = {}
        for k in ("nll", "align", "denoise"):
            values = [r[k] for r in tail if k in r]
            if values:
                out[stage][k] = round(sum(values) / len(values), 4)
        out[stage].update(steps=len(rows), seconds=seconds.get(stage))
    dump(os.path.join(cfg.out, "stage_losses.json"), out)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: held-out media and prompts, scored by the measurers

TASKS = ("image -> text", "video -> text", "audio -> text", "text -> image", "text -> video", "text -> audio",
         "image -> audio (rule)", "audio -> image (rule)")
CHANCE = dict(zip(TASKS, (1 / 12, 1 / 48, 1 / 9, 1 / 12, 1 / 48, 1 / 9, 1 / 9, 1 / 12)))


def to_uint8(x):
    """(3, H, W) or (F, 3, H, W) in [0, 1] -> (H, W, 3) or (F, H, W, 3) uint8."""
    return (x.clamp(0, 1).movedim(-3, -1).numpy() * 255).round().astype(np.uint8)


def generation_kwargs(cfg):
    guidance = {"image": cfg.guidance, "video": cfg.video_guidance, "audio": cfg.guidance}
    return dict(max_new_tokens=24, steps=cfg.sample_steps, guidance=guidance, height=SIZE, width=SIZE,
                frames=FRAMES, seconds=SECONDS, progress=False)


def eval_cases(cfg):
    """[(task, prompt, input (modality, media) or None, expected caption of the reply, expected measures)]: media
    drawn from a seed training never used (new positions, pitches, timings)."""
    rng = random.Random(cfg.seed + 1000)
    cases = []
    for k in range(cfg.eval_n):
        c, s, m = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(MOTIONS))
        p, n = rng.choice(list(PITCHES)), rng.randint(1, 3)
        rc = rng.choice(list(RULE_COUNT))
        ic, vc, ac = image_caption(c, s), video_caption(c, s, m), audio_caption(p, n)
        cases += [
            ("image -> text", UNDERSTAND["image"], ("image", make_image(rng, c, s)), ic, None),
            ("video -> text", UNDERSTAND["video"], ("video", make_video(rng, c, s, m)), vc, None),
            ("audio -> text", UNDERSTAND["audio"], ("audio", make_audio(rng, p, n)), ac, None),
            ("text -> image", GENERATE["image"].format(ic), None, ic, ("image", (c, s))),
            ("text -> video", GENERATE["video"].format(vc), None, vc, ("video", (c, s, m))),
            ("text -> audio", GENERATE["audio"].format(ac), None, ac, ("audio", (p, n))),
            ("image -> audio (rule)", CROSS["image", "audio"], ("image", make_image(rng, rc, s)),
             audio_caption(*rule_audio(rc, s)), ("audio", rule_audio(rc, s))),
            ("audio -> image (rule)", CROSS["audio", "image"], ("audio", make_audio(rng, p, n)),
             image_caption(*rule_image(p, n)), ("image", rule_image(p, n))),
        ]
    return cases


def evaluate(cfg, ckpt):
    """Accuracy per task: understanding by exact match of the reply, generation by measuring the output media (an
    output the model did not produce counts as wrong: no `want` forcing). Also the reply's caption for generation
    tasks, to tell LLM failures from projector / decoder ones. -> {task: accuracy}"""
    import tempfile
    from nextgpt import NextGPT
    t0 = time.time()
    model = NextGPT.from_pretrained(ckpt, dtype=torch.float32, device="cpu")
    kw = generation_kwargs(cfg)
    measure = {"image": lambda x: (measure_color(x), measure_shape(x)), "video": measure_video,
               "audio": measure_audio}
    save = {"image": save_png, "video": save_gif, "audio": save_wav}
    ext = {"image": ".png", "video": ".gif", "audio": ".wav"}
    score = {t: [0, 0, 0] for t in TASKS}  # right media / right reply / count
    with tempfile.TemporaryDirectory() as d:
        from tqdm import tqdm
        for k, (task, prompt, inp, caption, want) in enumerate(tqdm(eval_cases(cfg), desc="eval", mininterval=2)):
            media = {}
            if inp:
                path = os.path.join(d, f"{k}{ext[inp[0]]}")
                save[inp[0]](path, inp[1])
                media = {inp[0] + "s": [path]}
            out = model.generate(prompt, **media, **kw, seed=cfg.eval_seed + k)
            reply_ok = out["text"].strip().rstrip(".") == caption
            if want is None:
                ok = reply_ok
            else:
                m, expected = want
                got = out[m][0] if out[m] else None
                ok = got is not None and measure[m](got.numpy() if m == "audio" else to_uint8(got)) == expected
            score[task][0] += ok
            score[task][1] += reply_ok
            score[task][2] += 1
    acc = {t: s[0] / s[2] for t, s in score.items()}
    print(f"\n{ckpt}: {cfg.eval_n} held-out prompts per task, {cfg.sample_steps} DDIM steps, guidance {cfg.guidance} "
          f"(video {cfg.video_guidance}), noise seeds {cfg.eval_seed} + prompt")
    print("| task | accuracy | reply caption exact | chance |\n| --- | --- | --- | --- |")
    for t, (ok, rep, n) in score.items():
        print(f"| {t} | {ok / n:.0%} ({ok}/{n}) | {rep / n:.0%} | {CHANCE[t]:.0%} |")
    print(f"eval took {time.time() - t0:.0f} s")
    dump(os.path.join(cfg.out, "eval.json"), {"ckpt": ckpt, "accuracy": acc,
                                              "reply": {t: s[1] / s[2] for t, s in score.items()}})
    return acc


def probe_video(cfg, ckpt, per_class=2):
    """
    Does the video decoder read the caption's direction? Its denoising loss on fresh clips (per_class for each of
    the 48 captions) at six noise levels, given the true caption, the same caption with the opposite direction, and ""
    (the unconditional one). A decoder that ties the motion to the caption has a clearly lower loss with the true
    caption than with the opposite one. -> {t: {"true": loss, "opposite": loss, "unconditional": loss}}
    """
    from nextgpt import NextGPT
    d = NextGPT.from_pretrained(ckpt, dtype=torch.float32, device="cpu", decoders=("video",)).decoder("video")
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    rng = random.Random(cfg.seed + 2000)
    rows = [(c, s, m) for c in COLORS for s in SHAPES for m in MOTIONS] * per_class
    z0 = video_latents(d.vae, torch.from_numpy(np.stack([make_video(rng, *r) for r in rows])))  # (N, 4, F, h, w)
    conds = {"true": [video_caption(*r) for r in rows],
             "opposite": [video_caption(c, s, opposite[m]) for c, s, m in rows], "unconditional": [""] * len(rows)}
    conds = {k: d.embed_text(v) for k, v in conds.items()}  # (N, 77, D) each
    g = torch.Generator().manual_seed(cfg.seed)
    print(f"{os.path.relpath(d.folder)}: mean denoising loss on {len(rows)} fresh clips")
    print("| t | " + " | ".join(conds) + " |\n" + "| --- " * (len(conds) + 1) + "|")
    table = {}
    with torch.no_grad():
        for t in (50, 200, 400, 600, 800, 950):
            noise = torch.randn(z0.shape, generator=g)
            x_t = d.sampler.add_noise(z0, noise, torch.full((len(z0),), t))
            tt = torch.full((16,), t)  # 16 clips at a time (N is a multiple of 48)
            target = d.sampler.target(z0, noise, t)  # the noise, or v for a v-prediction decoder
            table[t] = {k: float(torch.stack([F.mse_loss(d.unet(x_t[i:i + 16], tt, c[i:i + 16]), target[i:i + 16])
                                              for i in range(0, len(z0), 16)]).mean()) for k, c in conds.items()}
            print(f"| {t} | " + " | ".join(f"{v:.5f}" for v in table[t].values()) + " |")
    return table


def pictures(cfg, ckpt, folder=os.path.join(HERE, "assets")):
    """The README's pictures, generated (never drawn): every image caption, four motions, three sounds' log-mels
    (each (N_MELS, 100), low frequencies at the bottom). As sample.py does, the asked-for output is forced."""
    from PIL import Image
    from nextgpt import NextGPT
    model = NextGPT.from_pretrained(ckpt, dtype=torch.float32, device="cpu")
    kw = generation_kwargs(cfg)
    up = lambda a, k=3: np.kron(a, np.ones((k, k, 1), np.uint8))  # noqa: E731 nearest-neighbour upscaling
    caps = all_captions()
    imgs = [to_uint8(model.generate(GENERATE["image"].format(c), want=["image"], **kw)["image"][0])
            for c in caps["image"]]
    rows = [np.concatenate(imgs[r::3], axis=1) for r in range(3)]  # 3 rows (shapes) x 4 columns (colors)
    save_png(os.path.join(folder, "toy_text_to_image.png"), up(np.concatenate(rows, axis=0)))
    vids = [to_uint8(model.generate(GENERATE["video"].format(video_caption(c, s, m)), want=["video"], **kw)["video"][0])
            for c, s, m in (("red", "circle", "left"), ("blue", "square", "right"), ("green", "triangle", "up"),
                            ("yellow", "circle", "down"))]
    save_gif(os.path.join(folder, "toy_text_to_video.gif"), [up(f) for f in np.concatenate(vids, axis=2)])
    mels = []
    for c in ("one low beep", "two mid beeps", "three high beeps"):
        mel = log_mel(model.generate(GENERATE["audio"].format(c), want=["audio"], **kw)["audio"][0]).T.flip(0)
        mels.append(((mel.clamp(-11.5, 2) + 11.5) / 13.5 * 255).byte().numpy())
    gray = np.concatenate([np.pad(m, ((0, 0), (0, 4))) for m in mels], axis=1)  # low frequencies at the bottom
    Image.fromarray(np.kron(gray, np.ones((3, 3), np.uint8))).save(os.path.join(folder, "toy_text_to_audio.png"))
    print(f"pictures written to {folder}/toy_text_to_*")


# ----------------------------------------------------------------------------------------------------------------------
# Shipping: assets/toy, the built-in default of `python sample.py`

def ship(cfg, step_folder, dest=ASSETS):
    """The backbones (decoder UNets in fp16: the 20 MB budget; from_pretrained casts them back when given a dtype, as
    sample.py does) + the stage-3 delta + a manifest + example.png (a held-out image)."""
    from safetensors.torch import load_file, save_file
    src = os.path.join(cfg.out, "backbones")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("losses.json", "sp.*"))
    for m in ("image", "video", "audio"):
        path = os.path.join(dest, m, "unet", "diffusion_pytorch_model.safetensors")
        save_file({k: v.half() for k, v in load_file(path).items()}, path)
    shutil.copy(os.path.join(step_folder, "nextgpt.safetensors"), os.path.join(dest, "nextgpt.safetensors"))
    with open(os.path.join(src, "nextgpt.json")) as f:
        manifest = json.load(f)
    manifest["files"]["delta"] = "nextgpt.safetensors"
    # what sample.py should generate with (its own defaults are the official 512 px, 24 frames, 9 s)
    manifest["sample"] = {k: v for k, v in generation_kwargs(cfg).items() if k != "progress"}
    dump(os.path.join(dest, "nextgpt.json"), manifest)
    save_png(os.path.join(dest, "example.png"), make_image(random.Random(cfg.seed + 7), "green", "triangle"))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dest) for f in fs)
    print(f"shipped {dest}: {size / 2 ** 20:.1f} MB")
    return size


# ----------------------------------------------------------------------------------------------------------------------
# A random tiny NExT-GPT: every path at toy size, offline, in seconds (tests, `sample.py --tiny-random`, train smoke)

TINY_CORPUS = """### Human: describe this image
### Assistant: a red circle on a blue square moving left, two high beeps and a low beep.
draw show play generate a caption picture video sound audio the of and with what is in it"""


def tiny_random(seed=0, input_proj="linear"):
    """NextGPTConfig.preset('tiny') with random weights, tiny ImageBind and tiny decoders (char-level tokenizers)."""
    import tempfile

    import decoders as dec
    import llm
    from encoder import ImageBind
    from nextgpt import NextGPT, NextGPTConfig
    torch.manual_seed(seed)
    config = NextGPTConfig.preset("tiny")
    config.input_proj = input_proj
    with tempfile.TemporaryDirectory() as d:
        sp_path = train_sentencepiece(TINY_CORPUS * 3, config.llm.vocab_size, os.path.join(d, "tok"))
        tok = llm.Tokenizer(sp_path, [])
        pieces = tok.sp.get_piece_size()
        tok.add_special_tokens(config.added_tokens)
        config.llm = replace(config.llm, vocab_size=pieces)  # the corpus may give fewer pieces than asked
    encoder = ImageBind(config.imagebind, modalities=("vision", "audio")).eval().requires_grad_(False)
    clip_tok, roberta_tok = clip_tokenizer(pad_id=0), roberta_tokenizer()
    W = config.cond_shape["image"][1]
    unet2d = dec.UNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=2,
                            cross_attention_dim=W, norm_num_groups=8,
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet3d = replace(unet2d, video=True, attention_head_dim=8, use_linear_projection=True,
                     cross_attention_dim=config.cond_shape["video"][1],
                     down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                     up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
    A = config.cond_shape["audio"][1]
    unet_audio = replace(unet2d, cross_attention_dim=(16, 32), class_embed_type="simple_projection",
                         projection_class_embeddings_input_dim=A, class_embeddings_concat=True)
    vae = dec.VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=16)
    vae_audio = replace(vae, in_channels=1, out_channels=1)
    clip = replace(dec.CLIP_TEXT_PRESETS["tiny"], hidden_size=W, max_position_embeddings=77)
    clap = replace(dec.CLAP_TEXT_PRESETS["tiny"], projection_dim=A, max_position_embeddings=40)
    decoders = {}
    for kind, unet_cfg, vae_cfg in (("image", unet2d, vae), ("video", unet3d, vae), ("audio", unet_audio, vae_audio)):
        unet = (dec.UNet3D if unet_cfg.video else dec.UNet2D)(unet_cfg)
        vocoder = dec.HiFiGAN(dec.HIFIGAN_PRESETS["tiny"]) if kind == "audio" else None
        d = dec.Decoder(kind, None, unet.eval(), dec.VAE(vae_cfg).eval(), sampler(kind), vocoder and vocoder.eval())
        d._text_encoder = (dec.CLAPTextEncoder(clap) if kind == "audio" else dec.CLIPTextEncoder(clip)).eval()
        d._tokenizer = roberta_tok if kind == "audio" else clip_tok
        for m in (d.unet, d.vae, d.vocoder, d._text_encoder):
            if m is not None:
                m.requires_grad_(False)
        decoders[kind] = d
    model = NextGPT(config, llm.LLaMA(config.llm), tok, encoder, decoders)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Command line

def parse(argv):
    """--small, --out=DIR, --key=value for any ToyConfig field; actions: --recipe, --stages, --eval [CKPT], --ship,
    --pictures [CKPT], --probe-video [CKPT]."""
    actions, kv, ckpt = set(), {}, None
    for a in argv:
        key, eq, value = a.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if not a.startswith("--"):
            ckpt = a
        elif eq:
            kv[key] = value
        else:
            actions.add(key)
    cfg = ToyConfig.small() if "small" in actions else ToyConfig()
    types = {k: type(v) for k, v in asdict(cfg).items()}
    for k, v in kv.items():
        if k not in types:
            raise SystemExit(f"toy.py: unknown option --{k}; options: {', '.join(types)}")
        cfg = replace(cfg, **{k: tuple(float(x) if "." in x or "e" in x else int(x) for x in v.split(","))
                              if types[k] is tuple else types[k](v)})
    return cfg, actions - {"small"}, ckpt


def main(argv):
    cfg, actions, ckpt = parse(argv)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if not actions & {"eval", "ship", "stages", "pictures", "probe_video"} or "recipe" in actions:
        t0 = time.time()
        files = write_world(cfg)
        print(f"world written to {cfg.out}/data in {time.time() - t0:.0f} s", flush=True)
        print(json.dumps(build_backbones(cfg, files)), flush=True)
    if "stages" in actions or "recipe" in actions:
        print(json.dumps(run_stages(cfg)), flush=True)
    if "eval" in actions or "recipe" in actions:
        evaluate(cfg, ckpt or (latest(cfg, 3) if "recipe" in actions else ASSETS))
    if "ship" in actions:
        ship(cfg, ckpt or latest(cfg, 3))
    if "pictures" in actions:
        pictures(cfg, ckpt or ASSETS)
    if "probe_video" in actions:
        probe_video(cfg, ckpt or ASSETS)


if __name__ == "__main__":
    main(sys.argv[1:])
