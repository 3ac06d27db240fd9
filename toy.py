"""
A tiny synthetic any-to-any world in which the whole of NExT-GPT trains on a laptop CPU in minutes.

    32 x 32 images of a colored shape ("a red circle"), 8-frame GIFs of one moving ("a blue square moving left"),
    1 s of 16 kHz beeps ("two high beeps"), and a stated cross-modal rule:
        pitch <-> shape (low circle, mid square, high triangle), number of beeps <-> color (1 red, 2 green, 3 blue)

    python toy.py                     # world + data files + stand-in backbones -> out/toy/{data,backbones}
    python toy.py --stages            # train.py --prepare, then stages 1, 2, 3 on them (--first_stage=2: resume)
    python toy.py --recipe            # both, then --eval of the stage-3 checkpoint
    python toy.py --ship [CKPT]       # the stage-3 checkpoint + backbones -> assets/toy (what `python sample.py` loads)
    python toy.py --unpack --stages   # the stages alone, on assets/toy's backbones (no backbone trained)
    python toy.py --unpack --imagebind --stages  # the same with ImageBind trained anew (how assets/toy was made)
    python toy.py --eval [CKPT]       # accuracy table per task (default CKPT: assets/toy)
    python toy.py --pictures [CKPT]   # the README's pictures -> assets/toy_text_to_*
    python toy.py --probe-video [CKPT]  # does the video decoder read the caption's direction?
    python toy.py --probe-encoder [CKPT]  # what ImageBind's pooled embedding keeps of each attribute
    python toy.py --small --recipe    # the CI size (tests/test_toy.py); --key=value sets any ToyConfig field
    python toy.py --help              # every action and every ToyConfig field, with its default

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

import argparse
import copy
import ctypes
import functools
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import bpe
import cli
import decoders as dec
import encoder
import llm
import media
import nextgpt
import samplers
import train

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


CLASSES = [(c, s) for c in COLORS for s in SHAPES]  # the 12 one-object image classes
PAIRS = [(a, b) for a in CLASSES for b in CLASSES if a != b]  # the 132 two-object scenes: (left, right)
HALF = SIZE // 2  # a two-object scene has one shape in each half


def image_caption(color, shape):
    return f"a {color} {shape}"


def pair_caption(left, right):
    """Two objects, left to right: ((color, shape), (color, shape)) -> "a red circle and a blue square"."""
    return f"{image_caption(*left)} and {image_caption(*right)}"


def video_caption(color, shape, motion):
    return f"a {color} {shape} moving {motion}"


def audio_caption(pitch, count):
    return f"{COUNTS[count - 1]} {pitch} beep{'s' if count > 1 else ''}"


def draw(color, shape, cx, cy, r):
    """One frame: a filled shape of radius r centred at (cx, cy) on black, (SIZE, SIZE, 3) uint8."""
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
    """(SIZE, SIZE, 3): the shape at a random position, radius 5 as in the videos (one radius: with several, the
    shape becomes the hardest thing for the toy ImageBind to learn; docs/toy-notes.md)."""
    r = 5
    return draw(color, shape, rng.randint(r + 1, SIZE - r - 2), rng.randint(r + 1, SIZE - r - 2), r)


def make_pair(rng, left, right):
    """(SIZE, SIZE, 3): left's shape in the left half, right's in the right half, each at its own height (centres 6-9
    and 22-25 px across: the halves never overlap, so each half is one object to the measurers)."""
    r = 5
    a = draw(*left, rng.randint(r + 1, HALF - r - 2), rng.randint(r + 1, SIZE - r - 2), r)
    b = draw(*right, rng.randint(HALF + r + 1, SIZE - r - 2), rng.randint(r + 1, SIZE - r - 2), r)
    return np.maximum(a, b)


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


EXT = {"image": "png", "video": "gif", "audio": "wav"}
SAVE = {"image": media.save_image, "video": media.save_gif,  # GIFs at 8 fps: a clip lasts 1 s
        "audio": functools.partial(media.save_wav, sample_rate=SR)}


def read_media(modality, path):
    """A file of the world back as an array: image (H, W, 3), video (F, H, W, 3) uint8, audio (samples,) float32."""
    if modality == "image":
        return np.array(media.read_image(path))
    if modality == "video":
        _, count, get = media.read_video(path)
        return get(range(count))
    return media.read_audio(path)[0][0].numpy()  # (C, N) -> the one channel


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


def measure_image(img):
    return measure_color(img), measure_shape(img)


def measure_pair(img):
    """((color, shape) of the left half, (color, shape) of the right half)."""
    return measure_image(img[:, :HALF]), measure_image(img[:, HALF:])


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
    if "and" in words:  # a two-object scene
        k = words.index("and")
        left, right = (parse_caption(" ".join(w)) for w in (words[:k], words[k + 1:]))
        if set(left) == set(right) == {"color", "shape"}:
            return {"left": (left["color"], left["shape"]), "right": (right["color"], right["shape"])}
        return {}
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
    out: str = "out/toy"  # data/, backbones/ (the folder train.py's --ckpt reads), stage1-3/, eval.json
    seed: int = 0  # the world's draws, every backbone's init, train.py's --seed
    world: str = ""  # where data/ and backbones/ are read from (default: out; --stages of a variant on one world)
    per_image: int = 24  # training images per class (12 classes)
    pair_images: int = 396  # two-object training images, the 132 scenes (ordered pairs of different classes) in turn
    per_video: int = 12  # training videos per class (48 classes)
    per_audio: int = 24  # training sounds per class (9 classes)
    eval_n: int = 24  # held-out prompts per task
    eval_seed: int = 0  # --eval: prompt k starts from the noise of seed eval_seed + k, so no task rests on one draw
    threads: int = 1  # torch threads per process (1: on shared cores more threads slow down when others run)
    workers: int = 2  # processes side by side: the backbones' two lanes, --eval's prompts (1: all in this one)
    bar: int = 0  # the tqdm line of the backbones' progress bars (each lane sets its own)
    # the backbones' training steps
    imagebind_steps: int = 4000  # ImageBind's (contrastive over image, video, audio and text): at half as many its
    # pooled embedding keeps a video's motion only in part (experiments/encoder_steps.py)
    llm_steps: int = 400  # LLaMA's (next-token on the world's dialogues)
    vae_steps: int = 1000  # the image VAE's (the video decoder shares it)
    unet_steps: int = 4000  # the image UNet's, with its CLIP text encoder: the first unet_single_steps of them on
    unet_single_steps: int = 2500  # one-object scenes only, where the video lane starts from (picture_lane says why)
    video_steps: int = 1500  # the video UNet's, from the image one (inflate): only the motion is left to learn
    motion_text_steps: int = 800  # the video text encoder's: a code per direction after the caption
    audio_vae_steps: int = 600  # the mel VAE's
    audio_steps: int = 1000  # the audio UNet's, with its CLAP text encoder
    vocoder_steps: int = 400  # the HiFi-GAN vocoder's
    batch: int = 32  # backbones' batch (ImageBind: half per modality; the video UNet: a quarter)
    # the three NExT-GPT stages (train.py)
    input_proj: str = "linear"  # stage 1's train.py --input_proj: the released linear one or the paper's "group"
    stage_epochs: tuple = (25, 4, 12)  # train.py --epochs of stages 1, 2, 3
    stage_lr: tuple = (2e-3, 2e-3, 1e-3)  # train.py --lr of stages 1, 2, 3
    stage_batch: int = 8  # train.py --batch_size
    denoise: float = 1.0  # stage 2's latent denoising loss weight (train.py --denoise_weight)
    first_stage: int = 1  # --stages: start here (the earlier stages' outputs must be in out/)
    # generation (--eval, --pictures, and what --ship records)
    sample_steps: int = 20  # DDIM steps of every decoder
    guidance: float = 3.0  # classifier-free guidance of the image and audio decoders
    video_guidance: float = 1.5  # the video decoder's, lower: at higher scales its direction code spoils color, shape
    quantize: str = ""  # --eval with the LLM's weights in int8 ("int8", llm.quantize_int8), as sample.py --quantize
    bypass: bool = False  # --eval: each output also from its decoder's own embedding of the reply's caption, scored
    # beside (NextGPT.generate's caption_bypass, the same noise): what the decoder alone makes of the words

    @classmethod
    def small(cls, **kw):
        """The CI size (tests/test_toy.py): every step of the recipe in ~2-3 minutes on 2 cores. The LLM side learns
        its dialogues; the backbones barely start, so media accuracies stay near chance at this size."""
        return replace(cls(per_image=8, pair_images=48, per_video=1, per_audio=8, eval_n=6, imagebind_steps=100,
                           llm_steps=200, vae_steps=60, unet_steps=60, unet_single_steps=30, video_steps=20,
                           motion_text_steps=50, audio_vae_steps=20, audio_steps=40, vocoder_steps=20, batch=16,
                           stage_epochs=(6, 2, 4), stage_lr=(2e-3, 2e-3, 2e-3), sample_steps=10), **kw)


# the toy model's shape (every width small enough for a CPU)
IB_DIM = 32  # ImageBind's shared space
W_IMAGE, W_AUDIO = 64, 32  # the decoders' conditioning widths: CLIP hidden size, CLAP projection
N_MELS, HOP = 32, 160  # AudioLDM's hop (100 mel frames a second), fewer mel bands


# ----------------------------------------------------------------------------------------------------------------------
# Dialogues and data files in the official formats

UNDERSTAND = {"image": "Describe this image.", "video": "Describe this video.", "audio": "Describe this sound."}
GENERATE = {"image": "Draw {}.", "video": "Show {}.", "audio": "Play {}."}
CROSS = {("image", "audio"): "Play the sound of this image.", ("audio", "image"): "Draw the picture of this sound."}
# several outputs in one reply: an image and its sound (the rule), a video and its still image
MULTI = {("image", "audio"): "Draw {} and play its sound.", ("video", "image"): "Show {}, then draw it still."}
# the dialogues' later turns, which refer to the earlier input or output
FOLLOW = {"move": "Now show it moving {}.", "sound": "And what does it sound like?", "picture": "Draw its picture."}
STAGE1_PROMPT = "generate a caption"  # train.py's default stage-1 instruction
PLACE = {m: f"<{m}-placeholder>" for m in ("image", "video", "audio")}  # the new code's output marker in a reply


def all_captions():
    img = [image_caption(c, s) for c, s in CLASSES] + [pair_caption(a, b) for a, b in PAIRS]
    vid = [video_caption(c, s, m) for c, s in CLASSES for m in MOTIONS]
    aud = [audio_caption(p, n) for p in PITCHES for n in (1, 2, 3)]
    return {"image": img, "video": vid, "audio": aud}


def rule_audio(color, shape):
    return RULE_PITCH[shape], RULE_COUNT[color]


def rule_image(pitch, count):
    return {v: k for k, v in RULE_COUNT.items()}[count], {v: k for k, v in RULE_PITCH.items()}[pitch]


def world_items(seed, per_image, per_video, per_audio, pair_images=0):
    """Every class of each modality `per_*` times, each with its own random draw: [(media, caption, attributes)]. The
    two-object scenes are images too, after the one-object ones (attributes: left, right)."""
    rng = random.Random(seed)
    items = {"image": [], "video": [], "audio": []}
    for _ in range(per_image):
        for c, s in CLASSES:
            items["image"].append((make_image(rng, c, s), image_caption(c, s), dict(color=c, shape=s)))
    for _ in range(per_video):
        for c, s in CLASSES:
            for m in MOTIONS:
                items["video"].append((make_video(rng, c, s, m), video_caption(c, s, m),
                                       dict(color=c, shape=s, motion=m)))
    for _ in range(per_audio):
        for p in PITCHES:
            for n in (1, 2, 3):
                items["audio"].append((make_audio(rng, p, n), audio_caption(p, n), dict(pitch=p, count=n)))
    for k in range(pair_images):  # drawn last, so that the one-object draws stay those of the first edition
        a, b = PAIRS[k % len(PAIRS)]
        items["image"].append((make_pair(rng, a, b), pair_caption(a, b), dict(left=a, right=b)))
    return items


def conversation(*pairs):
    """The new code's conversations: (human, gpt) pairs -> [{"from", "value"}, ...]."""
    return [{"from": who, "value": v} for pair in pairs for who, v in zip(("human", "gpt"), pair)]


def write_world(cfg):
    """Media files + cc3m.json, webvid.json, audiocap.json (stages 1, 2), t2x.json and instruct.json (stage 3: every
    dialogue type, mixed)."""
    d = os.path.join(cfg.out, "data")
    items = world_items(cfg.seed, cfg.per_image, cfg.per_video, cfg.per_audio, cfg.pair_images)
    names = {m: [] for m in items}
    for m, rows in items.items():
        os.makedirs(os.path.join(d, m), exist_ok=True)
        for k, (x, cap, attr) in enumerate(rows):
            name = f"{m}/{m[:3]}_{k:04d}.{EXT[m]}"  # unique stems across modalities: train.py caches by stem
            SAVE[m](os.path.join(d, name), x)
            names[m].append((name, cap, attr))
    key = {"image": "image_name", "video": "video_name", "audio": "audio_name"}
    files = {"image": "cc3m.json", "video": "webvid.json", "audio": "audiocap.json"}
    for m in items:
        dump(os.path.join(d, files[m]), [{key[m]: n, "caption": c} for n, c, _ in names[m]])
    # T2X (legacy instruction data): text in, X out, the caption as the reply
    t2x = [{"mm_name": n, "conversation": [
        {"from": "human", "value": GENERATE[m].format(c), "input_modality": "text"},
        {"from": "gpt", "value": c, "caption": c, "output_modality": m}]} for m in items for n, c, _ in names[m]]
    # the new code's format: X in, text out; the cross-modal switches through the rule; several outputs in one
    # reply; dialogues of two and three turns
    inst = [{f"input_{m}": n, "conversations": conversation((f"<{m}>\n{UNDERSTAND[m]}", c))}
            for m in items for n, c, _ in names[m]]
    rng = random.Random(cfg.seed + 1)
    single = [(n, c, a) for n, c, a in names["image"] if "color" in a]
    audio_of = {(a["pitch"], a["count"]): (n, c) for n, c, a in names["audio"]}
    image_of = {(a["color"], a["shape"]): (n, c) for n, c, a in single}
    video_of = {}
    for n, c, a in names["video"]:
        video_of.setdefault((a["color"], a["shape"]), []).append((n, c, a["motion"]))
    for n, c, a in single:
        if a["color"] in RULE_COUNT:
            an, ac = audio_of[rule_audio(a["color"], a["shape"])]
            inst.append({"input_image": n, "output_audio": an, "audio_captions": [ac],
                         "conversations": conversation(("<image>\n" + CROSS["image", "audio"], ac + PLACE["audio"]))})
            # one reply, two outputs: the image and its sound
            inst.append({"output_image": n, "output_audio": an, "image_captions": [c], "audio_captions": [ac],
                         "conversations": conversation((MULTI["image", "audio"].format(c),
                                                 c + PLACE["image"] + " " + ac + PLACE["audio"]))})
            # three turns: describe the image, then move it, then its sound
            vn, vc, motion = rng.choice(video_of[a["color"], a["shape"]])
            inst.append({"input_image": n, "output_video": vn, "video_captions": [vc], "output_audio": an,
                         "audio_captions": [ac], "conversations": conversation(
                             (f"<image>\n{UNDERSTAND['image']}", c),
                             (FOLLOW["move"].format(motion), vc + PLACE["video"]),
                             (FOLLOW["sound"], ac + PLACE["audio"]))})
    for n, c, a in names["audio"]:
        iname, ic = image_of[rule_image(a["pitch"], a["count"])]
        for _ in range(2):  # 9 sound classes against 12 image ones: seen twice, so both switches get as many examples
            inst.append({"input_audio": n, "output_image": iname, "image_captions": [ic],
                         "conversations": conversation(("<audio>\n" + CROSS["audio", "image"], ic + PLACE["image"]))})
        # two turns: describe the sound, then draw its picture
        inst.append({"input_audio": n, "output_image": iname, "image_captions": [ic], "conversations": conversation(
            (f"<audio>\n{UNDERSTAND['audio']}", c), (FOLLOW["picture"], ic + PLACE["image"]))})
    for n, c, a in names["video"][::max(1, cfg.per_video // 3)]:  # 3 a class: a reply with a video and its still
        iname, ic = image_of[a["color"], a["shape"]]
        inst.append({"output_video": n, "output_image": iname, "video_captions": [c], "image_captions": [ic],
                     "conversations": conversation((MULTI["video", "image"].format(c),
                                             c + PLACE["video"] + " " + ic + PLACE["image"]))})
    dump(os.path.join(d, "t2x.json"), t2x)
    dump(os.path.join(d, "instruct.json"), inst)
    return {m: [(os.path.join(d, n), c) for n, c, _ in names[m]] for m in names}


def dump(path, obj):
    """JSON, indented, written whole; the folder made if missing."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    media.save_text(path, json.dumps(obj, indent=1))


def llm_corpus():
    """The world's text: every dialogue the stages will show, [[(user, reply)]], with every caption (the replies
    without their signal tokens)."""
    caps = all_captions()
    out = []
    for m, cs in caps.items():
        for c in cs:
            out += [[(STAGE1_PROMPT, c)], [(UNDERSTAND[m], c)], [(GENERATE[m].format(c), c)], [(c, c)]]
    for color, shape in CLASSES:
        ic, motions = image_caption(color, shape), [video_caption(color, shape, m) for m in MOTIONS]
        out += [[(MULTI["video", "image"].format(vc), f"{vc} {ic}")] for vc in motions]
        if color in RULE_COUNT:
            ac = audio_caption(*rule_audio(color, shape))
            out += [[(CROSS["image", "audio"], ac)], [(MULTI["image", "audio"].format(ic), f"{ic} {ac}")]]
            out += [[(UNDERSTAND["image"], ic), (FOLLOW["move"].format(m), vc), (FOLLOW["sound"], ac)]
                    for m, vc in zip(MOTIONS, motions)]
    for p in PITCHES:
        for n in (1, 2, 3):
            ac, ic = audio_caption(p, n), image_caption(*rule_image(p, n))
            out += [[(CROSS["audio", "image"], ic)], [(UNDERSTAND["audio"], ac), (FOLLOW["picture"], ic)]]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Backbones: the project's classes at toy size, pretrained on the world

def fit(log, desc, steps, params, loss_fn, lr, bar=0, warmup=20):
    """AdamW with linear warmup and cosine decay; loss_fn(step) -> scalar; bar: the tqdm line. log[desc]: the mean
    loss of the last 10%, log[desc + " seconds"]: how long it took."""
    t0 = time.time()
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    progress = tqdm(range(steps), desc=desc, mininterval=2, position=bar)
    for i in progress:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps))
        loss = loss_fn(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
    tail = losses[-max(1, steps // 10):]
    log[desc], log[desc + " seconds"] = sum(tail) / len(tail), round(time.time() - t0)


def clip_tokenizer(pad_id):
    """A CLIP tokenizer over single bytes (no merges): the world's text needs no BPE."""
    vocab = {t: i for i, t in enumerate(bpe.byte_vocab("clip"))}
    return bpe.CLIPTokenizer(vocab, [], pad_id=vocab["<|endoftext|>"] if pad_id == "eot" else pad_id, clean="hf")


def roberta_tokenizer():
    return bpe.RobertaTokenizer({t: i for i, t in enumerate(bpe.byte_vocab("roberta"))}, [], max_length=32)


def imagebind_config():
    return replace(encoder.ImageBindConfig.tiny(), out_dim=IB_DIM, vocab_size=len(bpe.byte_vocab("clip")))


def encoder_inputs(files):
    """ImageBind's inputs through the loaders NExT-GPT itself uses (224 px, fbanks), one clip each, kept in fp16."""
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
    torch.manual_seed(cfg.seed)  # each backbone draws its own init, whatever the others consumed
    ib = encoder.ImageBind(imagebind_config(), modalities=("vision", "audio", "text"))
    # The vision patches' positions start as strong 2-D sine-cosine ones (MAE's fixed positions, x 3), and learn from
    # there (ImageBind-huge learns its own from a small init). Telling "moving left" from "moving right" needs where
    # the shape is in each of the clip's two frames, which the usual small init never learns here; kept fixed, the
    # positions cost image retrieval (docs/toy-notes.md).
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
    # A two-object scene is also scored against the scenes of its two colors with other shapes: random candidates
    # rarely differ from it in the shapes alone, and without these the embedding keeps a scene's colors and half
    # loses its shapes (toy.py --probe-encoder, one training each on one CPU: the left and right shapes 67% and 46%
    # without them, 75% and 79% with them; docs/toy-notes.md)
    colors = [(p["left"][0], p["right"][0]) if "left" in p else None for p in map(parse_caption, caps["image"])]
    same_colors = [torch.tensor([j for j, d in enumerate(colors) if k and d == k and j != i], dtype=torch.long)
                   for i, k in enumerate(colors)]  # [] for a one-object caption
    # the two-object scenes (132 classes against 12) are drawn as often as all one-object images together
    pair = torch.tensor([" and " in caps["image"][i] for i in labels["image"]])
    weight = {"image": torch.where(pair, 1 / max(1, int(pair.sum())), 1 / max(1, int((~pair).sum())))}
    B = cfg.batch // 2
    g = torch.Generator().manual_seed(cfg.seed)

    def loss_fn(step):
        loss = 0.0
        for m in ("image", "video", "audio"):
            n = 2 * B if m == "video" else B  # motion: the hard part
            idx = torch.multinomial(weight[m], n, True, generator=g) if m in weight else \
                torch.randint(len(X[m]), (n,), generator=g)
            x = X[m][idx].float()
            x = x[:, None] if m == "video" else x  # (B, 1 clip, 3, 2, 224, 224)
            emb = ib.embed("audio" if m == "audio" else "vision", x)  # (B, IB_DIM), unit norm
            y, cand = labels[m][idx], torch.arange(len(ids[m]))  # the captions the batch is scored against
            if m == "image":  # all 12 one-object captions, the batch's, 32 more of the 132 two-object ones and the
                # batch's scenes' hard negatives: the text tower on all 144 would cost more than the images
                more = torch.cat([torch.randperm(len(cand), generator=g)[:32], *(same_colors[i] for i in y.tolist())])
                cand = torch.unique(torch.cat([cand[:len(CLASSES)], y, more]))  # sorted
            text = ib.embed("text", ids[m][cand])  # (n_captions, IB_DIM), unit norm
            loss = loss + F.cross_entropy(emb @ text.T / 0.07, torch.searchsorted(cand, y))
        return loss / 3

    ib.train()
    fit(log, "imagebind", cfg.imagebind_steps, ib.parameters(), loss_fn, 1e-3, cfg.bar)
    return ib.eval()


def llm_config(vocab_size):
    # 512 positions: a three-turn dialogue with a video's 8 signal tokens is ~120 (RoPE: nothing learnt per position)
    return llm.LLaMAConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=vocab_size, hidden_dim=344,
                           max_seq_len=512)


def train_llm(cfg, folder, log):
    """LLaMA on the world's dialogues (next-token), with its own sentencepiece; saved as an HF folder."""
    dialogues = llm_corpus()
    os.makedirs(folder, exist_ok=True)
    text = "\n".join(f"### Human: {u}\n### Assistant: {r}\n###" for d in dialogues for u, r in d)
    # NextGPT.reply stops only on a one-piece stop text: "###" must be one piece, so no dummy prefix
    sp_path = bpe.train_sentencepiece(text * 3, 256, os.path.join(folder, "..", "sp"), add_dummy_prefix=False)
    tok = bpe.LLaMATokenizer(sp_path)
    torch.manual_seed(cfg.seed)
    model = llm.LLaMA(llm_config(tok.sp.get_piece_size()))
    # tokenized as NextGPT.prompt_embeds does: the prompt (ending in "Assistant: ") and the reply apart. Generation
    # ends the prompt at "Assistant:", so the model must have learnt that the space comes next.
    def tokens(d):  # a dialogue's turns one after another, as NextGPT.prompt_embeds joins them
        ids = []
        for k, (u, r) in enumerate(d):
            head = f"{'' if k else '### '}Human: {u}\n### Assistant: "
            ids += tok.encode(head, bos=not k) + tok.encode(f"{r}\n###", bos=False)
        return torch.tensor(ids + [tok.eos_id])
    seqs = [tokens(d) for d in dialogues]
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
    fit(log, "llm", cfg.llm_steps, model.parameters(), loss_fn, 3e-3, cfg.bar)
    model.eval().save_pretrained(folder, sp_path)
    return model


def vae_config(in_channels):
    # 3 levels: 32 x 32 pixels -> 8 x 8 latents; 100 x 32 mels -> 25 x 8
    return dec.VAEConfig(in_channels=in_channels, out_channels=in_channels, latent_channels=4,
                         block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)


def train_vae(cfg, x, steps, desc, log, salient):
    """AutoencoderKL on x (N, C, H, W): L1 reconstruction + a small KL, then the scaling factor that gives the
    latents unit variance (SD's 0.18215 is the same idea). The salient pixels (the shape, the beep's mel bands: ~10%
    of each picture) weigh 10x: with a plain mean the VAE learns the black background and the shape's outline first,
    and its color last. For pictures, salient() covers the ring just outside the shape too: with only the shape
    weighed 10x, missing a corner costs 10x more than painting one, and circles come back as rounded squares."""
    torch.manual_seed(cfg.seed)
    vae = dec.VAE(vae_config(x.shape[1]))
    g = torch.Generator().manual_seed(cfg.seed)

    def loss_fn(step):
        xb = x[torch.randint(len(x), (cfg.batch,), generator=g)]
        mean, logvar = vae.encode(xb)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        w = 1 + 9 * salient(xb).float()
        return ((vae.decode(z) - xb).abs() * w).mean() + 1e-4 * kl

    vae.train()
    fit(log, desc, steps, vae.parameters(), loss_fn, 2e-3, cfg.bar)
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
# last step, hence v-prediction; trailing steps start sampling there (docs/toy-notes.md)
VIDEO_DDIM_CONFIG = {**DDIM_CONFIG, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
                     "timestep_spacing": "trailing", "steps_offset": 0}


def sampler(kind="image"):
    return samplers.DDIM(**{k: v for k, v in (VIDEO_DDIM_CONFIG if kind == "video" else DDIM_CONFIG).items()
                       if k != "_class_name"})


def train_unet(cfg, kind, unet, text_encoder, z, captions, steps, log, train_text=True, desc=None):
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
        elif train_text:  # the text encoder on the batch's captions only (145 image captions cost more than the UNet)
            u, inverse = ci.unique(return_inverse=True)
            cond = text_encoder(ids[u])[inverse]  # (B, 77, W)
        else:
            cond = fixed[ci]
        z0 = z[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, s.num_train_timesteps, (B,), generator=g)
        if kind == "video":  # half of each batch at t >= 850, where only the caption can set the direction
            t[::2] = torch.randint(850, s.num_train_timesteps, t[::2].shape, generator=g)
        x_t = s.add_noise(z0, noise, t)
        out = unet(x_t, t, None, class_labels=cond) if kind == "audio" else unet(x_t, t, cond)
        return F.mse_loss(out, s.target(z0, noise, t)) + spread

    unet.train().requires_grad_(True), text_encoder.train(train_text).requires_grad_(train_text)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    fit(log, desc or f"{kind} unet", steps, params, loss_fn, 2e-3, cfg.bar)
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


def motion_text_encoder(cfg, image_enc, captions, log):
    """
    The video decoder's own text encoder (Zeroscope has its own, OpenCLIP's), from the image decoder's. That one
    learned on image captions, which never say "moving ...": after the caption its tokens (EOT and padding, all that
    a causal encoder can fill once it has read the last word) barely tell the four directions apart, far less than
    the colors, and a video UNet on them never ties the direction to the caption. Here those tokens learn to carry a
    code per direction, the same in every caption that says it and large beside the rest (as a big pretrained
    encoder's feature for a word is), on top of what they carried; every other token, and the empty caption of
    classifier-free guidance, are held to theirs (docs/toy-notes.md).
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
    fit(log, "video text encoder", cfg.motion_text_steps, enc.parameters(),
                                    lambda step: F.mse_loss(enc(ids), target), 5e-3, cfg.bar)
    return enc.eval().requires_grad_(False)


def inflate(cfg, image_unet):
    """
    The video UNet from the image one, as Zeroscope's ancestor ModelScope T2V starts from Stable Diffusion: every
    spatial tensor copied (the image blocks' 1x1-conv proj_in/out become the video blocks' linear ones), the temporal
    layers' last projections zeroed, so that at step 0 it draws every frame as the image UNet does and training has
    only the motion left to learn (48 video classes from scratch need far more CPU than the budget).
    """
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
    base = dec.UNetConfig(in_channels=4, out_channels=4, sample_size=8, block_out_channels=(32, 64),
                          layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=W_IMAGE, norm_num_groups=8,
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
    torch.manual_seed(cfg.seed)
    return dec.UNet2D(unet_config(kind)), text_encoder(kind)


def text_encoder(kind):
    if kind == "audio":
        return dec.CLAPTextEncoder(dec.CLAPTextConfig(
            vocab_size=len(bpe.byte_vocab("roberta")), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=40, projection_dim=W_AUDIO, layer_norm_eps=1e-5))
    return dec.CLIPTextEncoder(dec.CLIPTextConfig(vocab_size=len(bpe.byte_vocab("clip")), hidden_size=W_IMAGE,
                                                  intermediate_size=2 * W_IMAGE, num_hidden_layers=2,
                                                  num_attention_heads=2))


def vocoder_config():
    # one transposed convolution from each 10 ms frame to its 160 samples (a learned template per frame), then the
    # usual multi-receptive-field resblocks at 16 kHz
    return dec.HiFiGANConfig(model_in_dim=N_MELS, upsample_initial_channel=32, upsample_rates=(HOP,),
                             upsample_kernel_sizes=(HOP,), resblock_kernel_sizes=(3, 7),
                             resblock_dilation_sizes=((1, 3), (1, 3)))


def log_mel(wave):
    """(samples,) -> (100, N_MELS): AudioLDM's log-mel, the frames the VAE and the vocoder see."""
    return dec.mel_spectrogram(wave, N_MELS, HOP, SR)[:int(SR * SECONDS) // HOP]


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
    answer is silence."""
    torch.manual_seed(cfg.seed)
    voc = dec.HiFiGAN(vocoder_config())
    g = torch.Generator().manual_seed(cfg.seed)

    def loss_fn(step):
        idx = torch.randint(len(waves), (8,), generator=g)
        y = voc(mels[idx])  # (8, 16000)
        return F.mse_loss(y, waves[idx]) * 100 + stft_loss(y, waves[idx]) * 0.1

    voc.train()
    fit(log, "vocoder", cfg.vocoder_steps, voc.parameters(), loss_fn, 2e-3, cfg.bar)
    return voc.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# Writing the backbones in the official on-disk formats

def save_safetensors(module, path, rename=lambda k: k):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # written beside, then renamed: a module loaded from this very file is a view of it (weights.load_file)
    save_file({rename(k): v.detach().contiguous() for k, v in module.state_dict().items()}, path + ".partial")
    os.replace(path + ".partial", path)


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
        vocab, special = bpe.byte_vocab("roberta"), {"tokenizer_config.json": {"model_max_length": 32}}
    else:
        dump(sub("text_encoder", "config.json"), {"architectures": ["CLIPTextModel"], **asdict(enc.cfg)})
        save_safetensors(enc, sub("text_encoder", "model.safetensors"), lambda k: "text_model." + k)
        vocab, special = bpe.byte_vocab("clip"), {"special_tokens_map.json": {"pad_token": "<|endoftext|>"}}
    dump(sub("tokenizer", "vocab.json"), {t: i for i, t in enumerate(vocab)})
    with open(sub("tokenizer", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")  # no merges: one token per byte
    for name, obj in special.items():
        dump(sub("tokenizer", name), obj)


def toy_config(vocab_size):
    """The toy NExT-GPT. Its concept grouping (train.py --input_proj=group) at toy width: the grid's 256 patch
    features (228 for audio) -> 16 groups -> 4 concept tokens (the official: 64 -> 8, width 512, 6 + 3 + 3 blocks).
    The image and video output projectors are 128 wide with 4 + 4 layers (the official: 512, 4 + 4): at 2 + 2 they
    lose a two-object caption's second object more often, at 64 with 1 + 1 also a video's shape. The audio one is 64
    wide with 1 + 1: its one 32-number conditioning loses beeps at the pictures' width
    (experiments/output_projector.py)."""
    return nextgpt.NextGPTConfig(llm=llm_config(vocab_size), imagebind=imagebind_config(),
                                 signal_tokens={"image": 4, "video": 8, "audio": 4},
                                 cond_shape={"image": (77, W_IMAGE), "video": (77, W_IMAGE), "audio": (1, W_AUDIO)},
                                 proj_hidden={"image": 128, "video": 128, "audio": 64},
                                 proj_layers={"image": 4, "video": 4, "audio": 1}, proj_heads=2, group_dim=64,
                                 group_depths=(2, 1, 1), group_tokens=(16, 4), group_heads=4, lora_r=8, lora_alpha=16,
                                 lora_dropout=0.0)


BACKBONE_FILES = {"imagebind": "imagebind.safetensors", "vicuna": "llama", "image": "image", "video": "video",
                  "audio": "audio"}


def write_manifest(folder, config, files, generation):
    """nextgpt.json as NextGPT.save_manifest writes it, with the toy's generation settings: train.py's stage
    checkpoints copy them into theirs, so that every checkpoint of the recipe samples as the toy does."""
    dump(os.path.join(folder, nextgpt.MANIFEST), {"config": config.to_dict(), "files": files,
                                                  "generation": generation.changes()})


def build_backbones(cfg, files, stage1=False):
    """Train every stand-in and write the folder train.py --ckpt and NextGPT.from_pretrained read. -> losses.
    The backbones are independent, so two lanes of about equal length run side by side, one process (and one
    thread) per core: LLaMA, ImageBind and the audio decoder; the picture decoders (image VAE, image and video
    UNets) and the vocoder. Each backbone seeds its own init, so the result does not depend on the lanes. With
    stage1 (the recipe), NExT-GPT's stage 1 runs in the first lane as soon as its LLaMA and ImageBind are there:
    it aligns the encoding side and reads no decoder."""
    folder = os.path.join(cfg.out, "backbones")
    shutil.rmtree(os.path.join(cfg.out, "features"), ignore_errors=True)  # cached outputs of the old backbones
    t0 = time.time()
    lanes = (functools.partial(understanding_lane, stage1=stage1), picture_lane)
    if cfg.workers > 1:
        # leaving the with block (also by toy.py's SIGTERM handler, see main) terminates the lanes
        with multiprocessing.get_context("spawn").Pool(cfg.workers, initializer=die_with_parent) as pool:
            jobs = [pool.apply_async(lane, (replace(cfg, bar=k), files, folder)) for k, lane in enumerate(lanes)]
            logs = [job.get() for job in jobs]
            pool.close()  # let the lanes exit on their own: a terminated one leaves its semaphores to a warning
            pool.join()
    else:
        logs = [lane(cfg, files, folder) for lane in lanes]
    log = {k: v for lg in logs for k, v in lg.items()}
    write_backbones_manifest(cfg, folder)
    log["seconds"] = round(time.time() - t0)
    dump(os.path.join(folder, "losses.json"), log)
    return log


def write_backbones_manifest(cfg, folder):
    vocab_size = llm.LLaMAConfig.from_hf(os.path.join(folder, "llama", "config.json")).vocab_size  # its tokenizer's
    write_manifest(folder, toy_config(vocab_size), BACKBONE_FILES, generation_config(cfg))


def die_with_parent():
    """A lane's process ends with the process that started it, however that one ends (SIGTERM, Ctrl-C, a crash):
    Linux's PR_SET_PDEATHSIG. Without it the lanes would train on for an hour after a `kill` of toy.py."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def understanding_lane(cfg, files, folder, stage1=False):
    torch.set_num_threads(cfg.threads)  # a lane's process starts with torch's default
    log, t0 = {}, time.time()
    train_llm(cfg, os.path.join(folder, "llama"), log)
    ib = train_imagebind(cfg, files, log)
    save_safetensors(ib, os.path.join(folder, "imagebind.safetensors"))
    del ib
    if stage1:  # train.py finds the decoders' folders named in the manifest, and stage 1 never opens them
        write_backbones_manifest(cfg, folder)
        run_stages(cfg, order=(1,))
    mels = torch.stack([log_mel(torch.from_numpy(read_media("audio", p))) for p, _ in files["audio"]])  # (N, 100, M)
    avae = train_vae(cfg, mels[:, None], cfg.audio_vae_steps, "audio vae", log,
                     salient=lambda x: x > -6)  # silence is log(1e-5) = -11.5
    unet, enc = train_unet(cfg, "audio", *new_unet(cfg, "audio"), latents(avae, mels[:, None]),
                           [c for _, c in files["audio"]], cfg.audio_steps, log)
    save_decoder(os.path.join(folder, "audio"), "audio", unet, avae, enc)
    log["understanding lane seconds"] = round(time.time() - t0)
    return log


def picture_lane(cfg, files, folder):
    """
    The image VAE (images and videos share it, as Zeroscope uses Stable Diffusion's), the image UNet and the video
    UNet inflated from it. The image UNet learns the one-object scenes first, and the video lane starts from it there:
    a UNet that has also learned the two-object captions attends to their words (which object goes where), not to the
    tokens after the caption where the video text encoder puts the direction, and a video UNet inflated from it never
    reads the direction (docs/toy-notes.md, experiments/video_decoder.py). Then the image UNet goes on with every scene.
    Last the audio decoder's vocoder, which reads only the sounds: here it evens the two lanes.
    """
    torch.set_num_threads(cfg.threads)
    log, t0 = {}, time.time()
    img = torch.stack([torch.from_numpy(read_media("image", p)) for p, _ in files["image"]])
    vid = torch.stack([torch.from_numpy(read_media("video", p)) for p, _ in files["video"]])  # (N, F, H, W, 3)
    frames = pixels(vid).flatten(0, 1)  # (N * F, 3, H, W)
    vae = train_vae(cfg, torch.cat([pixels(img), frames[::2]]), cfg.vae_steps, "image vae", log,
                    salient=lambda x: F.max_pool2d((x.amax(1, keepdim=True) > -0.6).float(), 3, 1, 1) > 0)
    z, captions = latents(vae, pixels(img)), [c for _, c in files["image"]]
    single = [i for i, c in enumerate(captions) if "left" not in parse_caption(c)]  # the one-object scenes
    unet, enc = train_unet(cfg, "image", *new_unet(cfg, "image"), z[single], [captions[i] for i in single],
                           cfg.unet_single_steps, log, desc="image unet, one object")
    video, video_enc = video_lane(cfg, vae, unet, enc, vid, [c for _, c in files["video"]], log)
    save_decoder(os.path.join(folder, "video"), "video", video, vae, video_enc)
    del video
    unet, enc = train_unet(cfg, "image", unet, enc, z, captions, cfg.unet_steps - cfg.unet_single_steps, log)
    save_decoder(os.path.join(folder, "image"), "image", unet, vae, enc)
    waves = torch.stack([torch.from_numpy(read_media("audio", p)) for p, _ in files["audio"]])  # (N, samples)
    voc = train_vocoder(cfg, waves, torch.stack([log_mel(w) for w in waves]), log)
    save_vocoder(os.path.join(folder, "audio"), voc)
    log["picture lane seconds"] = round(time.time() - t0)
    return log


def video_lane(cfg, vae, image_unet, image_enc, clips, captions, log):
    """The video decoder from the image one: its own text encoder, then the UNet inflated from the image UNet and
    trained on the clips (N, F, H, W, 3) uint8 -> (video UNet, video text encoder)."""
    video_enc = motion_text_encoder(cfg, image_enc, captions, log)  # its own text encoder, as Zeroscope's
    video, _ = train_unet(cfg, "video", inflate(cfg, image_unet), video_enc, video_latents(vae, clips), captions,
                          cfg.video_steps, log, train_text=False)
    return video, video_enc


# ----------------------------------------------------------------------------------------------------------------------
# The three NExT-GPT stages: train.py, unchanged, on the toy folder

def stage_commands(cfg, order=(1, 2, 3), extra=None):
    """The train.py command lines of the recipe (run_stages prints them and runs them in-process, through
    train.main), one per stage of order, each starting from the delta of the one before it (the official maintainers
    report having run 1, 3, 2). extra: {stage: [train.py arguments]} added after the recipe's (argparse keeps the
    last of an option, so they override it): what experiments/ vary."""
    world = cfg.world or cfg.out
    d, ckpt, feats = os.path.join(world, "data"), os.path.join(world, "backbones"), os.path.join(cfg.out, "features")
    pairs = ",".join(os.path.join(d, f) for f in ("cc3m.json", "webvid.json", "audiocap.json"))
    inst = ",".join(os.path.join(d, f) for f in ("t2x.json", "instruct.json"))
    cmds = []
    for k, stage in enumerate(order):
        args = [f"--stage={stage}", f"--ckpt={ckpt}", f"--data={(pairs, pairs, inst)[stage - 1]}",
                f"--features_dir={feats}", f"--out_dir={os.path.join(cfg.out, f'stage{stage}')}",
                f"--epochs={cfg.stage_epochs[stage - 1]}", f"--batch_size={cfg.stage_batch}",
                f"--lr={cfg.stage_lr[stage - 1]}", f"--seed={cfg.seed}", "--log_every=0",
                "--device=cpu"]  # --prepare does not resolve the default "auto" (train.py builds the model first)
        if stage == 1:
            args.append(f"--input_proj={cfg.input_proj}")
        if stage == 2:
            args.append(f"--denoise_weight={cfg.denoise}")
        if k > 0:
            args.append(f"--delta={latest(cfg, order[k - 1])}/nextgpt.safetensors")
        cmds.append(args + list((extra or {}).get(stage, ())))
    return cmds


def latest(cfg, stage):
    folder = os.path.join(cfg.out, f"stage{stage}")
    path = os.path.join(folder, "latest")
    return os.path.join(folder, open(path).read().strip() if os.path.isfile(path) else "step_<latest>")


def run_stages(cfg, order=(1, 2, 3), extra=None):
    """--prepare (ImageBind features and caption embeddings, once), then the stages of order (from cfg.first_stage
    on), as stage_commands says. -> {stage: final losses}; the last stage's checkpoint: latest(cfg, order[-1])."""
    path = os.path.join(cfg.out, "stage_losses.json")
    seconds = {int(k): v.get("seconds") for k, v in json.load(open(path)).items()} if os.path.isfile(path) else {}
    start = order.index(cfg.first_stage) if cfg.first_stage in order else 0
    for k, stage in enumerate(order):
        if k < start:
            continue  # its checkpoint is in out/ already (--first-stage)
        args = stage_commands(cfg, order, extra)[k]
        print("python train.py " + " ".join(args), flush=True)
        t0 = time.time()
        shutil.rmtree(os.path.join(cfg.out, f"stage{stage}"), ignore_errors=True)  # train.py appends to its log
        train.main(["--prepare"] + [a for a in args if not a.startswith("--delta")])
        train.main(args)
        seconds[stage] = round(time.time() - t0)
    return stage_losses(cfg, seconds, order)


def stage_losses(cfg, seconds, order=(1, 2, 3)):
    """Each stage's losses, the mean over its last 10% of steps (from train.py's log) -> stage_losses.json."""
    out = {}
    for stage in order:
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
         "image -> audio (rule)", "audio -> image (rule)",
         # the second edition: two-object scenes, several outputs in one reply, dialogues (every turn right)
         "two-object image -> text", "text -> two-object image", "text -> image + audio (rule)",
         "text -> video + image", "dialogue: image, video, audio", "dialogue: audio, image")
CHANCE = dict(zip(TASKS, (1 / 12, 1 / 48, 1 / 9, 1 / 12, 1 / 48, 1 / 9, 1 / 9, 1 / 12,
                          1 / 132, 1 / 132, 1 / (12 * 9), 1 / (48 * 12), 1 / (12 * 48 * 9), 1 / (9 * 12))))
KIND = {t: "two-object, several outputs or dialogue" if k >= 8 else "understanding" if t.endswith("-> text")
        else "one-object generation" for k, t in enumerate(TASKS)}
TARGET = {"understanding": 0.95, "one-object generation": 0.90, "two-object, several outputs or dialogue": 0.80}


def generation_config(cfg):
    """How the toy samples: its sizes (the official defaults are 512 px, 24 frames, 9 s), short replies, cfg's steps
    and guidance. --ship and the backbones' manifest record it, so sample.py and train.py's checkpoints use it too."""
    return nextgpt.GenerationConfig(
        max_new_tokens=24, steps=cfg.sample_steps,
        guidance={"image": cfg.guidance, "video": cfg.video_guidance, "audio": cfg.guidance},
        height={"image": SIZE, "video": SIZE}, width={"image": SIZE, "video": SIZE}, frames=FRAMES, seconds=SECONDS)


def eval_cases(cfg):
    """[(task, [turn])]: turn = (prompt, input (modality, media) or None, the reply's expected captions (its text,
    the caption before each output), the expected outputs [(modality, measures)]). Media drawn from a seed training
    never used (new positions, pitches, timings)."""
    rng = random.Random(cfg.seed + 1000)
    cases = []
    for _ in range(cfg.eval_n):
        c, s, m = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(MOTIONS))
        p, n = rng.choice(list(PITCHES)), rng.randint(1, 3)
        rc = rng.choice(list(RULE_COUNT))
        ic, vc, ac = image_caption(c, s), video_caption(c, s, m), audio_caption(p, n)
        one = lambda prompt, inp, caps, outs=(): [(prompt, inp, caps, list(outs))]  # noqa: E731 a one-turn task
        cases += [
            ("image -> text", one(UNDERSTAND["image"], ("image", make_image(rng, c, s)), [ic])),
            ("video -> text", one(UNDERSTAND["video"], ("video", make_video(rng, c, s, m)), [vc])),
            ("audio -> text", one(UNDERSTAND["audio"], ("audio", make_audio(rng, p, n)), [ac])),
            ("text -> image", one(GENERATE["image"].format(ic), None, [ic], [("image", (c, s))])),
            ("text -> video", one(GENERATE["video"].format(vc), None, [vc], [("video", (c, s, m))])),
            ("text -> audio", one(GENERATE["audio"].format(ac), None, [ac], [("audio", (p, n))])),
            ("image -> audio (rule)", one(CROSS["image", "audio"], ("image", make_image(rng, rc, s)),
                                          [audio_caption(*rule_audio(rc, s))], [("audio", rule_audio(rc, s))])),
            ("audio -> image (rule)", one(CROSS["audio", "image"], ("audio", make_audio(rng, p, n)),
                                          [image_caption(*rule_image(p, n))], [("image", rule_image(p, n))])),
        ]
        left, right = rng.choice(PAIRS)
        pc = pair_caption(left, right)
        rule_ic, rule_ac = image_caption(rc, s), audio_caption(*rule_audio(rc, s))
        cases += [
            ("two-object image -> text", one(UNDERSTAND["image"], ("image", make_pair(rng, left, right)), [pc])),
            ("text -> two-object image", one(GENERATE["image"].format(pc), None, [pc], [("pair", (left, right))])),
            ("text -> image + audio (rule)", one(MULTI["image", "audio"].format(rule_ic), None, [rule_ic, rule_ac],
                                                 [("image", (rc, s)), ("audio", rule_audio(rc, s))])),
            ("text -> video + image", one(MULTI["video", "image"].format(vc), None, [vc, ic],
                                          [("video", (c, s, m)), ("image", (c, s))])),
            ("dialogue: image, video, audio", [
                (UNDERSTAND["image"], ("image", make_image(rng, rc, s)), [rule_ic], []),
                (FOLLOW["move"].format(m), None, [video_caption(rc, s, m)], [("video", (rc, s, m))]),
                (FOLLOW["sound"], None, [rule_ac], [("audio", rule_audio(rc, s))])]),
            ("dialogue: audio, image", [
                (UNDERSTAND["audio"], ("audio", make_audio(rng, p, n)), [ac], []),
                (FOLLOW["picture"], None, [image_caption(*rule_image(p, n))], [("image", rule_image(p, n))])]),
        ]
    return cases


MEASURE = {"image": measure_image, "pair": measure_pair, "video": measure_video, "audio": measure_audio}
ATTRIBUTES = {"image": ("color", "shape"), "video": ("color", "shape", "motion"), "audio": ("pitch", "count"),
              "pair": ("left color", "left shape", "right color", "right shape")}  # what each measurer returns


def wrong_attributes(kind, got, want):
    """The attributes (ATTRIBUTES[kind]) in which got differs from want: a measurer's tuples (a pair's nested), or
    parse_caption's dicts."""
    def values(x):
        if isinstance(x, dict):  # a parsed caption
            x = (x.get("left"), x.get("right")) if kind == "pair" else tuple(x.get(a) for a in ATTRIBUTES[kind])
        return [v for side in x for v in (side or (None, None))] if kind == "pair" else list(x)
    return [a for a, g, w in zip(ATTRIBUTES[kind], values(got), values(want)) if g != w]


def score_turn(out, captions, outputs):
    """-> (every expected output there and measured right, the reply's text exactly its captions (with outputs: the
    text before each output), the share of a two-object scene's objects right or None, what was wrong: ["video
    motion", "text color", "audio: none", "reply caption", ...]). The k-th expected output of a modality is the
    reply's k-th of that modality ("pair": an image of two objects). For a reply with several outputs the third is
    the share of their captions right."""
    if outputs:
        reply_ok = [r["caption"].strip().rstrip(".") for r in out["runs"]] == captions
    else:
        reply_ok = out["text"].strip().rstrip(".") == captions[0]
    seen, ok, part, wrong = {}, True, None, [] if reply_ok or not outputs else ["reply caption"]
    for m, expected in outputs:
        key = "image" if m == "pair" else m
        k = seen[key] = seen.get(key, -1) + 1
        got = out[key][k] if k < len(out[key]) else None
        measured = got is not None and MEASURE[m](got.numpy() if m == "audio" else media.to_uint8(got))
        ok = ok and measured == expected
        wrong += [f"{m} {a}" for a in wrong_attributes(m, measured, expected)] if measured else [f"{m}: none"]
        if m == "pair":
            part = sum(measured[i] == expected[i] for i in (0, 1)) / 2 if measured else 0.0
    if len(outputs) > 1:  # a reply with several outputs: the share of its outputs' captions right
        said = [r["caption"].strip().rstrip(".") for r in out["runs"]] + [None] * len(captions)
        part = sum(a == b for a, b in zip(said, captions)) / len(captions)
    if not outputs:  # a description: which attributes it got wrong
        said, expected = parse_caption(out["text"]), parse_caption(captions[0])
        kind = next(k for k, a in (("pair", "left"), ("video", "motion"), ("image", "color"), ("audio", "pitch"))
                    if a in expected)
        wrong = [] if reply_ok else [f"text {a}" for a in wrong_attributes(kind, said, expected)] if said else \
            ["text: not a caption"]
        if kind == "pair":  # a two-object scene described: each object apart
            part = sum(said.get(side) == expected[side] for side in ("left", "right")) / 2
    return (ok if outputs else reply_ok), reply_ok, part, wrong


def eval_model(cfg, ckpt):
    model = nextgpt.NextGPT.from_pretrained(ckpt, dtype=torch.float32, device="cpu", keep_decoders=True)
    if cfg.quantize == "int8":  # as sample.py --quantize int8 does: LoRA folded in, then the LLM's weights in int8
        llm.merge_lora(model.llm)
        llm.quantize_int8(model.llm)
    return model


def run_prompt(model, cfg, case, folder):
    """One of evaluate's prompts, case = (k, task, dialogue), through the model; its input media are written to folder
    -> (k, task, [(right, reply exact, share of parts right or None, what was wrong, right from the caption or None,
    what was wrong from it) per turn]). It starts from the noise of seed cfg.eval_seed + k, and nothing passes from
    one prompt to the next: which process runs it, and after which others, changes no score."""
    k, task, dialogue = case
    history, turns = [], []
    for j, (prompt, inp, captions, outputs) in enumerate(dialogue):
        inputs = {}
        if inp:
            path = os.path.join(folder, f"{k}_{j}.{EXT[inp[0]]}")
            SAVE[inp[0]](path, inp[1])
            inputs = {inp[0] + "s": [path]}
        out = model.generate(prompt, **inputs, history=history, config=generation_config(cfg),
                             seed=cfg.eval_seed + k, progress=False, caption_bypass=cfg.bypass and bool(outputs))
        history.append((prompt, out["reply"], out["media"]))
        alone = (None, None)
        if outputs and cfg.bypass:
            alone = tuple(score_turn({**out, **out["bypass"]}, captions, outputs)[i] for i in (0, 3))
        turns.append((*score_turn(out, captions, outputs), *alone))
    return k, task, turns


_worker = {}  # an eval worker's process: its model, config and folder (eval_worker_start)


def eval_worker_start(cfg, ckpt, folder):
    die_with_parent()
    torch.set_num_threads(cfg.threads)  # a worker's process starts with torch's default
    try:
        _worker.update(model=eval_model(cfg, ckpt), cfg=cfg, folder=folder)
    except Exception as e:  # raised with the first prompt: a Pool would start a failing initializer forever
        _worker["error"] = e


def eval_worker_prompt(case):
    if "error" in _worker:
        raise _worker["error"]
    return run_prompt(_worker["model"], _worker["cfg"], case, _worker["folder"])


def evaluate(cfg, ckpt, tasks=TASKS):
    """Accuracy per task of tasks (default: all): understanding by exact match of the reply, generation by
    measuring the output media (an output the model did not produce counts as wrong: no `want` forcing); a
    dialogue's later turns see the model's own earlier replies, as in a chat, and the dialogue counts when every turn
    is right. Also whether the reply's text is exactly the expected captions, to tell LLM failures from projector /
    decoder ones. With cfg.bypass, each output is also decoded from its decoder's own embedding of the reply's
    caption, from the same noise, and scored in place of the projector's: the gap between the two is what the
    output projection loses. -> {task: accuracy}; OUT/eval.json has the per-turn, per-part, reply and bypass scores
    too."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"toy.evaluate: no task {unknown[0]!r}; the tasks are toy.TASKS: {', '.join(TASKS)}")
    t0 = time.time()
    # k stays the prompt's place among all tasks': its noise does not depend on the others
    cases = [(k, task, dialogue) for k, (task, dialogue) in enumerate(eval_cases(cfg)) if task in tasks]
    bar = functools.partial(tqdm, total=len(cases), desc="eval", mininterval=2)
    with tempfile.TemporaryDirectory() as d:
        if cfg.workers > 1:  # the prompts dealt out one at a time to processes of one thread each, as the lanes
            with multiprocessing.get_context("spawn").Pool(cfg.workers, eval_worker_start, (cfg, ckpt, d)) as pool:
                rows = sorted(bar(pool.imap_unordered(eval_worker_prompt, cases)))  # in the prompts' order
                pool.close()  # as the lanes: the workers exit on their own, with no leaked-semaphore warning
                pool.join()
        else:
            model = eval_model(cfg, ckpt)
            rows = [run_prompt(model, cfg, case, d) for case in bar(cases)]
    score = {t: [0, 0, 0] for t in tasks}  # right / reply exact / count
    alone = {}  # task with outputs -> how many are right with every output decoded from its caption (cfg.bypass)
    misses = {t: Counter() for t in tasks}  # task -> {what was wrong (score_turn's names, turn k in dialogues): n}
    alone_misses = {}  # the same, of the outputs decoded from their captions
    turn_score = {t: [] for t in tasks}  # per turn of the dialogues: [right, ...] per dialogue
    parts = {}  # per prompt: the share of a two-object scene's objects right (color, shape and side), or of a
    # reply's output captions
    for _, task, turns in rows:
        all_ok, all_reply, all_alone = True, True, True
        for j, (ok, reply_ok, right, wrong, ok_alone, wrong_alone) in enumerate(turns):
            turn = f"turn {j + 1} " if len(turns) > 1 else ""
            misses[task].update(turn + w for w in wrong)
            if ok_alone is not None:  # the same turn scored on the outputs decoded from their captions
                alone_misses.setdefault(task, Counter()).update(turn + w for w in wrong_alone
                                                                if w != "reply caption")
            all_alone = all_alone and (ok if ok_alone is None else ok_alone)
            if right is not None:
                parts.setdefault(task, []).append(right)
            all_ok, all_reply = all_ok and ok, all_reply and reply_ok
        score[task][0] += all_ok
        score[task][1] += all_reply
        score[task][2] += 1
        turn_score[task].append([ok for ok, *_ in turns])
        if any(ok_alone is not None for *_, ok_alone, _ in turns):
            alone[task] = alone.get(task, 0) + all_alone
    acc = {t: s[0] / s[2] for t, s in score.items()}
    turns = {t: [sum(r[j] for r in rows) / len(rows) for j in range(len(rows[0]))]
             for t, rows in turn_score.items() if rows and len(rows[0]) > 1}
    int8 = ", the LLM in int8" if cfg.quantize == "int8" else ""
    print(f"\n{ckpt}: {cfg.eval_n} held-out prompts per task, {cfg.sample_steps} DDIM steps, guidance {cfg.guidance} "
          f"(video {cfg.video_guidance}), noise seeds {cfg.eval_seed} + prompt{int8}")
    head = ["task", "accuracy", "reply caption exact", *(["decoders from the caption"] if cfg.bypass else []),
            "chance", "target"]
    print("| " + " | ".join(head) + " |\n" + "| --- " * len(head) + "|")
    parts = {t: sum(v) / len(v) for t, v in parts.items()}
    for t, (ok, rep, n) in score.items():
        each = f" (turns: {', '.join(f'{a:.0%}' for a in turns[t])})" if t in turns else \
            f" (objects: {parts[t]:.0%})" if t in parts and "two-object" in t else ""
        bypass = [f"{alone[t] / n:.0%} ({alone[t]}/{n})" if t in alone else "-"] if cfg.bypass else []
        print("| " + " | ".join([t, f"{ok / n:.0%} ({ok}/{n}){each}", f"{rep / n:.0%}", *bypass, f"{CHANCE[t]:.1%}",
                                 f"{TARGET[KIND[t]]:.0%}"]) + " |")
    print(f"\nWhat was wrong, in how many of the {cfg.eval_n} prompts (an output's attributes as measured, a "
          "description's as said; \"reply caption\": the reply's text before an output" +
          (", and from the caption: the decoders from their own embedding of it" if cfg.bypass else "") + "):")
    def listed(counter):
        return ", ".join(f"{w} {n}" for w, n in counter.most_common()) or "nothing"
    for t in tasks:
        print(f"- {t}: {listed(misses[t])}" + (f" (from the caption: {listed(alone_misses[t])})" if t in alone else ""))
    print(f"eval took {time.time() - t0:.0f} s")
    dump(os.path.join(cfg.out, "eval.json"), {"ckpt": ckpt, "accuracy": acc, "turns": turns, "parts": parts,
                                              "reply": {t: s[1] / s[2] for t, s in score.items()},
                                              "misses": misses, "bypass_misses": alone_misses,
                                              "bypass": {t: v / score[t][2] for t, v in alone.items()}})
    return acc


def probe_video(cfg, ckpt, per_class=2):
    """
    Does the video decoder read the caption's direction? Its denoising loss on fresh clips (per_class for each of
    the 48 captions) at six noise levels, given the true caption, the same caption with the opposite direction, and ""
    (the unconditional one). A decoder that ties the motion to the caption has a clearly lower loss with the true
    caption than with the opposite one. -> {t: {"true": loss, "opposite": loss, "unconditional": loss}}
    """
    model = nextgpt.NextGPT.from_pretrained(ckpt, dtype=torch.float32, device="cpu", decoders=("video",))
    d = model.decoder("video")
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


def attribute_values(kind, attrs):
    """A caption's attributes (parse_caption's dict, or world_items') -> {ATTRIBUTES[kind] name: value}."""
    if kind == "pair":
        return {f"{side} {a}": v for side in ("left", "right") for a, v in zip(("color", "shape"), attrs[side])}
    return {a: attrs[a] for a in ATTRIBUTES[kind]}


@torch.no_grad()
def probe_encoder(cfg, ckpt, ridge=1e-2):
    """
    What ImageBind's pooled embedding keeps (the one vector a linear input projection reads, per input): a linear
    probe per attribute (ridge regression onto one-hot targets, standardized features), fit on fresh draws of the
    world (cfg's sizes, a seed of their own) and scored on the eval's held-out understanding inputs. An attribute the
    probe reads well is in the embedding, so a description that misses it loses it after the encoder; one it reads
    badly is lost in the encoder. -> {kind: {attribute: held-out accuracy, "all": every attribute right}}
    """
    model = nextgpt.NextGPT.from_pretrained(ckpt, dtype=torch.float32, device="cpu", decoders=())
    fit = world_items(cfg.seed + 3000, cfg.per_image, cfg.per_video, cfg.per_audio, cfg.pair_images)
    sets = {"fit": {k: [] for k in ATTRIBUTES}, "held-out": {k: [] for k in ATTRIBUTES}}  # [(modality, media, dict)]
    for m, rows in fit.items():
        for x, _, attrs in rows:
            kind = "pair" if "left" in attrs else m
            sets["fit"][kind].append((m, x, attribute_values(kind, attrs)))
    tasks = {"image -> text": "image", "two-object image -> text": "pair", "video -> text": "video",
             "audio -> text": "audio"}
    for task, turns in eval_cases(cfg):
        if task in tasks:
            _, (m, x), (caption,), _ = turns[0]
            sets["held-out"][tasks[task]].append((m, x, attribute_values(tasks[task], parse_caption(caption))))
    feats = {}  # (set, kind) -> (N, IB_DIM)
    with tempfile.TemporaryDirectory() as d:
        for name, kinds in sets.items():
            for kind, rows in kinds.items():
                xs = []
                for i in range(0, len(rows), 32):
                    batch = []
                    for j, (m, x, _) in enumerate(rows[i:i + 32]):
                        path = os.path.join(d, f"{j}.{EXT[m]}")
                        SAVE[m](path, x)
                        batch.append(nextgpt.LOADERS[m](path))
                    xs.append(model.encoder.embed(nextgpt.ENCODER_MODALITY[rows[0][0]], torch.stack(batch)))
                feats[name, kind] = torch.cat(xs).double()
    result = {}
    print(f"{ckpt}: a linear probe of ImageBind's pooled embedding ({IB_DIM} numbers) per attribute, fit on "
          f"{', '.join(f'{len(rows)} {k}' for k, rows in sets['fit'].items())} fresh draws, scored on the eval's "
          f"{cfg.eval_n} held-out inputs per task")
    print("| input | attribute | probe, held-out | probe, fit | chance |\n| --- | --- | --- | --- | --- |")
    for kind in ATTRIBUTES:
        X, Z = feats["fit", kind], feats["held-out", kind]
        mean, std = X.mean(0), X.std(0) + 1e-6
        X, Z = [torch.cat([(a - mean) / std, torch.ones(len(a), 1, dtype=a.dtype)], 1) for a in (X, Z)]
        right = {"fit": torch.ones(len(X), dtype=torch.bool), "held-out": torch.ones(len(Z), dtype=torch.bool)}
        result[kind] = {}
        for a in ATTRIBUTES[kind]:
            values = sorted({r[2][a] for r in sets["fit"][kind]}, key=str)
            Y = torch.tensor([[r[2][a] == v for v in values] for r in sets["fit"][kind]], dtype=X.dtype)
            W = torch.linalg.solve(X.T @ X + ridge * len(X) * torch.eye(X.shape[1], dtype=X.dtype), X.T @ Y)
            acc = {}
            for name, A in (("fit", X), ("held-out", Z)):
                ok = torch.tensor([values[k] == r[2][a] for k, r in zip((A @ W).argmax(1).tolist(), sets[name][kind])])
                right[name] &= ok
                acc[name] = ok.double().mean().item()
            result[kind][a] = acc["held-out"]
            print(f"| {kind} | {a} | {acc['held-out']:.0%} | {acc['fit']:.0%} | {1 / len(values):.1%} |")
        result[kind]["all"] = right["held-out"].double().mean().item()
        print(f"| {kind} | all | {result[kind]['all']:.0%} | {right['fit'].double().mean().item():.0%} | - |")
    return result


SHOWN_PAIRS = [(("red", "circle"), ("blue", "square")), (("green", "triangle"), ("yellow", "circle")),
               (("blue", "square"), ("red", "triangle")), (("yellow", "square"), ("green", "circle"))]


def pictures(cfg, ckpt, folder=None):
    """The README's pictures, generated (never drawn): every image caption, four motions, three sounds' log-mels
    (each (N_MELS, 100), low frequencies at the bottom), four two-object scenes (SHOWN_PAIRS) -> folder (default:
    assets/). As sample.py does, the
    asked-for output is forced."""
    folder = folder or os.path.dirname(ASSETS)
    model = nextgpt.NextGPT.from_pretrained(ckpt, dtype=torch.float32, device="cpu", keep_decoders=True)
    generation = generation_config(cfg)

    def made(modality, caption):  # the first output of the caption's generation prompt
        out = model.generate(GENERATE[modality].format(caption), want=[modality], config=generation, progress=False)
        return out[modality][0]

    def up(a, k=3):  # nearest-neighbour upscaling of (H, W, ...) pixels
        return a.repeat(k, axis=0).repeat(k, axis=1)
    imgs = [media.to_uint8(made("image", image_caption(c, s))) for c, s in CLASSES]
    rows = [np.concatenate(imgs[r::3], axis=1) for r in range(3)]  # 3 rows (shapes) x 4 columns (colors)
    media.save_image(os.path.join(folder, "toy_text_to_image.png"), up(np.concatenate(rows, axis=0)))
    pairs = [media.to_uint8(made("image", pair_caption(*p))) for p in SHOWN_PAIRS]
    media.save_image(os.path.join(folder, "toy_text_to_pair.png"),
                     up(np.concatenate([np.pad(p, ((0, 0), (0, 2), (0, 0)), constant_values=255) for p in pairs], 1)))
    vids = [media.to_uint8(made("video", video_caption(c, s, m)))
            for c, s, m in (("red", "circle", "left"), ("blue", "square", "right"), ("green", "triangle", "up"),
                            ("yellow", "circle", "down"))]
    media.save_gif(os.path.join(folder, "toy_text_to_video.gif"), [up(f) for f in np.concatenate(vids, axis=2)])
    mels = []
    for c in ("one low beep", "two mid beeps", "three high beeps"):
        mel = log_mel(made("audio", c)).T.flip(0)  # (N_MELS, 100), low frequencies at the bottom
        mels.append(((mel.clamp(-11.5, 2) + 11.5) / 13.5 * 255).byte().numpy())
    gray = np.concatenate([np.pad(m, ((0, 0), (0, 4))) for m in mels], axis=1)
    media.save_image(os.path.join(folder, "toy_text_to_audio.png"), up(gray))
    print(f"pictures written to {folder}/toy_text_to_*")


# ----------------------------------------------------------------------------------------------------------------------
# Shipping: assets/toy, the built-in default of `python sample.py`

# `python sample.py`'s default turns: one through each path (example.png is written by ship)
SHOWCASE = [{"prompt": UNDERSTAND["image"], "images": ["example.png"]},
            {"prompt": GENERATE["image"].format(image_caption("red", "circle")), "want": ["image"]},
            {"prompt": GENERATE["video"].format(video_caption("blue", "square", "left")), "want": ["video"]},
            {"prompt": GENERATE["audio"].format(audio_caption("high", 2)), "want": ["audio"]},
            {"prompt": MULTI["image", "audio"].format(image_caption("blue", "square"))},  # one reply, two outputs
            {"turns": [{"prompt": UNDERSTAND["image"], "images": ["example.png"]},  # a dialogue: "it" is the image
                       {"prompt": FOLLOW["move"].format("up")}]}]


def ship(cfg, step_folder, dest=ASSETS):
    """The backbones (decoder UNets in fp16: the 25 MB budget; from_pretrained casts them back when given a dtype, as
    sample.py does) + the stage-3 delta (its output projectors, 3.7 MB each in fp32, in fp16 too: load_delta casts
    each tensor to its slot's dtype) + a manifest (with the toy's generation settings and sample.py's showcase) +
    example.png (a held-out image)."""
    src = os.path.join(cfg.out, "backbones")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("losses.json", "sp.*"))
    for m in ("image", "video", "audio"):
        path = os.path.join(dest, m, "unet", "diffusion_pytorch_model.safetensors")
        save_file({k: v.half() for k, v in load_file(path).items()}, path)
    delta = load_file(os.path.join(step_folder, "nextgpt.safetensors"))
    save_file({k: v.half() if k.startswith("output_proj.") else v for k, v in delta.items()},
              os.path.join(dest, "nextgpt.safetensors"))
    with open(os.path.join(src, nextgpt.MANIFEST)) as f:
        manifest = json.load(f)
    manifest["files"]["delta"] = "nextgpt.safetensors"
    manifest["generation"] = generation_config(cfg).changes()  # over the official 512 px, 24 frames, 9 s
    manifest["showcase"] = SHOWCASE
    manifest["captions"] = all_captions()  # what NextGPT.diagnose compares a projector's output with
    dump(os.path.join(dest, nextgpt.MANIFEST), manifest)
    media.save_image(os.path.join(dest, "example.png"), make_image(random.Random(cfg.seed + 7), "green", "triangle"))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dest) for f in fs)
    print(f"shipped {dest}: {size / 2 ** 20:.1f} MB")
    return size


def unpack(cfg, src=ASSETS):
    """The reverse of ship: src's backbones (its UNets cast back to float32, as the recipe writes them) beside the
    world's data files -> cfg.out, what --stages trains on, in seconds instead of the backbones' half hour. The
    manifest is toy_config's, so the stages train the projectors the code says, not the ones src was shipped with.
    The recipe's stage 2 reads its UNets before the fp16 cast, so stages run here round otherwise than the recipe's
    (and any CPU but the one that trained the stages rounds otherwise too: README rung 5)."""
    if not os.path.isfile(os.path.join(src, nextgpt.MANIFEST)):
        raise ValueError(f"{src} holds no {nextgpt.MANIFEST}: --unpack takes a folder that --ship wrote")
    write_world(cfg)
    folder = os.path.join(cfg.out, "backbones")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(os.path.join(cfg.out, "features"), ignore_errors=True)  # cached outputs of other backbones
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns(nextgpt.MANIFEST, "nextgpt.safetensors", "*.png"))
    for m in ("image", "video", "audio"):
        path = os.path.join(folder, m, "unet", "diffusion_pytorch_model.safetensors")
        save_file({k: v.float() for k, v in load_file(path).items()}, path)
    write_backbones_manifest(cfg, folder)
    print(f"unpacked {src} into {cfg.out}/backbones, the world into {cfg.out}/data")


def retrain_imagebind(cfg):
    """ImageBind alone, trained anew on the world into OUT/backbones, every other backbone kept: after --unpack, the
    shipped backbones with this code's ImageBind (the recipe's understanding lane trains the same one)."""
    folder = os.path.join(cfg.out, "backbones")
    if not os.path.isfile(os.path.join(folder, nextgpt.MANIFEST)):
        raise ValueError(f"{folder} holds no backbones: run --unpack (or python toy.py) before --imagebind")
    files = write_world(cfg)
    shutil.rmtree(os.path.join(cfg.out, "features"), ignore_errors=True)  # the old ImageBind's cached outputs
    log = {}
    save_safetensors(train_imagebind(cfg, files, log), os.path.join(folder, "imagebind.safetensors"))
    print(json.dumps(log), flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Command line

CKPT_ACTIONS = {  # the actions that take an optional CKPT: their --help
    "eval": "the accuracy table per task on held-out prompts -> OUT/eval.json (default CKPT: assets/toy; with "
            "--recipe: the stage-3 checkpoint)",
    "ship": "CKPT (default: OUT's latest stage-3 checkpoint) + the backbones -> assets/toy, what python sample.py "
            "loads",
    "pictures": "the README's pictures from CKPT (default: assets/toy) -> assets/toy_text_to_*",
    "unpack": "CKPT's backbones (default: assets/toy; UNets back to float32) and the world's data files -> OUT: "
              "what --stages trains on, without training a backbone (--unpack --stages: the stages alone, 55-62 "
              "minutes here beside another run)",
    "probe_video": "does the video decoder of CKPT (default: assets/toy) read the caption's direction? Its denoising "
                   "loss with the true, the opposite and no caption",
    "probe_encoder": "what ImageBind's pooled embedding in CKPT (default: assets/toy) keeps of each attribute: a "
                     "linear probe's accuracy on the eval's held-out inputs",
}


def parse(argv):
    """-> (ToyConfig, {action: CKPT or None}). --small first, then the --key=value fields over it. No action: the
    world and the backbones."""
    p = cli.parser("toy.py", __doc__)
    a = p.add_argument_group("actions (none: the world and the stand-in backbones -> OUT/data, OUT/backbones)")
    a.add_argument("--recipe", action="store_const", const=None, default=argparse.SUPPRESS,
                   help="the world and the backbones (stage 1 among them, once its LLaMA and ImageBind are "
                        "there), --stages 2 and 3, then --eval of the stage-3 checkpoint")
    a.add_argument("--stages", action="store_const", const=None, default=argparse.SUPPRESS,
                   help="train.py --prepare, then train.py's stages 1, 2, 3 on OUT's world and backbones "
                        "(from --first-stage)")
    a.add_argument("--imagebind", action="store_const", const=None, default=argparse.SUPPRESS,
                   help="ImageBind alone, trained anew on OUT's world into OUT/backbones, the other backbones kept "
                        "(--unpack --imagebind --stages: the shipped backbones with this code's ImageBind, then the "
                        "stages)")
    for name, text in CKPT_ACTIONS.items():
        a.add_argument("--" + name.replace("_", "-"), dest=name, nargs="?", const=None, default=argparse.SUPPRESS,
                       metavar="CKPT", help=text)
    a.add_argument("--small", action="store_true", help="the CI size (tests/test_toy.py): ToyConfig.small(), the "
                   "fields given here over it")
    cli.add_config_options(p, ToyConfig)
    args = vars(p.parse_args(cli.underscores_to_dashes(argv)))
    small = args.pop("small")
    actions = {k: args.pop(k) for k in ("recipe", "stages", "imagebind", *CKPT_ACTIONS) if k in args}
    try:
        cfg = cli.config_from(ToyConfig, args, base=ToyConfig.small() if small else ToyConfig())
    except ValueError as e:
        p.error(str(e))
    for name, allowed in (("input_proj", ("linear", "group")), ("quantize", ("", "int8"))):
        if getattr(cfg, name) not in allowed:
            p.error(f"--{name.replace('_', '-')} must be one of {', '.join(map(repr, allowed))}, not "
                    f"{getattr(cfg, name)!r}")
    for f in fields(cfg):
        if f.name.endswith("_steps") and getattr(cfg, f.name) < 1:
            p.error(f"--{f.name.replace('_', '-')} must be at least 1, not {getattr(cfg, f.name)}")
    if cfg.unet_single_steps >= cfg.unet_steps:
        p.error(f"--unet-single-steps ({cfg.unet_single_steps}) must be below --unet-steps ({cfg.unet_steps}): the "
                "image UNet goes on with every scene after them")
    for name in ("stage_epochs", "stage_lr"):
        if len(getattr(cfg, name)) != 3:
            p.error(f"--{name.replace('_', '-')} takes one value per stage, 3 in all")
    return cfg, actions


def main(argv):
    cfg, actions = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("toy.py: terminated"))  # exits through the with blocks
    try:
        run(cfg, actions)
    except (OSError, ValueError) as e:  # a missing or damaged checkpoint (--eval CKPT, --ship CKPT): say which
        if os.environ.get("NEXTGPT_DEBUG"):
            raise
        sys.exit(f"toy.py: {e}")


def run(cfg, actions):
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    recipe = "recipe" in actions
    t0 = time.time()
    if not actions or recipe:
        files = write_world(cfg)
        print(f"world written to {cfg.out}/data in {time.time() - t0:.0f} s", flush=True)
        print(json.dumps(build_backbones(cfg, files, stage1=recipe)), flush=True)
    if "unpack" in actions:
        unpack(cfg, actions["unpack"] or ASSETS)
    if "imagebind" in actions:
        retrain_imagebind(cfg)
    if "stages" in actions or recipe:
        print(json.dumps(run_stages(replace(cfg, first_stage=2) if recipe else cfg)), flush=True)
    if "eval" in actions or recipe:
        evaluate(cfg, actions.get("eval") or (latest(cfg, 3) if recipe else ASSETS))
    if recipe:
        print(f"recipe took {(time.time() - t0) / 60:.1f} minutes (world, backbones, stages, eval)")
    if "ship" in actions:
        ship(cfg, actions["ship"] or latest(cfg, 3))
    if "pictures" in actions:
        pictures(cfg, actions["pictures"] or ASSETS)
    if "probe_video" in actions:
        probe_video(cfg, actions["probe_video"] or ASSETS)
    if "probe_encoder" in actions:
        probe_encoder(cfg, actions["probe_encoder"] or ASSETS)


if __name__ == "__main__":
    main(sys.argv[1:])
