"""
Speed and memory, ours against the reference libraries on the same work, side by side in one run.

    python bench.py                 # every entry
    python bench.py --only llama    # entries whose name contains "llama"
    python bench.py --only int8     # LLaMA decode in float32, bfloat16 and int8 against the memory-bandwidth roofline

Same weights, same threads; ours and the reference alternate, each timing is the median of its repeats, and the ratio
printed is reference time / our time (above 1.0: we are faster). Memory is measured in a fresh subprocess.
The reference side is built in tests/reference.py with the libraries of requirements-dev.txt (transformers, diffusers,
open_clip), which the project itself never imports.

The full-scale dry run: the released model at its real sizes, with random weights, anywhere (no download):

    python bench.py --full-scale /data/dry                  # the official sizes: writes ~26 GB, then runs
    python bench.py --full-scale /tmp/dry --scale tiny      # every part at its tiny preset, ~30 s (its test's run)
    python bench.py --full-scale /data/dry --train false --steps 50 --video-frames 24 --audio-seconds 9 --device cuda
    python bench.py --full-scale /data/dry --generate false --train false   # loading and the 7B LLM's decode only

1. writes into DIR, in the official layouts (nextgpt.OFFICIAL_FILES) and formats, random weights at the official sizes:
   vicuna-7b-v0/ as FastChat v0.1.10 made it (2 fp16 pytorch_model-0000k-of-00002.bin shards of 9.98 + 3.50 GB with
   their index and the rotary_emb.inv_freq buffers, 32,001 rows, config.json with the 2023 quirks, a tokenizer.model
   of 32,000 pieces); imagebind_huge.pth (fp32, the official key names; without the depth / thermal / IMU trunks,
   which NExT-GPT drops); nextgpt_7b_tiva_v0/pytorch_model.pt (792 MB, fp16, the official names);
   stable-diffusion-v1-5/, zeroscope_v2_576w/, audioldm-l-full/ built with diffusers / transformers at the official
   configs, random init, saved by their save_pretrained in fp16 (unet, vae, text_encoder, tokenizer: the real file
   format with a byte-level vocabulary, scheduler, vocoder, model_index.json). One model is in memory at a time
   (Vicuna: one ~10 GB shard). What is already in DIR is kept, so that a second run skips the writing.
2. NextGPT.from_pretrained(DIR, dtype=torch.bfloat16), then one any-to-any generate: an image, a video and an audio
   clip in (random official ImageBind inputs); text, an image (512 x 512), a video (2 frames at 320 x 576) and audio
   (1 s) out, 2 denoising steps each (--steps, --image-size, --video-frames, ... change them).
3. One train.py step of each stage at this size, in bfloat16: stage 1 (image -> caption), stage 2 (caption -> image
   signal tokens: NLL, alignment and the latent denoising loss through the image UNet), stage 3 (LoRA and gradient
   checkpointing; an image in, an image out). Their checkpoints (~2 GB each at full size) are removed afterwards
   unless --keep-train.
4. The LLM's decode speed: 16 tokens (--decode) in bfloat16, then again after llm.quantize_int8, each as tokens/s and
   as a fraction of the memory-bandwidth roofline (one matrix-vector product over 1 GiB, measured then).

It prints one line per stage as it ends: its time, its peak resident memory (VmHWM from /proc/self/status, reset
through /proc/self/clear_refs at the stage's start, so that it is the peak of the process during that stage, all it
holds by then included; and torch.cuda.max_memory_allocated on a GPU), and a note (bytes written, the generated
shapes and each decoder's loading time, the losses); then the same rows as a Markdown table for README.md.
"""

import gc
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

import bpe
import cli
import decoders
import encoder
import llm
import nextgpt
import samplers
import train

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tests"))  # tests/reference.py


def side_by_side(name, ours, ref, repeats=5, warmup=1, unit="s"):
    """Run ours() and ref() alternately; report the median of each and the ratio ref / ours."""
    for _ in range(warmup):
        ours(), ref()
    t_ours, t_ref = [], []
    for _ in range(repeats):
        for fn, acc in ((ours, t_ours), (ref, t_ref)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    o, r = statistics.median(t_ours), statistics.median(t_ref)
    return dict(name=name, ours=o, ref=r, ratio=r / o, unit=unit)


# ----------------------------------------------------------------------------------------------------------------------
# LLaMA (issue 2)

def _llama_pair(seed=0):
    """A ~100M-parameter LLaMA, random weights, as transformers and as ours (loaded from the same saved folder)."""
    import reference
    torch.manual_seed(seed)
    ref = reference.llama(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                          num_key_value_heads=12, vocab_size=32000, max_position_embeddings=1024)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = llm.LLaMA.from_pretrained(d)
    return ref, ours


@torch.no_grad()
def bench_llama(repeats=5, dtype=torch.float32):
    ref, ours = _llama_pair()
    ref, ours = ref.to(dtype), ours.to(dtype)
    kind = str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")  # fp32, bf16
    n_params = sum(p.numel() for p in ours.parameters()) / 1e6
    prompt = torch.randint(3, 32000, (1, 512))

    def ours_prefill():  # what generation does first: fill the cache, logits of the last position only
        ours(prompt, cache=ours.new_cache(1, 512), last_only=True)

    def ref_prefill():
        ref(prompt, use_cache=True, logits_to_keep=1)

    short = torch.randint(3, 32000, (1, 16))

    def ours_decode():
        out = ours.generate(short, max_new_tokens=128)
        assert len(out) == 128

    def ref_decode():
        ref.generate(short, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)

    rows = [side_by_side(f"llama {n_params:.0f}M {kind} cpu: prefill 512 tokens", ours_prefill, ref_prefill, repeats),
            side_by_side(f"llama {n_params:.0f}M {kind} cpu: decode 128 tokens (16-token prompt)", ours_decode,
                         ref_decode, max(2, repeats // 2))]
    rows[0]["extra"] = f"{512 / rows[0]['ours']:.0f} vs {512 / rows[0]['ref']:.0f} tokens/s"
    rows[1]["extra"] = f"{128 / rows[1]['ours']:.1f} vs {128 / rows[1]['ref']:.1f} tokens/s"
    return rows


def bench_llama_load_memory():
    """Peak resident memory of from_pretrained and one 16-token forward over the process's memory before loading,
    / the file's size (each side in a fresh process: tests/reference.py measure_load)."""
    import reference
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        reference.llama(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                        vocab_size=32000, max_position_embeddings=1024).save_pretrained(d)
        size = os.path.getsize(os.path.join(d, "model.safetensors"))
        tiny = os.path.join(d, "tiny")
        reference.llama(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                        vocab_size=64, max_position_embeddings=1024).save_pretrained(tiny)
        grown = {}
        for who in ("ours", "transformers"):  # each in a fresh process: tests/reference.py measure_load
            out = subprocess.run([sys.executable, os.path.join(HERE, "tests", "reference.py"), d, who, tiny],
                                 capture_output=True, text=True, cwd=HERE, env={**os.environ, "PYTHONPATH": HERE})
            if out.returncode:
                raise RuntimeError(out.stderr)
            grown[who] = int(out.stdout.strip().splitlines()[-1])
    return [dict(name=f"llama from_pretrained + forward peak memory, {size / 2**30:.2f} GiB safetensors",
                 ours=grown["ours"] / size, ref=grown["transformers"] / size,
                 ratio=grown["transformers"] / grown["ours"],
                 unit="x file", extra=f"{grown['ours'] / 2**20:.0f} MiB vs {grown['transformers'] / 2**20:.0f} MiB")]


@torch.no_grad()
def bench_llama_int8(repeats=5, dim=768, layers=8, hidden=2048, vocab=32000, tokens=128):
    """
    Decode (16-token prompt, then `tokens` new ones) of bench_llama's ~100M LLaMA, ours only (no reference library has
    an int8 LLaMA), in float32, bfloat16 and int8 (llm.quantize_int8 of the bfloat16 model), each against the
    memory-bandwidth roofline measured here (issue 20): one matrix-vector product over a weight of the size decode
    reads a token (every Linear; the embedding reads one row), in float32 and in bfloat16; int8's is its bytes at the
    float32 product's GB/s. The reference column is the roofline's time, the ratio the fraction of it reached.
    """
    cfg = llm.LLaMAConfig(dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=dim // 64, vocab_size=vocab,
                          hidden_dim=hidden, max_seq_len=1024)
    n = layers * (4 * dim * dim + 3 * dim * hidden) + vocab * dim  # the Linears' weights: what a token reads

    def median_time(runs, fn, *args, **kw):
        fn(*args, **kw)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn(*args, **kw)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    roofline = {}
    for dtype in (torch.float32, torch.bfloat16):
        w, x = torch.randn(n // dim, dim, dtype=dtype), torch.randn(1, dim, dtype=dtype)  # (n / D, D) @ (D,)
        roofline[dtype] = median_time(10, torch.nn.functional.linear, x, w)
    gbs = n * 4 / roofline[torch.float32] / 1e9
    rows, rate = [], {}
    prompt = torch.randint(3, vocab, (1, 16))
    for kind in ("float32", "bfloat16", "int8"):
        torch.manual_seed(0)  # the same weights each time
        model = llm.LLaMA(cfg).eval().to(torch.float32 if kind == "float32" else torch.bfloat16)
        if kind == "int8":
            llm.quantize_int8(model)
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        t = median_time(max(2, repeats // 2), model.generate, prompt, max_new_tokens=tokens)
        roof = tokens * (n / (gbs * 1e9) if kind == "int8" else roofline[getattr(torch, kind)])
        rate[kind] = tokens / t
        rows.append(dict(name=f"llama {kind} decode {tokens} tokens, ours vs the roofline", ours=t, ref=roof,
                         ratio=roof / t, unit="s", extra=f"{rate[kind]:.1f} tokens/s, weights {size / 1e6:.0f} MB" +
                         (f", {rate[kind] / rate['bfloat16']:.2f}x bf16's tokens/s" if kind == "int8" else "")))
    rows[0]["extra"] += f"; roofline: {gbs:.1f} GB/s float32, {n * 2 / roofline[torch.bfloat16] / 1e9:.1f} bfloat16"
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# ImageBind (issue 3)

@torch.no_grad()
def bench_imagebind(repeats=5, width=512, layers=12, heads=8, batch=8):
    """
    The ImageBind vision trunk against open_clip's VisionTransformer with the same weights: ImageBind's vision trunk
    is an OpenCLIP ViT (ViT-H-14 at full size), so the weights map one to one (the 2-frame Conv3d stem on a still
    image = a Conv2d with the two frame kernels summed). Image -> pooled embedding before normalisation, fp32.
    """
    import reference
    torch.manual_seed(0)
    cfg = encoder.ImageBindConfig(vision_dim=width, vision_layers=layers, vision_heads=heads)
    ours = encoder.ImageBind(cfg, modalities=("vision",)).eval()
    ref = reference.vit(image_size=224, patch_size=14, width=width, layers=layers, heads=heads, mlp_ratio=4,
                        output_dim=cfg.out_dim)
    for p in ours.parameters():  # random LayerNorms and biases too, so the agreement check means something
        p.add_(torch.randn_like(p) * 0.02)
    pre, trunk, head = (getattr(ours, n).vision
                        for n in ("modality_preprocessors", "modality_trunks", "modality_heads"))
    w = pre.rgbt_stem.proj[1].weight  # (D, 3, 2, 14, 14)
    sd = {"conv1.weight": w[:, :, 0] + w[:, :, 1], "class_embedding": pre.cls_token[0, 0],
          "positional_embedding": pre.pos_embedding_helper.pos_embed[0],
          "ln_pre.weight": trunk.pre_transformer_layer[0].weight, "ln_pre.bias": trunk.pre_transformer_layer[0].bias,
          "ln_post.weight": head[0].weight, "ln_post.bias": head[0].bias, "proj": head[2].weight.t()}
    names = {"ln_1": "norm_1", "ln_2": "norm_2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "attn.out_proj"}
    for i, blk in enumerate(trunk.blocks):
        r = f"transformer.resblocks.{i}."
        sd[r + "attn.in_proj_weight"], sd[r + "attn.in_proj_bias"] = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        for a, b in names.items():
            sd[r + a + ".weight"] = blk.get_submodule(b).weight
            sd[r + a + ".bias"] = blk.get_submodule(b).bias
    ref.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    x = torch.randn(batch, 3, 224, 224)
    run_ours = lambda: head(trunk(pre(x)))  # noqa: E731  (B, out_dim) before the postprocessor
    err = (run_ours() - ref(x)).abs().max().item()
    assert err < 1e-3, f"ours and open_clip disagree: max abs diff {err}"
    return [side_by_side(f"imagebind vision trunk w{width} L{layers} B{batch} 224px vs open_clip ViT", run_ours,
                         lambda: ref(x), repeats)]


# ----------------------------------------------------------------------------------------------------------------------
# Decoders (issue 4)

@torch.no_grad()
def bench_unet(repeats=5, dtype=torch.float32):
    """UNet2D forward in the SD 1.5 layout at reduced width: (64, 128, 256, 256), context 77 x 768, 32 x 32, batch 2."""
    import reference
    torch.manual_seed(0)
    ref = reference.unet(sample_size=32, block_out_channels=(64, 128, 256, 256), cross_attention_dim=768,
                         norm_num_groups=32)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = decoders.UNet2D.from_pretrained(d)
    ref, ours = ref.to(dtype), ours.to(dtype)
    x, ctx, t = torch.randn(2, 4, 32, 32, dtype=dtype), torch.randn(2, 77, 768, dtype=dtype), torch.tensor(500)
    kind = "" if dtype == torch.float32 else " " + str(dtype).removeprefix("torch.")
    return [side_by_side(f"unet2d SD-layout w64 32x32 B2 forward{kind}", lambda: ours(x, t, ctx),
                         lambda: ref(x, t, encoder_hidden_states=ctx), repeats)]


@torch.no_grad()
def bench_image_pipeline(repeats=5, steps=25):
    """A 25-step tiny image pipeline with guidance: generate_image vs StableDiffusionPipeline(prompt_embeds)."""
    import reference
    torch.manual_seed(0)
    unet = reference.unet(
        sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        norm_num_groups=16)
    vae = reference.vae(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
                 skip_prk_steps=True, steps_offset=1)
    pipe = reference.sd_pipeline(unet, vae, sched)
    with tempfile.TemporaryDirectory() as d:
        unet.save_pretrained(d + "/unet")
        vae.save_pretrained(d + "/vae")
        o_unet, o_vae = decoders.UNet2D.from_pretrained(d + "/unet"), decoders.VAE.from_pretrained(d + "/vae")
    sampler = samplers.PNDM(**sched)
    cond, uncond, latents = torch.randn(1, 77, 64), torch.randn(1, 77, 64), torch.randn(1, 4, 32, 32)
    ours = lambda: decoders.generate_image(o_unet, o_vae, sampler, cond, uncond, steps=steps, height=64,  # noqa
                                           width=64, latents=latents, progress=False)
    ref = lambda: pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps,  # noqa
                       height=64, width=64, latents=latents, output_type="pt")
    return [side_by_side(f"image pipeline, tiny SD, {steps} PNDM steps with guidance", ours, ref, repeats)]


# ----------------------------------------------------------------------------------------------------------------------
# The full-scale dry run (issue 22): random weights at the official sizes, in the official layouts, then
# NextGPT.from_pretrained, one any-to-any generate and one train.py step per stage, each timed with its peak memory

@dataclass
class DryRun:
    scale: str = "official"  # official: the released sizes; tiny: every part at its tiny preset (tests, a smoke run)
    device: str = "cpu"  # where the model loads, generates and trains
    dtype: str = "bfloat16"  # bfloat16, float16 or float32: NextGPT.from_pretrained's dtype
    offload: bool = False  # NextGPT.from_pretrained(offload=True): backbones visit the GPU only while they work
    steps: int = 2  # denoising steps of each decoder
    image_size: int = 512  # the generated image, square
    video_frames: int = 2  # the generated video (official: 24)
    video_height: int = 320
    video_width: int = 576
    audio_seconds: float = 1.0  # the generated audio (official: 9)
    max_new_tokens: int = 8  # reply tokens; the three signal runs are forced in after them
    generate: bool = True  # the any-to-any generate after loading
    train: bool = True  # one train.py step of each stage after the generation
    keep_train: bool = False  # keep the training checkpoints (about 2 GB per stage at full size)
    decode: int = 16  # last, LLM decode speed: this many tokens in dtype, then with llm.quantize_int8 (0: skip)

    @classmethod
    def preset(cls, scale):
        if scale == "official":
            return cls()
        if scale == "tiny":
            return cls(scale="tiny", image_size=32, video_height=32, video_width=32, audio_seconds=0.2)
        raise ValueError(f"--scale must be official or tiny, not {scale!r}")


def dry_run_parts(scale):
    """The configs of every part at this scale: the official presets of each module, or their tiny ones."""
    official = scale == "official"
    config = nextgpt.NextGPTConfig.preset("7b_tiva_v0" if official else "tiny")
    names = {"image": ("sd-v1-5", "sd-v1-5", "sd-v1-5"), "video": ("zeroscope-v2-576w", "sd-v1-5", "zeroscope-v2-576w"),
             "audio": ("audioldm-l-full", "audioldm-l-full", "audioldm-l-full")} if official else \
        {"image": ("tiny", "tiny", "tiny"), "video": ("tiny-video", "tiny", "tiny"),
         "audio": ("tiny-audio", "tiny-audio", "tiny")}
    parts = {}
    for m, (unet, vae, text) in names.items():
        parts[m] = dict(unet=decoders.UNetConfig.preset(unet), vae=decoders.VAEConfig.preset(vae),
                        text=(decoders.CLAPTextConfig if m == "audio" else decoders.CLIPTextConfig).preset(text))
    parts["audio"]["vocoder"] = decoders.HiFiGANConfig.preset("audioldm-l-full" if official else "tiny")
    return config, parts


# scheduler_config.json as published (the values tests/test_decoders.py checks our samplers against)
SCHEDULERS = {
    "image": {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
              "steps_offset": 1, "trained_betas": None, "clip_sample": False},
    "video": {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
              "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None},
    "audio": {"_class_name": "DDIMScheduler", "beta_end": 0.0195, "beta_schedule": "scaled_linear",
              "beta_start": 0.0015, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
              "steps_offset": 1, "trained_betas": None},
}
# config.json of Vicuna v0 as FastChat v0.1.10 wrote it with transformers 4.28.0.dev0 (LLaMA-1's conversion config with
# the new vocabulary): no max_position_embeddings, and bos 0 / eos 1 / pad -1 where tokenizer.model says 1 / 2
VICUNA_QUIRKS = {"_name_or_path": "vicuna-7b-v0", "architectures": ["LlamaForCausalLM"], "bos_token_id": 0,
                 "eos_token_id": 1, "hidden_act": "silu", "initializer_range": 0.02, "max_sequence_length": 2048,
                 "model_type": "llama", "pad_token_id": -1, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
                 "torch_dtype": "float16", "transformers_version": "4.28.0.dev0", "use_cache": True}


def _status(key):
    """A /proc/self/status entry in bytes (VmHWM: the peak resident set), or None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


class Stages:
    """Times each stage and its peak resident memory: VmHWM, reset at each stage's start through /proc/self/clear_refs
    (Linux), so that each row is that stage's own peak (ru_maxrss would be the process's, and misleads after fork)."""

    def __init__(self, device, log=print):
        self.rows, self.log, self.cuda = [], log, str(device).startswith("cuda")
        self.resettable = True

    def __call__(self, name):
        return _Stage(self, name)


class _Stage:
    def __init__(self, stages, name):
        self.stages, self.name, self.extra = stages, name, ""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS := current RSS
        except OSError:
            self.stages.resettable = False
        if self.stages.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        secs, peak = time.perf_counter() - self.t0, _status("VmHWM")
        gpu = torch.cuda.max_memory_allocated() if self.stages.cuda else None
        self.stages.rows.append((self.name, secs, peak, gpu, self.extra))
        mem = f"{peak / 2**30:6.2f} GiB" if peak is not None else "     n/a"
        gpu_mem = f"  GPU {gpu / 2**30:.2f} GiB" if gpu is not None else ""
        self.stages.log(f"{self.name:<56} {secs:7.1f} s  peak {mem}{gpu_mem}  {self.extra}", flush=True)


def _random_(t, name, g):
    """Random values for a weight by its role: norms one, biases zero, everything else N(0, 0.02)."""
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        return t.fill_(1.0)
    if leaf == "bias":
        return t.zero_()
    return t.normal_(0.0, 0.02, generator=g)


def sentencepiece_model(n_pieces, path, seed=0):
    """A LLaMA-style sentencepiece BPE tokenizer.model of exactly n_pieces (32,000 at full size) in seconds: trained on
    generated words (bpe.train_sentencepiece: a few hundred pieces), then made-up pieces appended through the
    model's protobuf, lower in score than every trained one."""

    from sentencepiece import sentencepiece_model_pb2

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(800)]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(1500))
    text += "\n### Human: describe this image\n### Assistant: a red circle\n" * 20
    with tempfile.TemporaryDirectory() as d:
        trained = bpe.train_sentencepiece(text, min(n_pieces, 1000), os.path.join(d, "sp"))
        m = sentencepiece_model_pb2.ModelProto()
        with open(trained, "rb") as f:
            m.ParseFromString(f.read())
    have, low, k = {p.piece for p in m.pieces}, min(p.score for p in m.pieces), 0
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    if len(m.pieces) > n_pieces:
        raise ValueError(f"sentencepiece_model: trained {len(m.pieces)} pieces, more than {n_pieces}")
    while len(m.pieces) < n_pieces:
        k += 1
        if f"\u2581q{k}" not in have:
            m.pieces.add(piece=f"\u2581q{k}", score=low - k, type=normal)
    with open(path, "wb") as f:
        f.write(m.SerializeToString())
    return path


def _done(path, log):
    if os.path.exists(path):
        log(f"  {path} is there: kept (delete it to write it again)")
        return True
    return False


def write_vicuna(folder, cfg, seed=0, max_shard_bytes=None, log=print):
    """
    Vicuna-7B v0 as FastChat v0.1.10 saved it (transformers 4.28): 32,001 token rows (its [PAD]),
    pytorch_model-0000k-of-00002.bin fp16 shards (a new shard when the next tensor would pass 10 GB, as
    save_pretrained's max_shard_size="10GB") with pytorch_model.bin.index.json, the per-layer rotary_emb.inv_freq
    buffers, config.json with the 2023 quirks, and the delta's tokenizer files (tokenizer.model of 32,000 pieces, no
    added_tokens.json: the common form). Random N(0, 0.02) weights, made one shard at a time (at most ~10 GB held).
    """
    if _done(folder, log):
        return
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    rows = cfg.vocab_size + 1  # the [PAD] row
    with torch.device("meta"):
        model = llm.LLaMA(replace(cfg, vocab_size=rows))
    specs = []  # (name, shape, dtype) in 4.28's state-dict order: inv_freq after o_proj
    for name, t in model.state_dict().items():
        specs.append((name, tuple(t.shape), torch.float16))
        if name.endswith("self_attn.o_proj.weight"):
            specs.append((name.replace("o_proj.weight", "rotary_emb.inv_freq"), (cfg.head_dim // 2,), torch.float32))
    model_bytes = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in specs)
    # save_pretrained's max_shard_size="10GB"; a model smaller than that is cut at 3/4, so that it has two shards too
    max_shard_bytes = max_shard_bytes or (10 * 10**9 if model_bytes > 10 * 10**9 else model_bytes * 3 // 4)
    shards, size = [[]], 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    g = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        file = f"pytorch_model-{k:05d}-of-{len(shards):05d}.bin"
        sd = {n: inv_freq.clone() if n.endswith("inv_freq") else _random_(torch.empty(s, dtype=dt), n, g)
              for n, s, dt in shard}
        torch.save(sd, os.path.join(partial, file))
        total += sum(t.numel() * t.element_size() for t in sd.values())
        weight_map.update(dict.fromkeys(sd, file))
        del sd
    _write_json(os.path.join(partial, "pytorch_model.bin.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(partial, "config.json"), {
        **VICUNA_QUIRKS, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_attention_heads": cfg.n_heads, "num_hidden_layers": cfg.n_layers, "vocab_size": rows})
    sentencepiece_model(cfg.vocab_size, os.path.join(partial, "tokenizer.model"), seed)
    _write_json(os.path.join(partial, "special_tokens_map.json"),
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    _write_json(os.path.join(partial, "tokenizer_config.json"),
                {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
                 "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"})
    os.replace(partial, folder)


def write_imagebind(path, cfg, seed=0, log=print):
    """imagebind_huge.pth: torch.save of the state dict, fp32, the official key names (ours are the same: encoder.py
    loads the official file strictly), for the vision, audio and text trunks. The real file also holds the depth,
    thermal and IMU trunks, which NExT-GPT drops on loading: left out here."""
    from encoder import ImageBind
    if _done(path, log):
        return
    torch.manual_seed(seed)
    model = ImageBind(cfg, modalities=("vision", "audio", "text"))
    torch.save(model.state_dict(), path + ".partial")
    del model
    os.replace(path + ".partial", path)


# our delta names -> the official ones of ChocoWu/nextgpt_7b_tiva_v0/pytorch_model.pt (nextgpt.load_delta reads back)
_OFFICIAL_DELTA = [("llm.model.", "llama_model.base_model.model.model."),
                   ("llm.lm_head.", "llama_model.base_model.model.lm_head."), ("input_proj.", "llama_proj."),
                   ("output_proj.image.", "gen_text_hidden_fcs.0."),
                   ("output_proj.video.", "gen_text_hidden_fcs_video.0."),
                   ("output_proj.audio.", "gen_text_hidden_fcs_audio.0.")]


def write_delta(path, config, seed=0, log=print):
    """nextgpt_7b_tiva_v0/pytorch_model.pt: a pickled dict of fp16 tensors under the official names (peft's LoRA
    naming with .default.weight), 792 MB at full size, random."""
    if _done(path, log):
        return
    with torch.device("meta"):
        model = nextgpt.NextGPT(config)
        llm.add_lora(model.llm, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets)
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, t in model.trainable_state_dict().items():
        ours, official = next((a, b) for a, b in _OFFICIAL_DELTA if name.startswith(a))
        official += name[len(ours):]
        if ".lora_" in name:
            official += ".default.weight"
        sd[official] = _random_(torch.empty(t.shape, dtype=torch.float16), name, g)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(sd, path + ".partial")
    os.replace(path + ".partial", path)


def write_decoder(folder, kind, parts, seed=0, log=print):
    """
    A diffusers pipeline folder (Stable Diffusion 1.5, Zeroscope v2 576w or AudioLDM l-full) built with the reference
    libraries at the official configs, random init, saved in fp16 safetensors by their own save_pretrained (one part
    in memory at a time): unet/, vae/, text_encoder/, tokenizer/, scheduler/ (+ vocoder/), model_index.json. The
    tokenizer files have the real format (vocab.json, merges.txt) with a byte-level vocabulary, not the real one
    (data we cannot make up); the text encoders keep the official vocabulary size.
    """
    import reference  # the reference libraries, for tests and benchmarks only (tests/reference.py)

    if _done(folder, log):
        return
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(seed)
    classes = reference.save_decoder_parts(partial, kind, parts)  # unet/, vae/, text_encoder/ (+ vocoder/)
    tok = os.path.join(partial, "tokenizer")
    os.makedirs(tok)
    vocab = bpe.byte_vocab("roberta" if kind == "audio" else "clip")
    _write_json(os.path.join(tok, "vocab.json"), {t: i for i, t in enumerate(vocab)})
    with open(os.path.join(tok, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    if kind == "audio":  # RoBERTa's: <s> ... </s> padded with <pad> to the CLAP positions less two (512)
        _write_json(os.path.join(tok, "tokenizer_config.json"), {
            "tokenizer_class": "RobertaTokenizer", "model_max_length": parts["text"].max_position_embeddings - 2})
    else:  # Stable Diffusion 1.x pads with <|endoftext|>
        _write_json(os.path.join(tok, "special_tokens_map.json"), {"pad_token": "<|endoftext|>"})
        _write_json(os.path.join(tok, "tokenizer_config.json"), {"tokenizer_class": "CLIPTokenizer",
                                                                 "model_max_length": 77})
    os.makedirs(os.path.join(partial, "scheduler"))
    _write_json(os.path.join(partial, "scheduler", "scheduler_config.json"), SCHEDULERS[kind])
    pipeline = {"image": "StableDiffusionPipeline", "video": "TextToVideoSDPipeline", "audio": "AudioLDMPipeline"}[kind]
    index = {"_class_name": pipeline, "scheduler": ["diffusers", SCHEDULERS[kind]["_class_name"]],
             "tokenizer": ["transformers", "RobertaTokenizer" if kind == "audio" else "CLIPTokenizer"], **classes}
    _write_json(os.path.join(partial, "model_index.json"), index)
    os.replace(partial, folder)


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _folder_problem(folder, scale):
    """Why folder cannot take a dry run at this scale (None: it can): one folder, one scale; the official layout has no
    nextgpt.json (from_pretrained would read that instead)."""
    marker = os.path.join(folder, "dry_run.json")
    written = _read_json(marker)["scale"] if os.path.isfile(marker) else None
    if written not in (None, scale):
        return f"{folder} holds a dry run at {written} size, not {scale}; give another folder"
    if scale == "official" and os.path.isfile(os.path.join(folder, "nextgpt.json")):
        return f"{folder} has a nextgpt.json, which the official layout has not; give another folder"
    return None


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _bytes(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def full_scale(folder, run=None, log=print):
    """
    The dry run: write every file at run.scale (kept when already there), NextGPT.from_pretrained(folder) in run.dtype,
    one any-to-any generate (image + audio + video in; text + image + video + audio out), then one train.py step of
    each stage. Returns the rows (stage, seconds, peak bytes, peak GPU bytes, note). See the module docstring.
    """
    run = run or DryRun()
    config, parts = dry_run_parts(run.scale)
    os.makedirs(folder, exist_ok=True)
    problem = _folder_problem(folder, run.scale)
    if problem:
        raise ValueError(problem)
    _write_json(os.path.join(folder, "dry_run.json"), {"scale": run.scale})  # never mix two scales in one folder
    stages = Stages(run.device, log)
    log(f"dry run at {run.scale} size in {folder}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {run.device}")
    files = {k: rel for k, (rel, _) in nextgpt.OFFICIAL_FILES.items()}
    writers = [("vicuna", lambda p: write_vicuna(p, config.llm, log=log)),
               ("imagebind", lambda p: write_imagebind(p, config.imagebind, log=log)),
               ("delta", lambda p: write_delta(p, config, log=log))]
    writers += [(m, lambda p, m=m: write_decoder(p, m, parts[m], log=log)) for m in nextgpt.MODALITIES]
    for key, write in writers:
        path = os.path.join(folder, files[key])
        with stages(f"write {files[key]}") as s:
            write(path)
            s.extra = f"{_bytes(_size(path))} on disk"
    if run.scale != "official":  # the official layout reads no manifest; a smaller one needs its config named
        _write_json(os.path.join(folder, nextgpt.MANIFEST), {"config": config.to_dict(), "files": files})
    gc.collect()

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if run.dtype not in dtypes:
        raise ValueError(f"--dtype must be one of {', '.join(dtypes)}, not {run.dtype!r}")
    with stages(f"NextGPT.from_pretrained, {run.dtype}"):
        model = nextgpt.NextGPT.from_pretrained(folder, dtype=dtypes[run.dtype], device=run.device,
                                                offload=run.offload)
    # time each decoder's (lazy) loading inside generate, and free the decoders after it
    loaders, loaded = {m: model.backbones[m] for m in nextgpt.MODALITIES}, {}

    def timed(m):
        def load():
            t0 = time.perf_counter()
            d = loaders[m]()
            loaded[m] = time.perf_counter() - t0
            return d
        return load
    model.backbones.update({m: timed(m) for m in nextgpt.MODALITIES})
    if run.generate:
        c = config.imagebind
        g = torch.Generator().manual_seed(0)
        image = torch.randn(3, c.image_size, c.image_size, generator=g)  # official ImageBind inputs (encoder.load_*)
        video = torch.randn(15, 3, 2, c.image_size, c.image_size, generator=g)
        audio = torch.randn(3, 1, c.mel_bins, c.audio_frames, generator=g)
        with stages("generate: image+audio+video in, all out") as s:
            out = model.generate("Describe these, then draw, film and play them.", images=[image], videos=[video],
                                 audios=[audio], want=nextgpt.MODALITIES, max_new_tokens=run.max_new_tokens,
                                 steps=run.steps, height={"image": run.image_size, "video": run.video_height},
                                 width={"image": run.image_size, "video": run.video_width}, frames=run.video_frames,
                                 seconds=run.audio_seconds, progress=False)
            shapes = {m: tuple(out[m][0].shape) for m in nextgpt.MODALITIES}
            s.extra = f"{len(out['tokens'])} tokens, {shapes}; decoder loading " + \
                ", ".join(f"{m} {t:.1f} s" for m, t in loaded.items())
        del out
    model.backbones.update(loaders)  # release the decoders: training loads the image one again
    gc.collect()
    if run.train:
        _train_steps(model, folder, run, stages)
    if run.decode:
        _decode_stages(model.llm, run, stages)
    total = sum(r[1] for r in stages.rows)
    peaks = [r[2] for r in stages.rows if r[2] is not None]
    log(f"total {total:.0f} s; the highest peak {max(peaks) / 2**30:.2f} GiB" if peaks else f"total {total:.0f} s")
    if not stages.resettable:
        log("(each peak is the process's since its start: /proc/self/clear_refs could not be written)")
    # the same as a Markdown table, for README.md
    gpu = any(r[3] is not None for r in stages.rows)
    log("\n| stage | time | peak RSS (VmHWM) |" + (" peak GPU |" if gpu else "") + "\n|---|---:|---:|" +
        ("---:|" if gpu else ""))
    for name, secs, peak, gpu_peak, _ in stages.rows:
        log(f"| {name} | {secs:.1f} s | " + (f"{peak / 2**30:.2f} GiB |" if peak is not None else "n/a |") +
            (f" {gpu_peak / 2**30:.2f} GiB |" if gpu else ""))
    return stages.rows


def _matvec_gbs(dtype, device, nbytes=2**30):
    """The memory-bandwidth roofline: GB/s of one matrix-vector product over a weight of nbytes (far past the caches,
    so its size no longer matters), median of 5."""
    w = torch.randn(nbytes // (4096 * dtype.itemsize), 4096, device=device, dtype=dtype)
    x = torch.randn(1, 4096, device=device, dtype=dtype)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        if w.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return w.numel() * dtype.itemsize / statistics.median(times[1:]) / 1e9


@torch.no_grad()
def _decode_stages(lm, run, stages):
    """
    The LLM's decode speed at this size: run.decode tokens after a 16-token prompt (the prefill not counted), in the
    loaded dtype, then again after llm.quantize_int8 (stage 3's LoRA merged first). Each against the roofline: the
    bytes of the weights a token reads (every Linear; the embedding reads one row) at _matvec_gbs's rate, that of the
    dtype (int8: float32's, as bench_llama_int8).
    """
    if any(isinstance(m, llm.LoRALinear) for m in lm.modules()):
        llm.merge_lora(lm)
    lm.eval()
    device, dtype = lm.lm_head.weight.device, lm.lm_head.weight.dtype
    prompt = torch.randint(3, lm.config.vocab_size, (1, 16), device=device)
    for kind in (str(dtype).removeprefix("torch."), "int8"):
        name = f"decode {run.decode} tokens, {kind}" + (" (llm.quantize_int8 first)" if kind == "int8" else "")
        gbs = _matvec_gbs(torch.float32 if kind == "int8" else dtype, device)  # before: not in the stage's peak
        gc.collect()
        with stages(name) as s:
            if kind == "int8":
                llm.quantize_int8(lm)
            stream = lm.stream(prompt, max_new_tokens=run.decode + 1)
            next(stream)  # the prefill and its token
            t0 = time.perf_counter()
            n = sum(1 for _ in stream)
            rate = n / (time.perf_counter() - t0)
            read = sum(t.numel() * t.element_size() for m in lm.modules() if isinstance(m, (nn.Linear, llm.Int8Linear))
                       for t in (m.weight, getattr(m, "scale", None)) if t is not None)
            s.extra = (f"{rate:.2f} tokens/s; {read / 1e9:.2f} GB of weights a token: {rate * read / 1e9 / gbs:.0%} "
                       f"of the roofline ({gbs:.1f} GB/s, one matrix-vector product over 1 GiB"
                       f"{' of float32' if kind == 'int8' else ''})")


def _train_steps(model, folder, run, stages):
    """One step of each stage at this scale, in the model's dtype: stage 1 (image -> caption), stage 2 (caption ->
    image signal tokens: NLL + alignment + the latent denoising loss through the image UNet), stage 3 (LoRA and
    gradient checkpointing: an image in, an image out)."""
    from PIL import Image
    media = os.path.join(folder, "dry_run_media")
    os.makedirs(media, exist_ok=True)
    png = os.path.join(media, "image.png")
    Image.fromarray(torch.randint(0, 256, (256, 256, 3), dtype=torch.uint8).numpy()).save(png)
    caption = "a red circle on a blue square"
    img = train.signal_text(model.config, "image")
    examples = {1: train.Example([("generate a caption", caption)], inputs=[("image", png)]),
                2: train.Example([(caption, caption + img)], outputs=[("image", caption, png, None)]),
                3: train.Example([("<image> What is in it? Draw it again.", caption + img)], inputs=[("image", png)],
                                 outputs=[("image", caption, None, None)])}
    for stage, example in examples.items():
        out_dir = os.path.join(folder, f"dry_run_train_stage{stage}")
        shutil.rmtree(out_dir, ignore_errors=True)
        cfg = train.TrainConfig(**{**train.STAGE_PRESETS[stage], "stage": stage, "max_steps": 1, "batch_size": 1,
                                   "log_every": 0, "out_dir": out_dir, "device": run.device,
                                   "denoise_weight": 1.0 if stage == 2 else 0.0, "grad_checkpointing": stage == 3})
        what = {1: "input projection", 2: "projectors + UNet denoising", 3: "LoRA + checkpointing"}[stage]
        with stages(f"train.py stage {stage}, one step ({what})") as s:
            train.train(cfg, model, [example], log=lambda *a: None)
            with open(os.path.join(out_dir, "log.jsonl")) as f:
                logged = json.loads(f.read().splitlines()[-1])
            losses = [k for k in cfg.losses if k != "denoise" or cfg.denoise_weight > 0]
            s.extra = " ".join(f"{k} {logged[k]:.3f}" for k in losses) + f"; checkpoint {_bytes(_size(out_dir))}"
        if not run.keep_train:
            shutil.rmtree(out_dir)
    model.eval()


BENCHES = {"llama": bench_llama, "llama-load-memory": bench_llama_load_memory, "llama-int8": bench_llama_int8,
           "llama-bf16": lambda repeats: bench_llama(repeats, torch.bfloat16), "imagebind": bench_imagebind,
           "unet": bench_unet, "unet-bf16": lambda repeats: bench_unet(repeats, torch.bfloat16),
           "image-pipeline": bench_image_pipeline}


def main(argv=None):
    p = cli.parser("bench.py", __doc__)
    p.add_argument("--only", default="", metavar="TEXT", help=f"run the entries whose name contains this: "
                   f"{', '.join(BENCHES)} (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each side; the median counts (default: 5)")
    p.add_argument("--runs", type=int, default=1, help="run every entry this many times, one after the other, then "
                   "print a Markdown table of each run's ratio (default: 1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help=f"torch threads (default: {torch.get_num_threads()}, this machine's)")
    p.add_argument("--full-scale", metavar="DIR", help="the full-scale dry run instead of the entries: write random "
                   "weights at the official sizes and layouts into DIR (kept for the next run), load, generate, train "
                   "one step per stage (see the DryRun options)")
    cli.add_config_options(p, DryRun)
    args = vars(p.parse_args(cli.underscores_to_dashes(sys.argv[1:] if argv is None else argv)))
    full, only, repeats, threads = args.pop("full_scale"), args.pop("only"), args.pop("repeats"), args.pop("threads")
    runs = args.pop("runs")
    if repeats < 1 or threads < 1 or runs < 1:
        p.error(f"--repeats, --threads and --runs must be positive integers (got {repeats}, {threads}, {runs})")
    try:
        scale = cli.parse_value(args.get("scale", "official"), "official", "scale")
        run = cli.config_from(DryRun, args, base=DryRun.preset(scale))
        if run.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"--dtype takes bfloat16, float16 or float32, not {run.dtype!r}")
        small = [f"--{k.replace('_', '-')} {v}" for k, v in vars(run).items()
                 if k in ("steps", "image_size", "video_frames", "video_height", "video_width", "max_new_tokens",
                          "audio_seconds") and v <= 0 or k == "decode" and v < 0]
        if small:
            raise ValueError(f"{small[0]} is too small: counts, sizes and seconds are positive (--decode may be 0: "
                             f"no decode stages)")
    except ValueError as e:
        p.error(str(e))
    if args and not full:
        p.error(f"--{next(iter(args)).replace('_', '-')} is an option of the dry run: give --full-scale DIR too")
    if full and os.path.exists(full) and not os.path.isdir(full):
        p.error(f"--full-scale {full} is a file; give a folder (it is made if missing)")
    if full and os.path.isdir(full) and _folder_problem(full, run.scale):
        p.error(f"--full-scale {_folder_problem(full, run.scale)}")
    torch.set_num_threads(threads)
    if full:
        full_scale(full, run)
        return
    machine = (f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} cores, "
               f"{'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print(machine)
    t0, table = time.perf_counter(), {}  # entry -> its rows, one a run
    for k in range(runs):
        print(f"{'entry' + (f' (run {k + 1} of {runs})' if runs > 1 else ''):<70} {'ours':>10} {'reference':>10} "
              f"{'ratio':>7}")
        for name, fn in BENCHES.items():
            if only not in name:
                continue
            kw = {"repeats": repeats} if "repeats" in fn.__code__.co_varnames else {}
            for row in fn(**kw):
                table.setdefault(row["name"], []).append(row)
                print(f"{row['name']:<70} {row['ours']:>9.3f}{row['unit'][0]} {row['ref']:>9.3f}{row['unit'][0]} "
                      f"{row['ratio']:>6.2f}x  {row.get('extra', '')}", flush=True)
    if runs > 1:  # README's table: the last run's figures, and the ratio of every run
        day = time.strftime("%Y-%m-%d", time.gmtime())
        print(f"\n{machine}, {runs} runs in {time.perf_counter() - t0:.0f} s, {day}"
              f"\n\n| entry | ours | reference | ratio, run " + ", ".join(map(str, range(1, runs + 1))) +
              " |\n| --- | --- | --- | --- |")
        for name, rows in table.items():
            last = rows[-1]
            unit = " " + last["unit"] if last["unit"] != "s" else " s"
            print(f"| {name} | {last['ours']:.3f}{unit} | {last['ref']:.3f}{unit} | "
                  + ", ".join(f"{r['ratio']:.2f}x" for r in rows) + " |")


if __name__ == "__main__":
    main()
