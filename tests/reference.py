"""
The reference side of bench.py: the same work built with the reference libraries (transformers, diffusers, open_clip,
from requirements-dev.txt), which the project never imports at run time. bench.py reads this file; pytest does not
collect it (no test_ prefix).
"""

import dataclasses
import inspect
import os
import sys
from functools import partial

import diffusers
import torch
import transformers
from open_clip.transformer import LayerNorm, VisionTransformer


def llama(**config):
    """A random-weight transformers LlamaForCausalLM (eval mode)."""
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()


def load_llama(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)


def vit(**kw):
    """open_clip's VisionTransformer with ImageBind's LayerNorm eps (its vision trunk is an OpenCLIP ViT)."""
    return VisionTransformer(norm_layer=partial(LayerNorm, eps=1e-6), **kw).eval()


def unet(**config):
    diffusers.utils.logging.set_verbosity_error()  # its note on .to(bfloat16) (bench.py's unet-bf16 entry)
    return diffusers.UNet2DConditionModel(**config).eval()


def vae(**config):
    return diffusers.AutoencoderKL(**config).eval()


def sd_pipeline(unet, vae, scheduler_config):
    """StableDiffusionPipeline without text encoder or safety checker: it takes prompt embeddings, as ours does."""
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                             scheduler=diffusers.PNDMScheduler(**scheduler_config), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure_load(folder, who, warmup_folder):
    """
    Print how much the resident memory peaks over the process's before loading folder and running one 16-token
    forward (bench.py runs this in a fresh process). The forward is part of it because both sides memory-map the file:
    a weight is resident once it is used, not when from_pretrained returns. The warm-up load pays the imports and the
    loading path's code pages before the baseline. Peak: VmHWM of /proc/self/status, reset at the baseline through
    /proc/self/clear_refs (ru_maxrss would also count the parent's resident set at the fork).
    """
    import llm

    def status(key):  # bytes
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024

    load = llm.LLaMA.from_pretrained if who == "ours" else load_llama
    load(warmup_folder)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    before = status("VmRSS")
    model = load(folder)
    with torch.no_grad():
        model(torch.arange(1, 17)[None])
    print(status("VmHWM") - before)


if __name__ == "__main__":  # python tests/reference.py FOLDER ours|transformers WARMUP_FOLDER
    measure_load(*sys.argv[1:4])


def _fields(obj, cls, **extra):
    """The fields of a config dataclass that cls.__init__ takes (ours carry the diffusers / transformers names)."""
    accepted = inspect.signature(cls.__init__).parameters
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name in accepted}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in {**values, **extra}.items()}


def save_decoder_parts(folder, kind, parts):
    """bench.py --full-scale's diffusers folder parts, built with diffusers / transformers from our configs (random
    init) and saved in fp16 by their own save_pretrained, one in memory at a time -> model_index.json's entries."""
    diffusers.utils.logging.set_verbosity_error()  # their notes on random init and fp16 casts, progress bars
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    unet_cls = diffusers.UNet3DConditionModel if kind == "video" else diffusers.UNet2DConditionModel
    vae = parts["vae"]
    text_cls, text_cfg_cls = (transformers.ClapTextModelWithProjection, transformers.ClapTextConfig) if \
        kind == "audio" else (transformers.CLIPTextModel, transformers.CLIPTextConfig)
    builders = {
        "unet": lambda: unet_cls(**_fields(parts["unet"], unet_cls)),
        "vae": lambda: diffusers.AutoencoderKL(**_fields(vae, diffusers.AutoencoderKL, **{
            "down_block_types": ["DownEncoderBlock2D"] * len(vae.block_out_channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(vae.block_out_channels)})),
        "text_encoder": lambda: text_cls(text_cfg_cls(**_fields(parts["text"], text_cfg_cls))),
    }
    index = {"unet": ["diffusers", unet_cls.__name__], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", text_cls.__name__]}
    if kind == "audio":
        builders["vocoder"] = lambda: transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(
            **_fields(parts["vocoder"], transformers.SpeechT5HifiGanConfig)))
        index["vocoder"] = ["transformers", "SpeechT5HifiGan"]
    for name, build in builders.items():
        model = build().to(torch.float16)
        model.save_pretrained(os.path.join(folder, name))
        del model
    return index
