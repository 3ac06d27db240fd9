"""
The three NExT-GPT training stages in one loop. The stage chooses what trains and which losses apply:

    stage 1  encoding-side alignment      X-caption pairs in          trains the input projection (+ new token rows)
             loss: NLL of the caption
    stage 2  decoding-side alignment      caption in, signal out      trains the output projectors (+ new token rows)
             losses: NLL of the signal tokens, caption alignment (L2 between the projector output and the decoder's
             own text-encoder embedding of the caption), conditional latent denoising through the frozen UNet
    stage 3  modality-switching tuning    conversations, any modality trains LoRA + both projections (+ new rows)
             losses: all of the above

    python train.py --stage=1 --ckpt=checkpoints --data=data/cc3m.json,data/webvid.json --out_dir=out/stage1
    python train.py --prepare --stage=1 ...            # ImageBind features + caption embeddings, once
    torchrun --nproc_per_node=8 train.py --stage=3 ... # data parallel on 8 GPUs (gloo on CPUs)
    python train.py --config=my.json --lr=1e-4         # a JSON of options, then --key=value overrides
    python train.py --stage=2 --resume                 # continue exactly where out_dir's last save stopped

References: NExT-GPT-Lagacy/code/model/anyToImageVideoAudio.py (stages, losses), common/utils.py (prompts, l2_loss),
dsconfig/stage_*.json (optimiser); the new code's denoising loss (nextgpt/model/nextgpt_arch.py).
"""

import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchaudio
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import cli
import decoders
import media
import nextgpt
import weights
from nextgpt import MODALITIES, NextGPT


@dataclass
class TrainConfig:
    stage: int = 1  # 1 encoding side, 2 decoding side, 3 instruction tuning (picks the stage's preset)
    ckpt: str = "checkpoints"  # the model to start from: the official files, or a folder with nextgpt.json
    delta: str = ""  # start from this delta instead (e.g. the previous stage's out_dir/latest checkpoint)
    data: str = ""  # comma-separated data files in the official formats
    media_dir: str = ""  # where media names resolve; default: the data file's folder
    features_dir: str = ""  # precomputed ImageBind features and caption embeddings (written by --prepare)
    out_dir: str = "out/train"  # where step_N/ checkpoints, latest and log.jsonl go
    input_proj: str = ""  # "linear" or "group" to (re)build the input projection; "" keeps the checkpoint's
    prompt: str = "generate a caption"  # stage 1's instruction (config/stage_1.yaml)
    # optimisation (dsconfig/stage_*.json: Adam lr 4e-4 (stage 3: 5e-4), betas 0.9/0.95, wd 1e-3, clip 1.0)
    epochs: int = 1  # passes over the data
    max_steps: int = 0  # 0: as many as the epochs give
    batch_size: int = 2  # per process
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 4e-4  # peak learning rate (stage 3's preset: 5e-4)
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    weight_decay: float = 1e-3  # AdamW, on every trained tensor but the new token rows
    warmup: float = 0.1  # a fraction of the steps (or a count if >= 1); at least 10 steps, as the official schedule
    min_lr: float = 0.0  # where the cosine decay ends
    clip: float = 1.0  # gradient-norm clipping; 0: none
    max_len: int = 512  # prompt tokens kept per example (the rest is cut)
    # losses
    nll_weight: float = 1.0  # next-token NLL of the replies
    align_weight: float = 1.0  # caption alignment (stages 2, 3)
    video_align_weight: float = 1.0  # the official stage 3 doubles the video alignment
    denoise_weight: float = 0.0  # the new code's conditional latent denoising (needs target media)
    # engine
    lora: bool = False  # LoRA on the LLM (stage 3)
    grad_checkpointing: bool = False  # recompute the LLM's activations in backward: less memory, more time
    dtype: str = "auto"  # auto or bf16: bf16 autocast on CUDA (on the CPU none); fp32: none
    device: str = "auto"  # auto: cuda (this process's LOCAL_RANK) if there is one, else cpu
    seed: int = 0  # initialisation and batch order
    log_every: int = 10  # steps between printed loss lines; 0: none (log.jsonl has every step)
    save_every: int = 0  # steps between saves; 0: only at the end
    keep: int = 1  # how many saves to keep (the newest)
    resume: bool = False  # continue from out_dir's latest checkpoint, exactly
    tiny_random: bool = False  # nextgpt.tiny_random instead of ckpt: every path in seconds (tests, smoke runs)

    def check(self):
        """Every option within its rule, or a ValueError naming the option, the rule and the value."""
        rules = {"epochs": 1, "batch_size": 1, "grad_accum": 1, "max_len": 1, "keep": 1, "max_steps": 0, "seed": 0,
                 "log_every": 0, "save_every": 0}
        for name, low in rules.items():
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer of at least {low} "
                                 f"(got {getattr(self, name)})")
        for name in ("lr", "min_lr", "weight_decay", "warmup", "clip", "nll_weight", "align_weight",
                     "video_align_weight", "denoise_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a number of at least 0 (got {v})")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1) (got {getattr(self, name)})")
        resolve_device(self.device)  # a device this machine has
        for name, allowed in (("input_proj", ("", "linear", "group")), ("dtype", ("auto", "bf16", "fp32"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(map(repr, allowed))} "
                                 f"(got {getattr(self, name)!r})")
        return self

    @property
    def trains(self):
        """What each stage trains (the new rows of embed_tokens / lm_head train in every stage)."""
        return {1: ("input_proj",), 2: ("output_proj",), 3: ("input_proj", "output_proj", "lora")}[self.stage]

    @property
    def losses(self):
        return {1: ("nll",), 2: ("nll", "align", "denoise"), 3: ("nll", "align", "denoise")}[self.stage]


STAGE_PRESETS = {  # what each stage changes in TrainConfig's defaults (dsconfig/stage_*.json, config/stage_3.yaml)
    1: dict(lr=4e-4),
    2: dict(lr=4e-4),
    3: dict(lr=5e-4, lora=True, video_align_weight=2.0),
}


def parse_args(argv):
    """-> (TrainConfig, prepare). The stage's preset first, then --config=file.json, then the options given."""
    p = cli.parser("train.py", __doc__)
    p.add_argument("--prepare", action="store_true", help="write the ImageBind features and caption embeddings of "
                   "--data into --features-dir (once, before training), then stop")
    p.add_argument("--config", metavar="FILE.json", help="a JSON object of TrainConfig fields; options given on the "
                   "command line override it")
    cli.add_config_options(p, TrainConfig)
    args = vars(p.parse_args(cli.underscores_to_dashes(argv)))
    prepare, config_file = args.pop("prepare"), args.pop("config")
    try:
        in_file = cli.read_json_object(config_file, "--config") if config_file else {}
        stage = cli.parse_value(args.get("stage", in_file.get("stage", 1)), 1, "stage")
        if stage not in STAGE_PRESETS:
            raise ValueError(f"--stage must be 1, 2 or 3 (got {stage})")
        cfg = cli.config_from(TrainConfig, {**STAGE_PRESETS[stage], **in_file, **args, "stage": stage}).check()
    except ValueError as e:
        p.error(str(e))
    return cfg, prepare


# ----------------------------------------------------------------------------------------------------------------------
# Data: the official formats, read as they are, into one kind of example

@dataclass
class Example:
    turns: list  # [(user text, reply text)]; replies carry the signal tokens of their outputs
    inputs: list = field(default_factory=list)  # [(modality, media path)]
    outputs: list = field(default_factory=list)  # [(modality, caption, media path or None, embedding path or None)]
    where: str = ""  # file:index, for messages


def signal_text(config, modality):
    return "".join(f"[{nextgpt.SIGNAL_PREFIX[modality]}{i}]" for i in range(config.signal_tokens[modality]))


def read_data(path, cfg, config):
    """One data file -> (examples, problems). A bad record is reported with its file and index and skipped."""
    try:
        with open(path) as f:
            records = json.load(f)
    except OSError as e:
        raise ValueError(f"data file {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"data file {path} is not JSON ({e}); the data files are the official JSON formats "
                         "(README.md, 'Training')") from None
    if isinstance(records, dict):
        records = records.get("data", [records])
    if not isinstance(records, list) or not records:
        raise ValueError(f"data file {path} holds {'no records' if records == [] else type(records).__name__}: it "
                         "needs a JSON list of records (or {\"data\": [...]})")
    folder = cfg.media_dir or os.path.dirname(os.path.abspath(path))
    examples, problems = [], []
    for i, r in enumerate(records):
        where = f"{path}:{i}"
        try:
            ex = _example(r, cfg, config, folder)
            for _, p in ex.inputs + [(m, p) for m, _, p, _ in ex.outputs if p]:
                if not os.path.isfile(p) and not _cached_features(cfg, p):
                    raise ValueError(f"media file not found: {p}")
            ex.where = where
            examples.append(ex)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            problems.append(f"{where}: {type(e).__name__}: {e}")
    return examples, problems


def _example(r, cfg, config, folder):
    join = lambda name: os.path.join(folder, name)  # noqa: E731
    for modality, key in (("image", "image_name"), ("video", "video_name"), ("audio", "audio_name")):
        if key in r:  # cc3m.json / webvid.json / audiocap.json: {X_name, caption}
            caption = r["caption"].strip()
            if not caption:
                raise ValueError("empty caption")
            if cfg.stage == 1:  # X in, caption out
                return Example([(cfg.prompt, caption)], inputs=[(modality, join(r[key]))])
            # caption in, caption + signal tokens out (common/utils.py: build_one_instance_stage_2)
            emb = os.path.join(cfg.features_dir, f"captions_{modality}", _stem(r[key]) + ".npy") \
                if cfg.features_dir else None
            return Example([(caption, caption + signal_text(config, modality))],
                           outputs=[(modality, caption, join(r[key]), emb)])
    if "conversation" in r:  # the legacy T2X instruction files: {mm_name, conversation: [...]}
        turns, outputs, user = [], [], None
        for turn in r["conversation"]:
            if turn["from"] == "human":
                user = turn["value"]
            else:
                m = turn.get("output_modality", "text")
                reply = turn["value"]
                if m in MODALITIES:
                    reply += signal_text(config, m)
                    outputs.append((m, turn.get("caption") or turn["value"], join(r["mm_name"]) if r.get("mm_name")
                                    else None, None))
                turns.append((user, reply))
        return Example(turns, outputs=outputs)
    if "conversations" in r:  # the new code: input_X / output_X / X_captions / X_caption_embeddings
        inputs, outputs = [], []
        for m in MODALITIES:
            for name in _as_list(r.get(f"input_{m}")):
                inputs.append((m, join(name)))
            captions = _as_list(r.get(f"{m}_captions"))
            embs = _as_list(r.get(f"{m}_caption_embeddings"))
            for k, name in enumerate(_as_list(r.get(f"output_{m}"))):
                outputs.append((m, captions[k] if k < len(captions) else "", join(name),
                                join(embs[k]) if k < len(embs) else None))
        turns, user = [], None
        for turn in r["conversations"]:
            if turn["from"] == "human":
                user = turn["value"]
            else:
                reply = turn["value"]
                for m in MODALITIES:  # new-code signal tokens (<image_00000>...) or placeholders -> our runs
                    reply = re.sub(rf"(<{m}_\d+>)+|<{m}-placeholder>", signal_text(config, m), reply)
                turns.append((user, reply))
        return Example(turns, inputs=inputs, outputs=outputs)
    raise ValueError(f"unknown record format (keys: {sorted(r)})")


def _as_list(x):
    return [] if x is None else x if isinstance(x, list) else [x]


def _stem(name):
    return os.path.splitext(os.path.basename(name))[0]


# ----------------------------------------------------------------------------------------------------------------------
# Frozen-backbone outputs, computed on the fly or read from --prepare's cache

def _cache_path(cfg, kind, path):
    return os.path.join(cfg.features_dir, kind, _stem(path) + ".npy") if cfg.features_dir else None


def _cached_features(cfg, path):
    return any(os.path.isfile(p) for p in [_cache_path(cfg, f"imagebind_{k}", path) for k in ("linear", "group")]
               if p)


def input_features(model, modality, path, cfg):
    """ImageBind's output for one input file: (1, 1024) pooled or (N, 1024) patches, as the projection wants."""
    cached = _cache_path(cfg, f"imagebind_{model.config.input_proj}", path)
    if cached and os.path.isfile(cached):
        return torch.from_numpy(np.load(cached)).float()
    return model.features(modality, nextgpt.LOADERS[modality](path)[None])[0].float().cpu()  # (1 | N, 1024)


def caption_target(model, modality, caption, emb_path, memo):
    """The decoder's own text embedding of a caption: (77, 768) / (77, 1024) / (1, 512)."""
    if emb_path and os.path.isfile(emb_path):
        t = torch.from_numpy(np.load(emb_path)).float()
    else:
        if (modality, caption) not in memo:
            memo[(modality, caption)] = model.decoder(modality).embed_text([caption])[0].float().cpu()
        t = memo[(modality, caption)]
    return t.reshape(model.config.cond_shape[modality])


def prepare(model, examples, cfg):
    """--prepare: write the ImageBind features of every input and the caption embedding of every output."""
    if not cfg.features_dir:
        raise ValueError("--prepare needs --features-dir=DIR, the folder it writes to")
    done = 0
    for ex in tqdm(examples, desc="prepare"):
        for modality, path in ex.inputs:
            out = _cache_path(cfg, f"imagebind_{model.config.input_proj}", path)
            if not os.path.isfile(out):
                _save_npy(out, input_features(model, modality, path, cfg).numpy())
                done += 1
        for modality, caption, target, emb in ex.outputs:
            out = emb or _cache_path(cfg, f"captions_{modality}", target or caption)
            if not os.path.isfile(out):
                _save_npy(out, caption_target(model, modality, caption, None, {}).numpy().astype(np.float16))
                done += 1
    print(f"prepared {done} files in {cfg.features_dir}")


def _save_npy(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# Losses

def load_target(modality, path, d, frames=8):
    """Target media in the decoder's own layout: image (1, 3, S, S) and video (1, 3, F, S, S) in [-1, 1] at the size the
    UNet was made for; audio (1, 1, T, n_mels) log-mel."""
    scale = 2 ** (len(d.vae.cfg.block_out_channels) - 1)
    S = d.unet.cfg.sample_size * scale
    to_tensor = lambda im: torch.from_numpy(np.asarray(im.convert("RGB").resize((S, S), Image.BICUBIC)).copy()  # noqa
                                            ).permute(2, 0, 1).float() / 127.5 - 1
    if modality == "image":
        return to_tensor(media.read_image(path))[None]
    if modality == "video":
        _, count, get = media.read_video(path)
        idx = torch.linspace(0, count - 1, min(frames, count)).round().long().tolist()
        return torch.stack([to_tensor(Image.fromarray(f)) for f in get(idx)], dim=1)[None]  # (1, 3, F, S, S)
    wave, sr = media.read_audio(path)
    if sr != 16000:
        wave = torchaudio.functional.resample(wave, sr, 16000)
    vc = d.vocoder.cfg
    mel = decoders.mel_spectrogram(wave[0], vc.model_in_dim, math.prod(vc.upsample_rates))
    return mel[:len(mel) // scale * scale][None, None]  # (1, 1, T, n_mels), T a multiple of the VAE's stride


def target_latents(model, modality, path):
    """The target media as the frozen decoder's latents x0 (scaled), for the denoising loss."""
    d = model.decoder(modality)
    x = load_target(modality, path, d)  # pixels / frames / mel in the decoder's own layout
    p = next(d.vae.parameters())
    with torch.no_grad():
        if modality == "video":  # (1, 3, F, H, W): the 2-D VAE sees frames
            B, C, Fr, H, W = x.shape
            mean, _ = d.vae.encode(x.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W).to(p.device, p.dtype))
            z = mean.reshape(B, Fr, *mean.shape[1:]).permute(0, 2, 1, 3, 4)
        else:
            z, _ = d.vae.encode(x.to(p.device, p.dtype))
    return z.float() * d.vae.cfg.scaling_factor


def compute_losses(model, batch, cfg, memo):
    """-> {name: (sum, count)}: sums and counts, so data-parallel ranks can divide by the global count."""
    embeds, labels, outs = [], [], []
    for ex in batch:
        inputs = [(m, model.project(input_features(model, m, p, cfg).to(model.device)[None])[0]) for m, p in ex.inputs]
        e, lab = model.prompt_embeds(ex.turns, inputs, labels=True)
        embeds.append(e[0, :cfg.max_len])
        labels.append(lab[:cfg.max_len])
        outs.append(ex.outputs)
    T = max(e.shape[0] for e in embeds)
    D = embeds[0].shape[-1]
    E = torch.zeros(len(batch), T, D, device=model.device, dtype=embeds[0].dtype)  # right padding, as official
    L = torch.full((len(batch), T), -100, dtype=torch.long)
    for b, (e, lab) in enumerate(zip(embeds, labels)):
        E[b, :len(e)], L[b, :len(lab)] = e, lab
    L = L.to(model.device)
    logits, h = model.llm(embeds=E, return_hidden=True)  # (B, T, V), (B, T, D)
    # next-token NLL: the logits at t predict the label at t + 1
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), L[:, 1:].flatten(), ignore_index=-100,
                          reduction="sum")
    losses = {"nll": (nll, int((L[:, 1:] != -100).sum()))}
    zero = h.sum() * 0  # keeps every loss in the graph, so all ranks reduce the same tensors
    align, n_align, den, n_den = zero, 0, zero, 0
    if "align" in cfg.losses or "denoise" in cfg.losses:
        for b, outputs in enumerate(outs):
            # each output's run of signal tokens, in the order the reply gives them (the training positions:
            # the hidden states where the signal tokens are the input, anyToImageVideoAudio.py:_train_with_mode)
            starts = {m: (L[b] == model.signal_ids(m)[0]).nonzero().flatten().tolist() for m in MODALITIES}
            for modality, caption, target_media, emb in outputs:
                if not starts[modality]:
                    continue  # cut off by max_len
                s = starts[modality].pop(0)
                n = model.config.signal_tokens[modality]
                cond = model.project_signal(modality, h[b:b + 1, s:s + n])  # (1, Q, W)
                if "align" in cfg.losses and caption:
                    target = caption_target(model, modality, caption, emb, memo).to(cond.device)
                    w = cfg.video_align_weight if modality == "video" else 1.0
                    align = align + w * nextgpt.caption_distance(cond[0], target)
                    n_align += 1
                if "denoise" in cfg.losses and cfg.denoise_weight > 0 and target_media:
                    den = den + denoise_loss(model, modality, cond, target_media)
                    n_den += 1
    losses["align"] = (align, n_align)
    losses["denoise"] = (den, n_den)
    return losses


def denoise_loss(model, modality, cond, path):
    """Conditional latent denoising: the frozen UNet, conditioned on the projector output, predicts the noise added to
    the target's latents (or v, for a v-prediction decoder). Gradients reach the projector through cond only (the UNet
    is frozen)."""
    d = model.decoder(modality)
    z0 = target_latents(model, modality, path)
    noise = torch.randn_like(z0)
    t = torch.randint(0, d.sampler.num_train_timesteps, (z0.shape[0],), device=z0.device)
    x_t = d.sampler.add_noise(z0, noise, t)
    p = next(d.unet.parameters())
    if modality == "audio":  # AudioLDM: the embedding is the class label, no cross-attention context
        out = d.unet(x_t.to(p.dtype), t, None, class_labels=cond[:, 0].to(p.dtype))
    else:
        out = d.unet(x_t.to(p.dtype), t, cond.to(p.dtype))
    return F.mse_loss(out.float(), d.sampler.target(z0, noise, t))


# ----------------------------------------------------------------------------------------------------------------------
# What trains

def select_trainable(model, cfg):
    """Freeze everything, then unfreeze what the stage trains. The new token rows train in every stage; a gradient
    mask keeps the original rows of embed_tokens and lm_head bit-identical."""
    model.requires_grad_(False)
    if "lora" in cfg.trains:
        if not nextgpt.llm.lora_state_dict(model.llm):
            c = model.config
            nextgpt.llm.add_lora(model.llm, c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_targets)
        for n, p in model.llm.named_parameters():
            p.requires_grad_(".lora_" in n)
    for name in cfg.trains:
        if name != "lora":
            getattr(model, name).requires_grad_(True)
    base = model.config.llm.vocab_size
    for w in (model.llm.model.embed_tokens.weight, model.llm.lm_head.weight):
        w.requires_grad_(True)
        mask = torch.zeros(w.shape[0], 1, device=w.device, dtype=w.dtype)
        mask[base:] = 1
        w.register_hook(lambda g, mask=mask: g * mask)
    return [p for p in model.parameters() if p.requires_grad]


def resolve_device(name):
    """"auto": this process's GPU (LOCAL_RANK under torchrun) if there is one, else the CPU; a name, checked."""
    if name == "auto":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return cli.device(name)


def build_model(cfg):
    cfg.device = resolve_device(cfg.device)
    if cfg.tiny_random:
        model = nextgpt.tiny_random(seed=cfg.seed)
    else:
        # the decoders stay: every step needs their text encoders (caption targets) or UNets (latent denoising);
        # stage 1 aligns the encoding side and reads none (toy.py's recipe runs it before they are trained)
        model = NextGPT.from_pretrained(cfg.ckpt, device=cfg.device, keep_decoders=True,
                                        decoders=() if cfg.stage == 1 else MODALITIES)
    delta = weights.load_file(cfg.delta) if cfg.delta else {}
    # the projection: --input_proj, else the delta's (a stage-1 delta of the grouping over backbones whose manifest
    # says linear), else the checkpoint's
    kind = cfg.input_proj or ("group" if any(k.endswith("in_fc.weight") for k in delta) else "linear" if delta else "")
    if kind and kind != model.config.input_proj:
        model.config.input_proj = kind  # the paper's concept grouping instead of the released linear
        model.input_proj = NextGPT(model.config, model.llm, model.tokenizer).input_proj.to(model.device)
    if delta:
        model.load_delta(delta)
    return model


def lr_at(step, total, cfg):
    warm = cfg.warmup if cfg.warmup >= 1 else cfg.warmup * total
    warm = max(10, int(warm)) if total > 10 else 0
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------------------------------
# Saving: atomic, only the trainable tensors, in the layout nextgpt.py loads

def save_checkpoint(model, opt, step, cfg, rng):
    name = f"step_{step:07d}"
    final = os.path.join(cfg.out_dir, name)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    save_file(sd, os.path.join(tmp, "nextgpt.safetensors"))
    torch.save({"optimizer": opt.state_dict(), "step": step, "rng": rng, "config": dataclasses.asdict(cfg)},
               os.path.join(tmp, "train_state.pt"))
    if getattr(model, "source", None):  # a manifest, so NextGPT.from_pretrained(this folder) loads it whole
        files = {k: os.path.relpath(p, final) for k, p in model.source.items() if k != "delta"}
        model.save_manifest(tmp, {**files, "delta": "nextgpt.safetensors"})
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # the checkpoint appears whole or not at all
    latest = os.path.join(cfg.out_dir, "latest")
    with open(latest + ".tmp", "w") as f:
        f.write(name)
    os.replace(latest + ".tmp", latest)
    saves = sorted(d for d in os.listdir(cfg.out_dir) if d.startswith("step_") and not d.endswith(".tmp"))
    for old in saves[:-cfg.keep]:  # only after the new one is complete
        shutil.rmtree(os.path.join(cfg.out_dir, old), ignore_errors=True)
    return final


def rng_state():
    # plain tensors and tuples only, so that torch.load(weights_only=True) reads it back
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------------------------------------------------
# The loop

def train(cfg: TrainConfig, model: NextGPT | None = None, examples: list | None = None, log=print) -> NextGPT:
    """Train and return the model. model / examples may be given (tests); otherwise built from cfg."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    cfg.device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = model or build_model(cfg)
    model.to(cfg.device)
    if examples is None:
        examples, problems = [], []
        for path in filter(None, cfg.data.split(",")):
            ex, bad = read_data(path, cfg, model.config)
            examples += ex
            problems += bad
        for p in problems[:20]:
            log(f"skipped {p}")
        if problems:
            log(f"skipped {len(problems)} bad records of {len(problems) + len(examples)}")
    if not examples:
        raise ValueError("no training examples: give --data, comma-separated files in the official formats")
    params = select_trainable(model, cfg)
    model.llm.gradient_checkpointing = cfg.grad_checkpointing
    model.train()
    if model.encoder is not None:
        model.encoder.eval()  # frozen backbones stay in eval mode (no dropout, no drop path)
    rows = {id(model.llm.model.embed_tokens.weight), id(model.llm.lm_head.weight)}
    opt = torch.optim.AdamW([
        {"params": [p for p in params if id(p) not in rows], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) in rows], "weight_decay": 0.0},  # decay would move the frozen rows
    ], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    global_batch = cfg.batch_size * world
    steps_per_epoch = max(1, len(examples) // (global_batch * cfg.grad_accum))
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    step = 0
    if cfg.resume:
        step = _resume(model, opt, cfg, log)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.device.startswith("cuda") and \
        cfg.dtype in ("auto", "bf16") else torch.autocast("cpu", enabled=False)
    memo = {}
    os.makedirs(cfg.out_dir, exist_ok=True)
    logf = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank == 0 else None
    bar = tqdm(total=total, initial=step, desc=f"stage {cfg.stage}", disable=rank != 0)
    while step < total:
        lr = lr_at(step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        stats = {}
        for micro in range(cfg.grad_accum):
            batch = _batch(examples, step * cfg.grad_accum + micro, global_batch, cfg.seed)[
                rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            with autocast:
                parts = compute_losses(model, batch, cfg, memo)
            loss = 0.0
            for name, (s, n) in parts.items():
                n = _all_sum(float(n), world)  # divide by the count over all ranks: the mean of the global batch
                value = s / max(n, 1.0)
                weight = {"nll": cfg.nll_weight, "align": cfg.align_weight, "denoise": cfg.denoise_weight}[name]
                if name in cfg.losses:
                    loss = loss + weight * value
                stats[name] = stats.get(name, 0.0) + _all_sum(float(s.detach()), world) / max(n, 1.0) / cfg.grad_accum
            (loss / cfg.grad_accum).backward()
        if world > 1:  # data parallel: sum the gradients of the ranks (each already divided by the global count)
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip) if cfg.clip > 0 else torch.tensor(0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items() if k in cfg.losses})
        if logf:
            logf.write(json.dumps({"step": step, "lr": lr, "grad_norm": float(grad_norm), **stats}) + "\n")
            logf.flush()
        if rank == 0 and ((cfg.save_every and step % cfg.save_every == 0) or step == total):
            save_checkpoint(model, opt, step, cfg, rng_state())
        if cfg.log_every and step % cfg.log_every == 0 and rank == 0:
            bar.write(f"step {step}/{total} lr {lr:.2e} " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()))
    bar.close()
    if logf:
        logf.close()
    if world > 1:
        dist.barrier()
    return model


def _batch(examples, index, size, seed):
    """The index-th global batch: epochs walk a permutation drawn from (seed, epoch), so a resumed run sees the very
    batches the uninterrupted one would."""
    per_epoch = max(1, len(examples) // size)
    epoch, k = divmod(index, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [examples[i] for i in order[k * size:(k + 1) * size]]


def _all_sum(x, world):
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def _resume(model, opt, cfg, log):
    """Continue from the newest checkpoint in out_dir that loads whole; a damaged newer one is named and left as it
    is (never deleted: the next save of that step replaces it)."""
    saves = sorted((d for d in os.listdir(cfg.out_dir) if re.fullmatch(r"step_\d+", d)), reverse=True) \
        if os.path.isdir(cfg.out_dir) else []
    if not saves:
        raise ValueError(f"--resume: no checkpoint in {cfg.out_dir} (no step_N folder); train without --resume")
    for name in saves:
        folder = os.path.join(cfg.out_dir, name)
        try:
            saved = load_file(os.path.join(folder, "nextgpt.safetensors"))
            nextgpt.weights.check(model, saved, what=folder, partial=True)
            state = torch.load(os.path.join(folder, "train_state.pt"), weights_only=True)
            break
        except nextgpt.weights.CheckpointError:
            raise  # a whole checkpoint of another model: not damage, and the older ones would not fit either
        except Exception as e:  # truncated or corrupt files: safetensors, pickle and zip errors alike
            log(f"--resume: {folder} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); trying the one "
                "before")
    else:
        raise ValueError(f"--resume: none of the {len(saves)} checkpoints in {cfg.out_dir} loads whole (see above)")
    with torch.no_grad():  # copy into the parameters the optimiser holds (placing new ones would orphan them)
        current = model.state_dict()
        for name, t in saved.items():
            current[name].copy_(t)
    opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    log(f"resumed from {folder} at step {state['step']}")
    return state["step"]


def main(argv):
    cfg, do_prepare = parse_args(argv)
    try:
        if do_prepare:
            model = build_model(cfg)
            examples = []
            for path in filter(None, cfg.data.split(",")):
                ex, bad = read_data(path, cfg, model.config)
                examples += ex
                for b in bad:
                    print(f"skipped {b}")
            prepare(model, examples, cfg)
            return
        t0 = time.time()
        train(cfg)
    except (OSError, ValueError) as e:  # a missing or damaged file, a bad record file: say which
        if os.environ.get("NEXTGPT_DEBUG"):
            raise
        sys.exit(f"train.py: {e}")
    except KeyboardInterrupt:  # every save is whole or absent: the last complete one stays as it was
        sys.exit(f"train.py: interrupted; the checkpoints in {cfg.out_dir} are the complete ones (--resume continues)")
    print(f"done in {time.time() - t0:.0f} s; checkpoint in {cfg.out_dir} (NextGPT.from_pretrained('{cfg.out_dir}/"
          f"<latest>') or --delta for the next stage)")


if __name__ == "__main__":
    main(sys.argv[1:])
