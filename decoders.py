"""
The three latent-diffusion decoders NExT-GPT draws its outputs with, written from scratch, loading diffusers-format
weights: Stable Diffusion 1.5 (image), Zeroscope v2 576w (video) and AudioLDM l-full (audio); their VAEs, the
HiFi-GAN vocoder, the CLIP / CLAP text encoders (for the unconditional "" embedding and for caption targets in
training), three samplers (DDIM, PNDM, DPM-Solver++ 2M) and three generate_* functions that take conditioning
embeddings (what NExT-GPT's output projectors produce), not prompts.

References:
- Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models, https://arxiv.org/abs/2112.10752
- Song et al. 2021, Denoising Diffusion Implicit Models (DDIM), https://arxiv.org/abs/2010.02502
- Liu et al. 2022, Pseudo Numerical Methods for Diffusion Models (PNDM), https://arxiv.org/abs/2202.09778
- Lu et al. 2022, DPM-Solver++, https://arxiv.org/abs/2211.01095
- Wang et al. 2023, ModelScope Text-to-Video (the UNet3D Zeroscope fine-tunes), https://arxiv.org/abs/2308.06571
- Liu et al. 2023, AudioLDM, https://arxiv.org/abs/2301.12503
- Kong et al. 2020, HiFi-GAN, https://arxiv.org/abs/2010.05646
- Wu et al. 2023, NExT-GPT, https://arxiv.org/abs/2309.05519 (code/model/custom_sd.py, custom_vd.py, custom_ad.py)
- diffusers: models/unets/unet_2d_condition.py, unet_3d_condition.py, unet_2d_blocks.py, unet_3d_blocks.py,
  models/resnet.py, transformers/transformer_2d.py, transformer_temporal.py, attention.py, autoencoders/vae.py,
  schedulers/scheduling_{ddim,pndm,dpmsolver_multistep}.py, pipelines/stable_diffusion, text_to_video_synthesis,
  audioldm
- transformers: models/clip (CLIPTextModel), models/clap (ClapTextModelWithProjection),
  models/speecht5 (SpeechT5HifiGan)

Module names equal the diffusers / transformers state-dict keys, so a checkpoint loads by a strict name-and-shape
check (weights.place); the few renames (old VAE attention names, CLIP's text_model. prefix, RoBERTa's nesting) are
each one explicit function below.
"""

import math
import os
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from bpe import CLIPTokenizer, RobertaTokenizer
from samplers import load_sampler
from weights import CheckpointError, load_folder, place, read_json, still_on_meta

DIFFUSERS_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
TRANSFORMERS_STEMS = ("model", "pytorch_model")


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _config_from_dict(cls, d, **forced):
    """A config dataclass from a config.json dict: known fields only (lists become tuples), the rest ignored."""
    names = {f.name for f in fields(cls)}
    return cls(**{**{k: _tuples(v) for k, v in d.items() if k in names}, **forced})


class _Config:
    """What the config dataclasses share: the official presets by name, and reading a config.json."""
    PRESETS = {}  # filled below each class

    @classmethod
    def preset(cls, name):
        return replace(cls.PRESETS[name])  # a copy: presets stay as published

    @classmethod
    def from_json(cls, path):
        d = read_json(path)
        return _config_from_dict(cls, d.get("text_config", d))  # a full CLIPConfig / ClapConfig nests the text one


def _unsupported(d, allowed, what):
    """Refuse config options we do not implement rather than silently computing something else."""
    bad = {k: d[k] for k, ok in allowed.items() if k in d and d[k] not in ok}
    if bad:
        raise NotImplementedError(f"{what}: unsupported config options {bad} (implemented: "
                                  f"{ {k: allowed[k] for k in bad} })")


def _load_model(model_cls, cfg, folder, dtype, device, stems, rename=None):
    """Read (cast while reading), rename, build on the meta device, place strictly. The decoders are frozen in NExT-GPT:
    requires_grad off (the denoising loss still backpropagates through them to the conditioning)."""
    sd = load_folder(folder, stems=stems, dtype=dtype, device=device)
    if rename is not None:
        sd = rename(sd)
    with torch.device("meta"):
        model = model_cls(cfg)
    place(model, sd, what=folder)
    left = still_on_meta(model)
    if left:
        raise CheckpointError(f"{folder}: not filled by the checkpoint: {left[:10]}")
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32:
            # oneDNN's float32 convolutions on the CPU run faster on channels-last (NHWC) weights, and then give
            # channels-last outputs to the next layer: bench.py unet and image-pipeline (docs/speed.md)
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks shared by the UNets and the VAE

def timestep_embedding(t, dim, flip_sin_to_cos=True, shift=0.0, max_period=10000):
    """Sinusoidal timestep features (diffusers get_timestep_embedding): t (B,) -> (B, dim), fp32."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    args = t[:, None].float() * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:  # SD and friends were trained with [cos, sin]
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers TimestepEmbedding: Linear -> SiLU -> Linear."""

    def __init__(self, dim_in, dim):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D (pre-norm, 'default' time-embedding injection). temb_dim=None: the VAE's blocks."""

    def __init__(self, c_in, c_out, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out) if temb_dim is not None else None
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout 0 at inference)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """diffusers Downsample2D with a conv. The VAE pads (0,1,0,1) asymmetrically and convolves with padding 0."""

    def __init__(self, c, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """diffusers Upsample2D: nearest x2 (or to the skip's size: odd latents, AudioLDM's 125 rows), then a conv."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, size=None):
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


class Attention(nn.Module):
    """
    diffusers Attention with AttnProcessor2_0 (SDPA). context=None: self-attention, which is also what attn2 does
    in AudioLDM's UNet (no text context) and in the temporal transformers (double self-attention).
    """

    def __init__(self, dim, heads, head_dim, context_dim=None, bias=False):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])  # index 0 keeps the key `to_out.0`

    def forward(self, x, context=None):
        context = x if context is None else context
        B, T, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (B, T, nh*hs) -> (B, nh, T, hs)
        q, k, v = (y.view(B, -1, self.heads, y.shape[-1] // self.heads).transpose(1, 2) for y in (q, k, v))
        # softmax(q k^T / sqrt(hs)) v, fused
        y = F.scaled_dot_product_attention(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh*hs)
        return self.to_out[0](y)


class SpatialSelfAttention(Attention):
    """The VAE's mid-block attention (diffusers Attention with group_norm, residual, one head of width C)."""

    def __init__(self, c, groups, eps=1e-6):
        super().__init__(c, heads=1, head_dim=c, bias=True)
        self.group_norm = nn.GroupNorm(groups, c, eps=eps)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class GEGLU(nn.Module):
    """diffusers GEGLU: one projection to 2x the width, half of it gates the other through GELU."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers FeedForward(activation_fn='geglu'): keys ff.net.0.proj and ff.net.2."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """diffusers BasicTransformerBlock (layer_norm type): self-attention, cross-attention, GEGLU feed-forward."""

    def __init__(self, dim, heads, head_dim, context_dim=None, positions=0):
        super().__init__()
        # positions > 0: sinusoidal positions added to both attentions' inputs (diffusers' positional_embeddings=
        # "sinusoidal", as in AnimateDiff's motion modules), computed in forward: no weights. Zeroscope has none
        self.positions = positions
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context=None):
        pe = None  # no positions: nothing added (not `h + 0`, a copy of h twice a block)
        if self.positions:
            if x.shape[1] > self.positions:
                raise ValueError(f"{x.shape[1]} frames, but this UNet has positions for {self.positions} at most")
            pe = sinusoidal_positions(x.shape[1], x.shape[-1], x.device).to(x.dtype)  # (T, dim), made in place
        h = self.norm1(x)
        x = x + self.attn1(h if pe is None else h + pe)
        h = self.norm2(x)
        x = x + self.attn2(h if pe is None else h + pe, context)
        return x + self.ff(self.norm3(x))


def sinusoidal_positions(n, dim, device=None):
    """(n, dim) fp32, diffusers SinusoidalPositionalEmbedding: the timestep features of 0..n-1, their sines and
    cosines interleaved (sin(p w_i) in channel 2i, cos(p w_i) in 2i + 1) instead of in two halves."""
    emb = timestep_embedding(torch.arange(n, device=device), dim, flip_sin_to_cos=False)  # (n, [sin | cos])
    return emb.view(n, 2, dim // 2).transpose(1, 2).flatten(1)


class SpatialTransformer(nn.Module):
    """diffusers Transformer2DModel on continuous input: GroupNorm, proj_in (1x1 conv or Linear), blocks, proj_out."""

    def __init__(self, c, heads, head_dim, context_dim, groups, linear_proj, layers=1):
        super().__init__()
        inner = heads * head_dim
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.proj_in = nn.Linear(c, inner) if linear_proj else nn.Conv2d(c, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, head_dim, context_dim) for _ in range(layers)])
        self.proj_out = nn.Linear(inner, c) if linear_proj else nn.Conv2d(inner, c, 1)

    def forward(self, x, context=None):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear_proj:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)  # (B, C, H, W) -> (B, HW, C)
        if self.linear_proj:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_proj:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, -1).permute(0, 3, 1, 2)  # (B, HW, C) -> (B, C, H, W)
        if not self.linear_proj:
            h = self.proj_out(h.contiguous())
        return x + h


class TemporalTransformer(nn.Module):
    """
    diffusers TransformerTemporalModel: attention along the frame axis at every pixel. Its block's attn2 is a
    second self-attention (double_self_attention), never cross-attention.
    """

    def __init__(self, c, heads, head_dim, groups, positions=0):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.proj_in = nn.Linear(c, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, head_dim, positions=positions)])
        self.proj_out = nn.Linear(inner, c)

    def forward(self, x, frames):
        BF, C, H, W = x.shape
        B = BF // frames
        h = x.reshape(B, frames, C, H, W).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W): one norm over all frames
        h = self.norm(h)
        h = h.permute(0, 3, 4, 2, 1).reshape(B * H * W, frames, C)  # (BHW, F, C): one sequence per pixel
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h)
        h = self.proj_out(h)
        h = h.view(B, H, W, frames, C).permute(0, 3, 4, 1, 2).reshape(BF, C, H, W)  # back to (B*F, C, H, W)
        return x + h


class TemporalConv(nn.Module):
    """diffusers TemporalConvLayer: four (GroupNorm, SiLU, [Dropout], Conv3d k=(3,1,1)) stages over frames, residual."""

    def __init__(self, c, groups):
        super().__init__()

        def stage(dropout):  # Sequential indices match the keys: conv1.0/conv1.2, convN.0/convN.3
            mods = [nn.GroupNorm(groups, c), nn.SiLU()] + ([nn.Dropout(0.0)] if dropout else [])
            return nn.Sequential(*mods, nn.Conv3d(c, c, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1, self.conv2, self.conv3, self.conv4 = stage(False), stage(True), stage(True), stage(True)
        # as diffusers: the last conv starts at zero, so that a new layer is the identity (x + 0). Only this conv:
        # a zeroed GroupNorm before it would feed it zeros, and neither would ever get a gradient.
        nn.init.zeros_(self.conv4[-1].weight)
        nn.init.zeros_(self.conv4[-1].bias)

    def forward(self, x, frames):
        BF, C, H, W = x.shape
        x = x.reshape(BF // frames, frames, C, H, W).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)
        h = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        x = x + h
        return x.permute(0, 2, 1, 3, 4).reshape(BF, C, H, W)


# ---------------------------------------------------------------------------------------------------------------------
# UNets

@dataclass
class UNetConfig(_Config):
    """diffusers UNet2DConditionModel / UNet3DConditionModel config.json (the fields these three checkpoints use)."""
    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    # 2-D UNets: the number of heads per block (diffusers' historical misnomer); 3-D UNet: the true head width
    attention_head_dim: object = 8
    cross_attention_dim: object = 768  # int, or one per down block (AudioLDM)
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    class_embed_type: str = None  # None or "simple_projection" (AudioLDM: Linear 512 -> 4C)
    projection_class_embeddings_input_dim: int = None
    class_embeddings_concat: bool = False  # AudioLDM: [temb, class emb] -> every resnet sees 8C
    video: bool = False  # UNet3DConditionModel
    # not in diffusers' UNet3DConditionModel (0 for Zeroscope): > 0 gives the temporal attentions sinusoidal frame
    # positions, up to this many frames. Without them only the temporal convs' zero padding tells the first frame from
    # the last, which a small video UNet does not learn (docs/toy-notes.md)
    temporal_positions: int = 0

    @classmethod
    def from_json(cls, path):
        d = read_json(path)
        video = d.get("_class_name") == "UNet3DConditionModel"
        _unsupported(d, {
            "mid_block_type": ("UNetMidBlock2DCrossAttn",), "resnet_time_scale_shift": ("default",),
            "time_embedding_type": ("positional",), "addition_embed_type": (None,), "encoder_hid_dim": (None,),
            "class_embed_type": (None, "simple_projection"), "transformer_layers_per_block": (1,),
            "only_cross_attention": (False,), "dual_cross_attention": (False,), "num_class_embeds": (None,),
            "center_input_sample": (False,), "act_fn": ("silu",), "time_cond_proj_dim": (None,),
            "conv_in_kernel": (3,), "conv_out_kernel": (3,), "mid_block_scale_factor": (1, 1.0),
            "resnet_out_scale_factor": (1, 1.0), "attention_type": ("default",),
            "num_attention_heads": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
            "time_embedding_dim": (None,), "cross_attention_norm": (None,), "encoder_hid_dim_type": (None,),
            "resnet_skip_time_act": (False,), "mid_block_only_cross_attention": (None, False),
            "reverse_transformer_layers_per_block": (None,),
        }, path)
        # the 3-D blocks always use Linear projections; the 3-D model has no such option
        return _config_from_dict(cls, d, video=video, **({"use_linear_projection": True} if video else {}))


UNET_PRESETS = UNetConfig.PRESETS = {
    "sd-v1-5": UNetConfig(),
    "zeroscope-v2-576w": UNetConfig(
        attention_head_dim=64, cross_attention_dim=1024, use_linear_projection=True, video=True,
        down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3),
    "audioldm-l-full": UNetConfig(
        in_channels=8, out_channels=8, sample_size=128, block_out_channels=(256, 512, 768, 1280),
        cross_attention_dim=(256, 512, 768, 1280),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        class_embed_type="simple_projection", projection_class_embeddings_input_dim=512, class_embeddings_concat=True),
    "tiny": UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                       cross_attention_dim=32, norm_num_groups=8,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}
# the Zeroscope and AudioLDM layouts at the tiny size (nextgpt.tiny_random)
UNET_PRESETS["tiny-video"] = replace(UNET_PRESETS["tiny"], video=True, attention_head_dim=8, use_linear_projection=True,
                                     down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                     up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))
UNET_PRESETS["tiny-audio"] = replace(UNET_PRESETS["tiny"], cross_attention_dim=(32, 64),
                                     class_embed_type="simple_projection", projection_class_embeddings_input_dim=16,
                                     class_embeddings_concat=True)


class UNetBlock(nn.Module):
    """
    One down, mid or up stage of the UNet; diffusers' DownBlock2D, CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn,
    UpBlock2D, CrossAttnUpBlock2D and, with video=True, their 3-D twins (a TemporalConv after every resnet and a
    TemporalTransformer after every spatial transformer). Order per layer: resnet -> temp_conv -> attn -> temp_attn.
    """

    def __init__(self, kind, c_in, c_out, layers, temb_dim, cfg, heads, head_dim, context_dim,
                 prev_c=None, resample=False, video=False):
        super().__init__()
        self.kind, self.video = kind, video
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        if kind == "down":
            res_in = [c_in] + [c_out] * (layers - 1)
        elif kind == "mid":
            res_in = [c_in] * (layers + 1)  # resnet, (attn, resnet) x layers
        else:  # up: each resnet also takes the matching skip; the last skip comes from the block below
            res_in = [(prev_c if i == 0 else c_out) + (c_in if i == layers - 1 else c_out) for i in range(layers)]
        self.resnets = nn.ModuleList([ResnetBlock(c, c_out, temb_dim, g, eps) for c in res_in])
        self.temp_convs = nn.ModuleList([TemporalConv(c_out, g) for _ in res_in]) if video else None
        if heads:
            self.attentions = nn.ModuleList([SpatialTransformer(c_out, heads, head_dim, context_dim, g,
                                                                cfg.use_linear_projection) for _ in range(layers)])
            self.temp_attentions = nn.ModuleList(
                [TemporalTransformer(c_out, heads, head_dim, g, cfg.temporal_positions) for _ in range(layers)]
            ) if video else None
        else:
            self.attentions = self.temp_attentions = None
        self.downsamplers = nn.ModuleList([Downsample(c_out, cfg.downsample_padding)]) \
            if kind == "down" and resample else None
        self.upsamplers = nn.ModuleList([Upsample(c_out)]) if kind == "up" and resample else None

    def _resnet(self, i, x, temb, frames):
        x = self.resnets[i](x, temb)
        if self.video:
            x = self.temp_convs[i](x, frames)
        return x

    def _attend(self, i, x, context, frames):
        if self.attentions is not None:
            x = self.attentions[i](x, context)
            if self.video:
                x = self.temp_attentions[i](x, frames)
        return x

    def forward(self, x, temb, context=None, frames=1, skips=None, upsample_size=None):
        if self.kind == "mid":
            x = self._resnet(0, x, temb, frames)
            for i in range(len(self.attentions)):
                x = self._attend(i, x, context, frames)
                x = self._resnet(i + 1, x, temb, frames)
            return x
        outs = []
        for i in range(len(self.resnets)):
            if self.kind == "up":
                x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = self._resnet(i, x, temb, frames)
            x = self._attend(i, x, context, frames)
            outs.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            outs.append(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return (x, outs) if self.kind == "down" else x


class UNet2D(nn.Module):
    """
    diffusers UNet2DConditionModel as Stable Diffusion 1.5 and AudioLDM use it: x (B, C, H, W), t, context (B, T, D)
    or None, class_labels (B, 512) or None -> eps (B, C, H, W). UNet3D below reuses every piece with video=True.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if cfg.video != isinstance(self, UNet3D):
            raise ValueError("a video config builds a UNet3D, an image / audio config a UNet2D")
        self.cfg = cfg
        video = cfg.video
        ch = cfg.block_out_channels
        n = len(ch)
        temb_dim = ch[0] * 4

        def per_block(v):  # an int, or one value per down block
            return v if isinstance(v, tuple) else (v,) * n

        head_cfg, ctx = per_block(cfg.attention_head_dim), per_block(cfg.cross_attention_dim)

        def attn_shape(c, h):  # -> (heads, head_dim)
            # diffusers' 2-D blocks read attention_head_dim as the number of heads (SD 1.5: 8 heads of C/8), its 3-D
            # blocks as the head width (Zeroscope: C/64 heads of 64); see diffusers issue #2011
            return (c // h, h) if video else (h, c // h)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        if cfg.class_embed_type == "simple_projection":
            self.class_embedding = nn.Linear(cfg.projection_class_embeddings_input_dim, temb_dim)
        elif cfg.class_embed_type is None:
            self.class_embedding = None
        else:
            raise NotImplementedError(f"class_embed_type {cfg.class_embed_type!r}")
        block_temb = temb_dim * 2 if cfg.class_embeddings_concat else temb_dim
        if video:  # Zeroscope: 8 heads x head_dim temporal attention right after conv_in
            self.transformer_in = TemporalTransformer(ch[0], 8, head_cfg[0], cfg.norm_num_groups,
                                                      cfg.temporal_positions)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            heads, hd = attn_shape(ch[i], head_cfg[i]) if kind.startswith("CrossAttn") else (0, 0)
            self.down_blocks.append(UNetBlock("down", ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, block_temb, cfg,
                                              heads, hd, ctx[i], resample=i < n - 1, video=video))
        heads, hd = attn_shape(ch[-1], head_cfg[-1])
        self.mid_block = UNetBlock("mid", ch[-1], ch[-1], 1, block_temb, cfg, heads, hd, ctx[-1], video=video)
        self.up_blocks = nn.ModuleList()
        rch, rhead, rctx = ch[::-1], head_cfg[::-1], ctx[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            heads, hd = attn_shape(rch[i], rhead[i]) if kind.startswith("CrossAttn") else (0, 0)
            self.up_blocks.append(UNetBlock("up", rch[min(i + 1, n - 1)], rch[i], cfg.layers_per_block + 1, block_temb,
                                            cfg, heads, hd, rctx[i], prev_c=rch[max(i - 1, 0)],
                                            resample=i < n - 1, video=video))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def _temb(self, t, x, B, class_labels=None):
        t = torch.as_tensor(t, device=x.device)
        t = t[None] if t.ndim == 0 else t
        emb = timestep_embedding(t.expand(B), self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos,
                                 self.cfg.freq_shift)
        emb = self.time_embedding(emb.to(x.dtype))  # (B, 4C)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet needs class_labels (AudioLDM: the (B, 512) text embedding)")
            c = self.class_embedding(class_labels.to(self.class_embedding.weight.dtype)).to(x.dtype)
            emb = torch.cat([emb, c], dim=-1) if self.cfg.class_embeddings_concat else emb + c
        return emb

    def _unet(self, x, temb, context, frames=1):
        x = self.conv_in(x)
        if self.cfg.video:
            x = self.transformer_in(x, frames)
        skips = [x]
        for block in self.down_blocks:
            x, outs = block(x, temb, context, frames)
            skips += outs
        x = self.mid_block(x, temb, context, frames)
        for block in self.up_blocks:
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            # upsample to the next skip's size, so odd latent sizes (AudioLDM's 125 mel rows / 4) come back exactly
            size = skips[-1].shape[2:] if block.upsamplers is not None else None
            x = block(x, temb, context, frames, skips=mine, upsample_size=size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def forward(self, x, t, context=None, class_labels=None):
        return self._unet(x, self._temb(t, x, x.shape[0], class_labels), context)

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype | None = None, device=None) -> "nn.Module":
        """A diffusers `unet/` folder: config.json + diffusion_pytorch_model.safetensors (or .bin)."""
        cfg = UNetConfig.from_json(os.path.join(folder, "config.json"))
        if cfg.video != (cls is UNet3D):
            raise CheckpointError(f"{folder} holds a {'3-D' if cfg.video else '2-D'} UNet: use "
                                  f"{'UNet3D' if cfg.video else 'UNet2D'}.from_pretrained")
        return _load_model(cls, cfg, folder, dtype, device, DIFFUSERS_STEMS)


class UNet3D(UNet2D):
    """
    diffusers UNet3DConditionModel (ModelScope / Zeroscope): the 2-D UNet run on all frames as one batch, plus
    transformer_in, temporal convolutions and temporal attention. x (B, C, F, H, W), t, context (B, T, D) -> eps.
    """

    def forward(self, x, t, context=None):
        B, C, Fr, H, W = x.shape
        temb = self._temb(t, x, B).repeat_interleave(Fr, dim=0)  # (B*F, 4C)
        if context is not None:
            context = context.repeat_interleave(Fr, dim=0)  # (B*F, T, D)
        x = x.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, H, W)  # frames become batch entries
        eps = self._unet(x, temb, context, Fr)
        return eps.view(B, Fr, -1, H, W).permute(0, 2, 1, 3, 4)  # (B, C, F, H, W)


# ---------------------------------------------------------------------------------------------------------------------
# VAE

@dataclass
class VAEConfig(_Config):
    """diffusers AutoencoderKL config.json."""
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # the pipelines divide latents by it before decode (the VAE itself does not)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 512

    @classmethod
    def from_json(cls, path):
        d = read_json(path)
        _unsupported(d, {"act_fn": ("silu",)}, path)
        if any(b != "DownEncoderBlock2D" for b in d.get("down_block_types", [])) or \
                any(b != "UpDecoderBlock2D" for b in d.get("up_block_types", [])):
            raise NotImplementedError(f"{path}: only DownEncoderBlock2D / UpDecoderBlock2D VAEs are supported")
        return _config_from_dict(cls, d)


VAE_PRESETS = VAEConfig.PRESETS = {
    "sd-v1-5": VAEConfig(),  # Zeroscope uses the same VAE
    "audioldm-l-full": VAEConfig(in_channels=1, out_channels=1, latent_channels=8, block_out_channels=(128, 256, 512),
                                 scaling_factor=0.9654927849769592),
    "tiny": VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
    "tiny-audio": VAEConfig(in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                            norm_num_groups=8),
}


class VAEStage(nn.Module):
    """diffusers DownEncoderBlock2D (resnets, then a padded stride-2 conv) or UpDecoderBlock2D (resnets, then x2)."""

    def __init__(self, c_in, c_out, layers, groups, down=False, up=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, None, groups, 1e-6)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(c_out, padding=0)]) if down else None
        self.upsamplers = nn.ModuleList([Upsample(c_out)]) if up else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class VAEMidBlock(nn.Module):
    """diffusers UNetMidBlock2D without a time embedding: resnet, single-head self-attention, resnet."""

    def __init__(self, c, groups, attention=True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, None, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(c, groups)]) if attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class VAEEncoder(nn.Module):
    """diffusers Encoder: image (B, 3, H, W) -> (B, 2*latent, H/8, W/8) (mean and log-variance)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([VAEStage(ch[max(i - 1, 0)], c, cfg.layers_per_block, g,
                                                   down=i < len(ch) - 1) for i, c in enumerate(ch)])
        self.mid_block = VAEMidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAEDecoder(nn.Module):
    """diffusers Decoder: latents (B, latent, h, w) -> image (B, 3, 8h, 8w), each up stage has layers+1 resnets."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        rch, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, rch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(rch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([VAEStage(rch[max(i - 1, 0)], c, cfg.layers_per_block + 1, g,
                                                 up=i < len(rch) - 1) for i, c in enumerate(rch)])
        self.conv_norm_out = nn.GroupNorm(g, rch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _vae_rename(sd):
    """Older VAE files (SD 1.x era) name the mid-block attention query/key/value/proj_attn (diffusers renames too)."""
    old = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for k, v in sd.items():
        if ".attentions." in k:
            for a, b in old.items():
                k = k.replace(a, b)
        out[k] = v
    return out


class VAE(nn.Module):
    """
    diffusers AutoencoderKL. encode(x in [-1, 1]) -> (mean, logvar); decode(z) -> x in [-1, 1]. Unscaled: the
    pipelines decode latents / scaling_factor, and training encodes to mean * scaling_factor (+ noise).
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = VAEEncoder(cfg)
        self.decoder = VAEDecoder(cfg)
        L = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(L, L, 1) if cfg.use_post_quant_conv else None

    def encode(self, x):
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)  # (B, L, h, w) each
        return mean, logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution

    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype | None = None, device=None) -> "nn.Module":
        """A diffusers `vae/` folder; both attention namings load."""
        cfg = VAEConfig.from_json(os.path.join(folder, "config.json"))
        return _load_model(cls, cfg, folder, dtype, device, DIFFUSERS_STEMS, rename=_vae_rename)


# ---------------------------------------------------------------------------------------------------------------------
# HiFi-GAN vocoder (AudioLDM's `vocoder/`)

@dataclass
class HiFiGANConfig(_Config):
    """transformers SpeechT5HifiGanConfig (AudioLDM's vocoder/config.json)."""
    model_in_dim: int = 64
    sampling_rate: int = 16000
    upsample_initial_channel: int = 1024
    upsample_rates: tuple = (5, 4, 2, 2, 2)
    upsample_kernel_sizes: tuple = (16, 16, 8, 4, 4)
    resblock_kernel_sizes: tuple = (3, 7, 11)
    resblock_dilation_sizes: tuple = ((1, 3, 5),) * 3
    leaky_relu_slope: float = 0.1
    normalize_before: bool = False


HIFIGAN_PRESETS = HiFiGANConfig.PRESETS = {
    "audioldm-l-full": HiFiGANConfig(),
    "tiny": HiFiGANConfig(model_in_dim=16, upsample_initial_channel=32, upsample_rates=(4, 2),
                          upsample_kernel_sizes=(8, 4), resblock_kernel_sizes=(3, 5),
                          resblock_dilation_sizes=((1, 3), (1, 3))),
}


class HiFiGANResBlock(nn.Module):
    """transformers HifiGanResidualBlock: (leaky, dilated conv, leaky, conv) + residual, per dilation."""

    def __init__(self, c, k, dilations, slope):
        super().__init__()
        self.slope = slope
        self.convs1 = nn.ModuleList([nn.Conv1d(c, c, k, dilation=d, padding=(k * d - d) // 2) for d in dilations])
        self.convs2 = nn.ModuleList([nn.Conv1d(c, c, k, padding=(k - 1) // 2) for _ in dilations])

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, self.slope)), self.slope))
        return x


class HiFiGAN(nn.Module):
    """transformers SpeechT5HifiGan: log-mel (B, frames, 64) -> 16 kHz waveform (B, frames * 160)."""

    def __init__(self, cfg: HiFiGANConfig):
        super().__init__()
        self.cfg = cfg
        c0 = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.model_in_dim, c0, 7, padding=3)
        self.upsampler = nn.ModuleList([
            nn.ConvTranspose1d(c0 // 2 ** i, c0 // 2 ** (i + 1), k, stride=r, padding=(k - r) // 2)
            for i, (r, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))])
        self.resblocks = nn.ModuleList([
            HiFiGANResBlock(c0 // 2 ** (i + 1), k, d, cfg.leaky_relu_slope)
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)])
        self.conv_post = nn.Conv1d(c0 // 2 ** len(cfg.upsample_rates), 1, 7, padding=3)
        # stored in the checkpoint; used only when normalize_before (false for AudioLDM)
        self.register_buffer("mean", torch.zeros(cfg.model_in_dim))
        self.register_buffer("scale", torch.ones(cfg.model_in_dim))

    def forward(self, mel):
        if self.cfg.normalize_before:
            mel = (mel - self.mean) / self.scale
        x = self.conv_pre(mel.transpose(1, 2))  # (B, frames, 64) -> (B, C, frames)
        nk = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.upsampler):
            x = up(F.leaky_relu(x, self.cfg.leaky_relu_slope))
            # multi-receptive-field fusion: the mean of the resblocks with different kernel sizes
            x = sum(self.resblocks[i * nk + j](x) for j in range(nk)) / nk
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as upstream
        return torch.tanh(x).squeeze(1)  # (B, samples)

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype | None = None, device=None) -> "nn.Module":
        cfg = HiFiGANConfig.from_json(os.path.join(folder, "config.json"))
        return _load_model(cls, cfg, folder, dtype, device, TRANSFORMERS_STEMS)


# ---------------------------------------------------------------------------------------------------------------------
# Text encoders: the decoders' own, for the unconditional "" embedding and for caption-alignment targets

@dataclass
class CLIPTextConfig(_Config):
    """transformers CLIPTextConfig (SD's and Zeroscope's text_encoder/config.json)."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # OpenAI CLIP (SD 1.5); OpenCLIP (Zeroscope, SD 2) uses "gelu"
    layer_norm_eps: float = 1e-5


CLIP_TEXT_PRESETS = CLIPTextConfig.PRESETS = {
    "sd-v1-5": CLIPTextConfig(),  # openai/clip-vit-large-patch14
    "zeroscope-v2-576w": CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                        num_attention_heads=16, hidden_act="gelu"),  # OpenCLIP ViT-H minus one layer
    "tiny": CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
}

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "relu": F.relu,
}


class CLIPLayer(nn.Module):
    """transformers CLIPEncoderLayer: pre-LN causal self-attention and MLP."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        D = cfg.hidden_size
        self.heads, self.act = cfg.num_attention_heads, ACTIVATIONS[cfg.hidden_act]
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, nn.Linear(D, D))
        self.layer_norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(D, cfg.intermediate_size)
        self.mlp.fc2 = nn.Linear(cfg.intermediate_size, D)
        self.layer_norm2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def forward(self, x):
        B, T, D = x.shape
        h = self.layer_norm1(x)
        a = self.self_attn
        q, k, v = (p(h).view(B, T, self.heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + a.out_proj(h.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


def _clip_rename(sd):
    """CLIPTextModel keys start with `text_model.`; position_ids (older files) is derivable and dropped."""
    return {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}


class CLIPTextEncoder(nn.Module):
    """transformers CLIPTextModel: ids (B, 77) -> last_hidden_state (B, 77, D), what SD / Zeroscope cross-attend to."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embeddings.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids):
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding(pos)  # (B, T, D)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype | None = None, device=None) -> "nn.Module":
        cfg = CLIPTextConfig.from_json(os.path.join(folder, "config.json"))
        return _load_model(cls, cfg, folder, dtype, device, TRANSFORMERS_STEMS, rename=_clip_rename)


@dataclass
class CLAPTextConfig(_Config):
    """transformers ClapTextConfig (AudioLDM's text_encoder/config.json): a RoBERTa encoder plus a projection."""
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-12
    projection_dim: int = 512
    projection_hidden_act: str = "relu"
    pad_token_id: int = 1


CLAP_TEXT_PRESETS = CLAPTextConfig.PRESETS = {
    "audioldm-l-full": CLAPTextConfig(),  # laion CLAP's RoBERTa-base text tower, as transformers converted it
    "tiny": CLAPTextConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=80, projection_dim=16),
}


class RobertaLayer(nn.Module):
    """transformers ClapTextLayer (= RobertaLayer): post-LN self-attention and MLP, names flattened by _clap_rename."""

    def __init__(self, cfg: CLAPTextConfig):
        super().__init__()
        D = cfg.hidden_size
        self.heads, self.act = cfg.num_attention_heads, ACTIVATIONS[cfg.hidden_act]
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)
        self.attention_dense = nn.Linear(D, D)
        self.attention_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(D, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, D)
        self.output_norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.query, self.key, self.value))
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask (B, 1, 1, T): padding is not attended to
        x = self.attention_norm(x + self.attention_dense(h.transpose(1, 2).reshape(B, T, D)))
        return self.output_norm(x + self.output(self.act(self.intermediate(x))))


_CLAP_RENAMES = [  # (file, ours), applied in order as substring replacements
    ("text_model.embeddings.", "embeddings."),
    ("text_model.encoder.layer.", "layers."),
    ("text_model.pooler.dense.", "pooler."),
    (".attention.self.query.", ".query."), (".attention.self.key.", ".key."), (".attention.self.value.", ".value."),
    (".attention.output.dense.", ".attention_dense."), (".attention.output.LayerNorm.", ".attention_norm."),
    (".intermediate.dense.", ".intermediate."), (".output.dense.", ".output."), (".output.LayerNorm.", ".output_norm."),
]


def _clap_rename(sd):
    """ClapTextModelWithProjection keys -> ours; position_ids / token_type_ids buffers are derivable and dropped."""
    out = {}
    for k, v in sd.items():
        if k.endswith(("embeddings.position_ids", "embeddings.token_type_ids")):
            continue
        for a, b in _CLAP_RENAMES:
            k = k.replace(a, b)
        out[k] = v
    return out


class CLAPTextEncoder(nn.Module):
    """
    transformers ClapTextModelWithProjection: ids (B, T), attention_mask (B, T) -> text_embeds (B, 512), not normalised
    (the AudioLDM pipeline L2-normalises them; so does Decoder.embed_text).
    """

    def __init__(self, cfg: CLAPTextConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(cfg.vocab_size, D)
        self.embeddings.position_embeddings = nn.Embedding(cfg.max_position_embeddings, D)
        self.embeddings.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, D)
        self.embeddings.LayerNorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList([RobertaLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.pooler = nn.Linear(D, D)
        self.text_projection = nn.Module()
        self.text_projection.linear1 = nn.Linear(D, cfg.projection_dim)
        self.text_projection.linear2 = nn.Linear(cfg.projection_dim, cfg.projection_dim)

    def forward(self, ids, attention_mask=None):
        pad = self.cfg.pad_token_id
        keep = ids.ne(pad).long()
        # RoBERTa positions count from pad+1 over the real tokens; padding sits at position `pad`
        pos = torch.cumsum(keep, dim=1) * keep + pad
        e = self.embeddings
        x = e.word_embeddings(ids) + e.token_type_embeddings.weight[0] + e.position_embeddings(pos)
        x = e.LayerNorm(x)  # (B, T, D)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # the <s> token
        p = self.text_projection
        return p.linear2(ACTIVATIONS[self.cfg.projection_hidden_act](p.linear1(pooled)))

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype | None = None, device=None) -> "nn.Module":
        cfg = CLAPTextConfig.from_json(os.path.join(folder, "config.json"))
        return _load_model(cls, cfg, folder, dtype, device, TRANSFORMERS_STEMS, rename=_clap_rename)


# ---------------------------------------------------------------------------------------------------------------------
# Pipelines: conditioning embeddings in, pixels / frames / waveforms out

def randn_tensor(shape, generator=None, device=None, dtype=None):
    """diffusers' randn_tensor: a CPU generator draws on the CPU, then the noise moves, so seeds match diffusers'."""
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def _as_generator(generator):
    """An int seeds a CPU generator (the same noise on every device); a torch.Generator is used as is."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return torch.Generator("cpu").manual_seed(int(generator))


def _denoise(model, sampler, latents, cond, uncond, steps, guidance, progress, desc):
    """
    The sampling loop the three diffusers pipelines share. model(x, t, c) -> eps. Classifier-free guidance when
    guidance > 1: one batch [uncond, cond], eps = eps_u + g (eps_c - eps_u).
    """
    from tqdm import tqdm
    cfg = guidance > 1.0
    if cfg:
        if uncond is None:
            raise ValueError("guidance > 1 needs uncond: the decoder's text encoder on '' (Decoder.embed_text(['']))")
        uncond = uncond.to(cond).expand_as(cond)  # NExT-GPT keeps one (1, ...) unconditional embedding
        cond = torch.cat([uncond, cond])
    sampler.set_timesteps(steps, device=latents.device)
    for t in tqdm(sampler.timesteps, desc=desc, disable=not progress):
        x = torch.cat([latents] * 2) if cfg else latents
        eps = model(x, t, cond)
        if cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        latents = sampler.step(eps, t, latents)
    return latents


def _prepare(unet, sampler, cond, latent_shape, generator, latents):
    """cond on the UNet's device and dtype; the initial latents (B, *latent_shape), drawn as diffusers draws them."""
    p = next(unet.parameters())
    cond = cond.to(p.device, p.dtype)
    if latents is None:
        latents = randn_tensor((cond.shape[0], *latent_shape), _as_generator(generator), p.device, p.dtype)
    return cond, latents.to(p.device, p.dtype) * sampler.init_noise_sigma


def _decode(vae, latents, batch=None):
    """Unscale and decode, `batch` images at a time (the VAE sees each image alone: the same result, less memory)."""
    vp = next(vae.parameters())
    z = (latents / vae.cfg.scaling_factor).to(vp.device, vp.dtype)
    batch = batch or len(z)
    return torch.cat([vae.decode(z[i:i + batch]) for i in range(0, len(z), batch)]).float()


def _vae_scale(vae):
    return 2 ** (len(vae.cfg.block_out_channels) - 1)


@torch.no_grad()
def generate_image(unet, vae, sampler, cond, uncond=None, steps=50, guidance=7.5, height=512, width=512,
                   generator=None, latents=None, progress=True):
    """
    StableDiffusionPipeline from prompt embeddings: cond (B, 77, 768) [, uncond (1 or B, 77, 768)] -> pixels
    (B, 3, H, W) in [0, 1], fp32. generator: a seed or a torch.Generator; latents: (B, 4, H/8, W/8) to start from.
    """
    s = _vae_scale(vae)
    cond, latents = _prepare(unet, sampler, cond, (unet.cfg.in_channels, height // s, width // s),
                             generator, latents)
    latents = _denoise(unet, sampler, latents, cond, uncond, steps, guidance, progress, "image")
    return (_decode(vae, latents) * 0.5 + 0.5).clamp(0, 1)


@torch.no_grad()
def generate_video(unet, vae, sampler, cond, uncond=None, steps=50, guidance=7.5, frames=24, height=320, width=576,
                   generator=None, latents=None, progress=True, decode_batch=8):
    """
    TextToVideoSDPipeline from prompt embeddings: cond (B, 77, 1024) -> frames (B, F, 3, H, W) in [0, 1], fp32
    (diffusers' output_type "pt" layout). NExT-GPT: 24 frames of 320 x 576, guidance 7.5 (diffusers: 16, 9.0).
    Latents (B, 4, F, H/8, W/8); the VAE decodes decode_batch frames at a time.
    """
    s = _vae_scale(vae)
    cond, latents = _prepare(unet, sampler, cond, (unet.cfg.in_channels, frames, height // s, width // s),
                             generator, latents)
    # the samplers are elementwise, so stepping (B, C, F, h, w) equals diffusers' step on (B*F, C, h, w)
    latents = _denoise(unet, sampler, latents, cond, uncond, steps, guidance, progress, "video")
    B, C, Fr, h, w = latents.shape
    video = _decode(vae, latents.permute(0, 2, 1, 3, 4).reshape(B * Fr, C, h, w), decode_batch)  # frames as images
    return (video.view(B, Fr, *video.shape[1:]) * 0.5 + 0.5).clamp(0, 1)  # (B, F, 3, H, W)


def mel_spectrogram(wave, n_mels=64, hop=160, sample_rate=16000):
    """AudioLDM's log-mel (n_fft = window = 1024 for hop 160, 0-8 kHz, Slaney mel scale, log of max(x, 1e-5)):
    (samples,) -> (frames, n_mels), the layout its VAE and HiFi-GAN vocoder read."""
    n_fft = 1024 * hop // 160
    spec = torch.stft(wave, n_fft, hop, n_fft, torch.hann_window(n_fft), center=True, pad_mode="reflect",
                      return_complex=True).abs()  # (n_fft/2 + 1, frames)
    fb = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate,
                                               norm="slaney", mel_scale="slaney")  # (freqs, n_mels)
    return torch.log(torch.clamp(spec.T @ fb, min=1e-5))


@torch.no_grad()
def generate_audio(unet, vae, vocoder, sampler, cond, uncond=None, seconds=9.0, steps=50, guidance=7.5,
                   generator=None, latents=None, progress=True):
    """
    AudioLDMPipeline from prompt embeddings: cond (B, 512) -> 16 kHz waveform (B, int(seconds * 16000)), fp32.
    The UNet gets no context (its attn2 attends to itself) and the embedding as class_labels. NExT-GPT passes the
    projector output as is and an L2-normalised CLAP "" embedding as uncond.
    """
    vc, s = vocoder.cfg, _vae_scale(vae)
    hop_s = math.prod(vc.upsample_rates) / vc.sampling_rate  # 0.01 s per mel frame
    mel_frames = math.ceil(int(seconds / hop_s) / s) * s  # a multiple of the VAE's downsampling; cut back below
    cond, latents = _prepare(unet, sampler, cond, (unet.cfg.in_channels, mel_frames // s, vc.model_in_dim // s),
                             generator, latents)
    latents = _denoise(lambda x, t, c: unet(x, t, None, class_labels=c), sampler, latents, cond, uncond, steps,
                       guidance, progress, "audio")
    mel = _decode(vae, latents)  # (B, 1, frames, 64)
    wave = vocoder(mel.squeeze(1).to(next(vocoder.parameters()).dtype)).float()  # (B, frames * 160)
    return wave[:, :int(seconds * vc.sampling_rate)]


# ---------------------------------------------------------------------------------------------------------------------
# Loading one decoder at a time

class Decoder:
    """
    One diffusers pipeline folder (SD 1.5, Zeroscope or AudioLDM): UNet, VAE, sampler (+ vocoder) loaded now; the text
    encoder and tokenizer only when embed_text is first called (NExT-GPT needs them for "" and for caption targets).
    """

    def __init__(self, kind, folder, unet, vae, sampler, vocoder=None, dtype=None, device=None, text_encoder=None,
                 tokenizer=None):
        self.kind, self.folder, self.dtype, self.device = kind, folder, dtype, device
        self.unet, self.vae, self.sampler, self.vocoder = unet, vae, sampler, vocoder
        self._text_encoder, self._tokenizer = text_encoder, tokenizer  # None: read from folder on first use

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            cls = CLAPTextEncoder if self.kind == "audio" else CLIPTextEncoder
            self._text_encoder = cls.from_pretrained(os.path.join(self.folder, "text_encoder"), self.dtype, self.device)
        return self._text_encoder

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            cls = RobertaTokenizer if self.kind == "audio" else CLIPTokenizer
            self._tokenizer = cls.from_folder(os.path.join(self.folder, "tokenizer"))
        return self._tokenizer

    @torch.no_grad()
    def embed_text(self, texts):
        """The decoder's own text embedding: CLIP last_hidden_state (B, 77, D), CLAP normalised text_embeds (B, 512)."""
        device = next(self.text_encoder.parameters()).device
        if self.kind == "audio":
            ids, mask = self.tokenizer(texts)
            return F.normalize(self.text_encoder(ids.to(device), mask.to(device)), dim=-1)
        return self.text_encoder(self.tokenizer(texts, context_length=77).to(device))

    def memory_needed(self, height=512, width=512, frames=1, seconds=9.0, **_):
        """A measured estimate of the bytes one generate takes beyond the weights, at the weights' dtype: the VAE
        decode holds ~1,024 numbers per output pixel and frame (8 frames at a time for video), the UNet ~14,000 per
        latent position, guidance doubling its batch. (SD 1.5 in float32 on a CPU: 0.98 GiB for the VAE at
        512 x 512, 0.32 at 256, 2.23 at 768; 0.42 GiB for the UNet at 512.)"""
        p = next(self.unet.parameters())
        if self.kind == "audio":  # a mel of 100 frames a second, 64 bands: small
            height, width = int(seconds * 100), self.vocoder.cfg.model_in_dim
        s = 2 ** (len(self.vae.cfg.block_out_channels) - 1)
        vae = 1024 * height * width * (min(frames, 8) if self.kind == "video" else 1)
        unet = 14000 * (height // s) * (width // s) * frames * 2
        return (vae + unet) * p.element_size()

    def generate(self, cond, uncond=None, **kw):
        need, free = self.memory_needed(**kw), free_memory(next(self.unet.parameters()).device)
        if free is not None and need > free:
            size = {"image": "{height} x {width}", "video": "{height} x {width}, {frames} frames",
                    "audio": "{seconds} s"}[self.kind].format(**{"height": 512, "width": 512, "frames": 1,
                                                                 "seconds": 9.0, **kw})
            raise MemoryError(f"the {self.kind} decoder at {size} needs about {need / 2**30:.1f} GiB more and "
                              f"{free / 2**30:.1f} GiB are free: ask for less (--height / --width / --frames / "
                              "--seconds) or free memory")
        if self.kind == "image":
            return generate_image(self.unet, self.vae, self.sampler, cond, uncond, **kw)
        if self.kind == "video":
            return generate_video(self.unet, self.vae, self.sampler, cond, uncond, **kw)
        return generate_audio(self.unet, self.vae, self.vocoder, self.sampler, cond, uncond, **kw)

    def to(self, device):
        for m in (self.unet, self.vae, self.vocoder, self._text_encoder):
            if m is not None:
                m.to(device)
        self.device = device
        return self


def free_memory(device):
    """Bytes that can still be allocated on device: the GPU's free memory, or the CPU's MemAvailable (Linux); None
    where it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu" and os.path.isfile("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            return int(dict(line.split(":", 1) for line in f)["MemAvailable"].split()[0]) * 1024
    return None


def _load_decoder(kind, folder, dtype, device, sampler):
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{kind} decoder folder not found: {folder} (a diffusers pipeline folder)")
    sub = lambda name: os.path.join(folder, name)  # noqa: E731
    unet = (UNet3D if kind == "video" else UNet2D).from_pretrained(sub("unet"), dtype, device)
    vae = VAE.from_pretrained(sub("vae"), dtype, device)
    vocoder = HiFiGAN.from_pretrained(sub("vocoder"), dtype, device) if kind == "audio" else None
    return Decoder(kind, folder, unet, vae, load_sampler(sub("scheduler"), sampler), vocoder, dtype, device)


def load_image_decoder(folder: str, dtype: torch.dtype | None = None, device=None, sampler=None) -> Decoder:
    """e.g. checkpoints/stable-diffusion-v1-5 (PNDM unless sampler='ddim' or 'dpm')."""
    return _load_decoder("image", folder, dtype, device, sampler)


def load_video_decoder(folder: str, dtype: torch.dtype | None = None, device=None, sampler=None) -> Decoder:
    """e.g. checkpoints/zeroscope_v2_576w (DDIM)."""
    return _load_decoder("video", folder, dtype, device, sampler)


def load_audio_decoder(folder: str, dtype: torch.dtype | None = None, device=None, sampler=None) -> Decoder:
    """e.g. checkpoints/audioldm-l-full (DDIM, with vocoder/)."""
    return _load_decoder("audio", folder, dtype, device, sampler)
