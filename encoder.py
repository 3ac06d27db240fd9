"""
ImageBind-huge, the frozen multimodal encoder of NExT-GPT: vision (images and videos), audio and text trunks,
the official preprocessing (images, videos, audio, CLIP BPE text) and strict loading of `imagebind_huge.pth`.

References:
1) ImageBind: One Embedding Space To Bind Them All (Girdhar et al., CVPR 2023), https://arxiv.org/abs/2305.05665
2) the official code, https://github.com/facebookresearch/ImageBind (imagebind/models/imagebind_model.py,
   transformer.py, helpers.py, multimodal_preprocessors.py, data.py); weights
   https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth
3) NExT-GPT (Wu et al., ICML 2024), https://github.com/NExT-GPT/NExT-GPT: the legacy code takes the pooled
   embedding, the paper's code patches SelectElement to keep the patch tokens instead
4) CLIP's byte-level BPE tokenizer, https://github.com/openai/CLIP/blob/main/clip/simple_tokenizer.py

Only the vision, audio and text branches exist here (NExT-GPT uses no depth, thermal or IMU input). Module names
are the checkpoint's key names, so loading is a strict placement through weights.py.
"""

import math
import os
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from PIL import Image

import media
import weights
from bpe import DEFAULT_BPE, CLIPTokenizer
from media import MediaError  # what the loaders raise for a file they cannot read

CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
DEFAULT_CHECKPOINT = os.path.join("checkpoints", "imagebind_huge.pth")
MODALITIES = ("vision", "audio", "text")
OTHER_MODALITIES = ("depth", "thermal", "imu")  # in the checkpoint, unused by NExT-GPT: dropped on purpose

# -----------------------------------------------------------------------------
# config


@dataclass
class ImageBindConfig:
    vision_dim: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16
    audio_dim: int = 768
    audio_layers: int = 12
    audio_heads: int = 12
    audio_drop_path: float = 0.1  # stochastic depth, rising linearly over the audio blocks; training only
    text_dim: int = 1024
    text_layers: int = 24
    text_heads: int = 16
    out_dim: int = 1024  # the shared embedding space
    mlp_ratio: int = 4
    # input geometry: official, the checkpoint's position embeddings are made for it
    image_size: int = 224
    patch_size: int = 14
    video_frames: int = 2  # an image is repeated to a 2-frame clip
    mel_bins: int = 128
    audio_frames: int = 204  # fbank frames per 2 s clip after padding
    audio_patch: int = 16
    audio_stride: int = 10
    context_length: int = 77
    vocab_size: int = 49408

    @classmethod
    def huge(cls):
        return cls()  # imagebind_huge() in imagebind_model.py

    @classmethod
    def tiny(cls):
        # for tests and the toy world: small trunks, official geometry (so the same loaders feed it)
        return cls(vision_dim=32, vision_layers=2, vision_heads=2, audio_dim=32, audio_layers=2, audio_heads=2,
                   text_dim=32, text_layers=2, text_heads=2, out_dim=16)

    @classmethod
    def preset(cls, name):
        presets = {"huge": cls.huge, "imagebind-huge": cls.huge, "tiny": cls.tiny}
        if name not in presets:
            raise ValueError(f"unknown ImageBind preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]()

    @property
    def vision_tokens(self):  # 1 CLS + 16 x 16 patches = 257
        return 1 + (self.image_size // self.patch_size) ** 2

    @property
    def audio_tokens(self):  # 1 CLS + 12 x 19 patches = 229
        rows, cols = ((n - self.audio_patch) // self.audio_stride + 1 for n in (self.mel_bins, self.audio_frames))
        return 1 + rows * cols


# -----------------------------------------------------------------------------
# the transformer


class Attention(nn.Module):
    """
    torch.nn.MultiheadAttention as ImageBind uses it (transformer.MultiheadAttention), same parameter names, computed
    with scaled_dot_product_attention in (B, T, D) layout. add_bias_kv (audio) appends the learned bias_k / bias_v as
    one extra key/value position after the projection, so every query attends over T + 1 keys.
    """

    def __init__(self, dim, heads, add_bias_kv=False):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, dim))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.bias_k = self.bias_v = None
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x, mask=None):
        B, T, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(D, dim=-1)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, D)], dim=1)  # (B, T+1, D)
            v = torch.cat([v, self.bias_v.expand(B, 1, D)], dim=1)
            if mask is not None:  # the extra key is visible to every query, as in nn.MultiheadAttention
                mask = F.pad(mask, (0, 1))
        q, k, v = (t.view(B, -1, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # = softmax(q @ k^T / sqrt(hs) + mask) @ v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.out_proj(y)


class Mlp(nn.Module):
    """transformer.Mlp (and GroupViT's): fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, dim, hidden, out=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """transformer.BlockWithMasking: pre-norm, no LayerScale, LayerNorm eps 1e-6, optional drop path."""

    def __init__(self, dim, heads, mlp_ratio, add_bias_kv=False, drop_path=0.0):
        super().__init__()
        self.attn = Attention(dim, heads, add_bias_kv)
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = drop_path

    def _drop_path(self, x):
        if not self.training or self.drop_path == 0.0:
            return x
        # timm's DropPath as ImageBind runs it: its trunks work in (T, B, D) layout, so the random keep/drop is
        # drawn per token position and shared by the batch (not per sample, as DropPath intends); we keep that.
        keep = 1.0 - self.drop_path
        return x * x.new_empty(1, x.shape[1], 1).bernoulli_(keep).div_(keep)

    def forward(self, x, mask=None):
        x = x + self._drop_path(self.attn(self.norm_1(x), mask))
        x = x + self._drop_path(self.mlp(self.norm_2(x)))
        return x


class Trunk(nn.Module):
    """transformer.SimpleTransformer: optional pre-LayerNorm (vision only), then the blocks."""

    def __init__(self, dim, layers, heads, mlp_ratio, pre_ln=False, add_bias_kv=False, drop_path=0.0):
        super().__init__()
        # a Sequential so that the key reads pre_transformer_layer.0.weight, as in the checkpoint
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=1e-6)) if pre_ln else nn.Identity()
        # "progressive" drop path: 0 for the first block; float32 rates, as in the official linspace
        rates = torch.linspace(0, drop_path, layers, device="cpu").tolist()
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, add_bias_kv, r) for r in rates])
        for m in self.modules():  # the official "jax" init, for training from scratch (the toy world)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x, mask=None):
        x = self.pre_transformer_layer(x)
        for block in self.blocks:
            x = block(x, mask)
        return x


# -----------------------------------------------------------------------------
# preprocessors (tokenisers of the trunks), heads, postprocessors


class RepeatFrames(nn.Module):
    """multimodal_preprocessors.PadIm2Video(pad_type="repeat", ntimes=2): an image (B, C, H, W) -> a still clip."""

    def __init__(self, frames):
        super().__init__()
        self.frames = frames

    def forward(self, x):
        if x.ndim == 4:
            x = x.unsqueeze(2)  # (B, C, 1, H, W)
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.frames, -1, -1)  # (B, C, F, H, W)
        return x


class PatchStem(nn.Module):
    """multimodal_preprocessors.PatchEmbedGeneric: conv patches -> (B, T, D), then an optional LayerNorm."""

    def __init__(self, proj, norm_layer=None):
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x):
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B, D, [F,] H, W) -> (B, T, D)
        return self.norm_layer(x) if self.norm_layer is not None else x


class PosEmbed(nn.Module):
    """multimodal_preprocessors.SpatioTemporalPosEmbeddingHelper(learnable=True): holds the learned table."""

    def __init__(self, tokens, dim):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * dim ** -0.5)


class PatchPreprocessor(nn.Module):
    """multimodal_preprocessors.RGBDTPreprocessor / AudioPreprocessor: patches, a CLS token in front, positions."""

    def __init__(self, stem, tokens, dim):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.rgbt_stem = stem
        self.pos_embedding_helper = PosEmbed(tokens, dim)

    def forward(self, x):
        x = self.rgbt_stem(x)  # (B, T-1, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, T, D)
        pos = self.pos_embedding_helper.pos_embed
        if x.shape[1] != pos.shape[1]:
            # the official code would interpolate the table; the loaders here always make the official geometry
            raise ValueError(f"got {x.shape[1] - 1} patches, the position table has {pos.shape[1] - 1}: "
                             "inputs must be 224 x 224 images / 2-frame clips, or 128 x 204 fbanks")
        return x + pos


class TextPreprocessor(nn.Module):
    """multimodal_preprocessors.TextPreprocessor: token + position embeddings; the causal mask is in the checkpoint."""

    def __init__(self, vocab_size, context_length, dim):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, dim) * 0.01)
        # additive mask, -inf above the diagonal; kept as a (persistent) buffer because the checkpoint holds it
        self.register_buffer("mask", torch.full((context_length, context_length), float("-inf")).triu(1))

    def forward(self, ids):
        return self.token_embedding(ids) + self.pos_embed  # (B, 77, D)


class SelectEOSAndProject(nn.Module):
    """helpers.SelectEOSAndProject: the token at the EOT position (EOT 49407 is the largest id), LayerNorm, Linear."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, out_dim, bias=False))

    def forward(self, x, ids):
        return self.proj(x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)])  # (B, out_dim)


class SelectElement(nn.Module):
    """helpers.SelectElement(index=0): the CLS token. No weights; it keeps the head's indices (0 norm, 2 proj)."""

    def forward(self, x):
        return x[:, 0]


class Normalize(nn.Module):
    """helpers.Normalize(dim=-1)."""

    def forward(self, x):
        return F.normalize(x, dim=-1)


class LogitScale(nn.Module):
    """helpers.LearnableLogitScaling: x * min(exp(log_logit_scale), 100). Learned for text, a fixed 20 for audio."""

    def __init__(self, init, learnable):
        super().__init__()
        value = torch.tensor(math.log(init))
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, x):
        return torch.clip(self.log_logit_scale.exp(), max=100) * x


# -----------------------------------------------------------------------------
# the model


class ImageBind(nn.Module):
    """
    imagebind_model.ImageBindModel for the vision, audio and text modalities (only those asked for are built).

    forward(inputs): as the official forward. inputs = {"vision": (B, 3, 224, 224) images or (B, S, 3, 2, 224, 224)
    video clips, "audio": (B, 1, 128, 204) or (B, S, 1, 128, 204) fbanks, "text": (B, 77) token ids}; returns the same
    keys with (B, out_dim) embeddings after the postprocessors (vision unit-norm, text x logit scale, audio x 20).
    An input of 5 or more dims has a clip axis S: its embeddings are averaged over the clips, not re-normalised.
    NExT-GPT takes embed (the legacy input) or patch_features (the paper's) instead.
    """

    def __init__(self, config, modalities=MODALITIES):
        super().__init__()
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; ImageBind here has {MODALITIES}")
        self.config = c = config
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        pre, trunks, heads, post = {}, {}, {}, {}
        if "vision" in modalities:
            k = (c.video_frames, c.patch_size, c.patch_size)
            conv = nn.Conv3d(3, c.vision_dim, kernel_size=k, stride=k, bias=False)
            pre["vision"] = PatchPreprocessor(PatchStem(nn.Sequential(RepeatFrames(c.video_frames), conv)),
                                              c.vision_tokens, c.vision_dim)
            trunks["vision"] = Trunk(c.vision_dim, c.vision_layers, c.vision_heads, c.mlp_ratio, pre_ln=True)
            heads["vision"] = nn.Sequential(nn.LayerNorm(c.vision_dim, eps=1e-6), SelectElement(),
                                            nn.Linear(c.vision_dim, c.out_dim, bias=False))
            post["vision"] = Normalize()
        if "audio" in modalities:
            conv = nn.Conv2d(1, c.audio_dim, kernel_size=c.audio_patch, stride=c.audio_stride, bias=False)
            pre["audio"] = PatchPreprocessor(PatchStem(conv, nn.LayerNorm(c.audio_dim)), c.audio_tokens, c.audio_dim)
            trunks["audio"] = Trunk(c.audio_dim, c.audio_layers, c.audio_heads, c.mlp_ratio,
                                    add_bias_kv=True, drop_path=c.audio_drop_path)
            heads["audio"] = nn.Sequential(nn.LayerNorm(c.audio_dim, eps=1e-6), SelectElement(),
                                           nn.Linear(c.audio_dim, c.out_dim, bias=False))
            post["audio"] = nn.Sequential(Normalize(), LogitScale(20.0, learnable=False))
        if "text" in modalities:
            pre["text"] = TextPreprocessor(c.vocab_size, c.context_length, c.text_dim)
            trunks["text"] = Trunk(c.text_dim, c.text_layers, c.text_heads, c.mlp_ratio)
            heads["text"] = SelectEOSAndProject(c.text_dim, c.out_dim)
            post["text"] = nn.Sequential(Normalize(), LogitScale(1 / 0.07, learnable=True))
        self.modality_preprocessors = nn.ModuleDict(pre)
        self.modality_trunks = nn.ModuleDict(trunks)
        self.modality_heads = nn.ModuleDict(heads)
        self.modality_postprocessors = nn.ModuleDict(post)

    def _check(self, modality):
        if modality not in self.modalities:
            raise ValueError(f"this ImageBind was built for {self.modalities}, not {modality!r}")

    def tokens(self, modality, x):
        """The trunk's output tokens (B, T, D) of an input without a clip axis."""
        self._check(modality)
        if modality == "text":
            pre = self.modality_preprocessors.text
            return self.modality_trunks.text(pre(x), pre.mask.to(self.dtype))
        x = x.to(self.dtype)  # loaders give float32; the model may be half
        return self.modality_trunks[modality](self.modality_preprocessors[modality](x))

    def _clips(self, x):
        # (B, S, ...) -> (B*S, ...): the official forward treats every input of 5+ dims as a batch of clip lists
        if x.ndim >= 5:
            return x.reshape(-1, *x.shape[2:]), x.shape[1]
        return x, None

    def _pooled(self, modality, x):
        t = self.tokens(modality, x)
        if modality == "text":
            return self.modality_heads.text(t, x)
        return self.modality_heads[modality](t)  # (B, out_dim)

    def forward(self, inputs):
        out = {}
        for modality, x in inputs.items():
            if x is None:
                continue
            x, S = self._clips(x)
            y = self.modality_postprocessors[modality](self._pooled(modality, x))  # (B*S, out_dim)
            out[modality] = y if S is None else y.view(-1, S, y.shape[-1]).mean(dim=1)
        return out

    def embed(self, modality, x):
        """Legacy NExT-GPT input (B, out_dim): pooled CLS, L2-normalised with no logit scale (NExT-GPT uses
        postprocessors[0] only, so audio is not x 20), clip-averaged."""
        x, S = self._clips(x)
        y = F.normalize(self._pooled(modality, x), dim=-1)  # postprocessors[0]
        return y if S is None else y.view(-1, S, y.shape[-1]).mean(dim=1)  # (B, out_dim)

    def patch_features(self, modality, x):
        """Paper NExT-GPT input (B, 256 | 228, out_dim): the head per token, CLS dropped (the new code patches
        SelectElement to x[..., 1:, :]), unit-norm per token, clip-averaged."""
        if modality not in ("vision", "audio"):
            raise ValueError(f"patch features exist for vision and audio, not {modality!r}")
        x, S = self._clips(x)
        norm, _, proj = self.modality_heads[modality]
        y = F.normalize(proj(norm(self.tokens(modality, x))[:, 1:]), dim=-1)  # (B*S, N, out_dim), CLS dropped
        return y if S is None else y.view(-1, S, *y.shape[1:]).mean(dim=1)  # (B, N, out_dim)

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @classmethod
    def from_pretrained(cls, path: str = DEFAULT_CHECKPOINT, config: ImageBindConfig | None = None,
                        modalities=MODALITIES, dtype: torch.dtype | None = None, device=None) -> "ImageBind":
        """The official imagebind_huge.pth (or a file with its key names), placed strictly (weights.place) after
        dropping, on purpose, the depth / thermal / IMU tensors and those of modalities not chosen."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"ImageBind checkpoint not found: {path}\n  It is the official ImageBind release (facebookresearch/"
                f"ImageBind), 4.8 GB: download {CHECKPOINT_URL} to {DEFAULT_CHECKPOINT}")
        config = config or ImageBindConfig.huge()
        sd = weights.load_file(path, dtype=dtype, device=device)  # weights_only=True, memory-mapped
        dropped = set(OTHER_MODALITIES) | (set(MODALITIES) - set(modalities))
        # keys look like modality_trunks.<modality>.blocks.0...: anything not dropped must fit the model
        sd = {k: v for k, v in sd.items() if not (k.count(".") >= 2 and k.split(".")[1] in dropped)}
        with torch.device("meta"):
            model = cls(config, modalities)
        weights.place(model, sd, what=f"ImageBind checkpoint {path}")
        return model.eval()


# -----------------------------------------------------------------------------
# ImageBind's text tokenizer: CLIP's byte-level BPE (bpe.CLIPTokenizer) on the official vocabulary

_TOKENIZERS = {}


def tokenize(texts, bpe_path=DEFAULT_BPE):
    """Text(s) -> (B, 77) ids for ImageBind's text trunk (always batched, B = 1 for one string)."""
    if bpe_path not in _TOKENIZERS:
        _TOKENIZERS[bpe_path] = CLIPTokenizer.from_bpe_gz(bpe_path)
    return _TOKENIZERS[bpe_path](texts)


# -----------------------------------------------------------------------------
# preprocessing: the official data.py without pytorchvideo / decord / torchcodec (files: media.py)
# Each loader takes one file and returns one unbatched input (stack them for a batch):
#   load_image -> (3, 224, 224), load_video -> (15, 3, 2, 224, 224), load_audio -> (3, 1, 128, 204).

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
STD = (0.26862954, 0.26130258, 0.27577711)
AUDIO_MEAN, AUDIO_STD = -4.268, 9.138  # fbank statistics of AudioSet, as in data.py
SAMPLE_RATE = 16000


def _clip_times(duration, clip_duration, clips):
    # pytorchvideo ConstantClipsPerVideoSampler: starts k * max(D - 2, 0) / (clips - 1), exact fractions as there
    step = Fraction(max(duration - clip_duration, 0)) / max(clips - 1, 1)
    return [(step * k, step * k + clip_duration) for k in range(clips)]


def _normalize(x, mean, std):
    # torchvision Normalize / data.NormalizeVideo: subtract then divide, float32 per channel
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def load_image(image) -> torch.Tensor:
    """A path or PIL image (or a list of them) -> (3, 224, 224) (or (N, 3, 224, 224)), as data.py's transforms:
    Resize(224, bicubic) on the short side, CenterCrop(224), ToTensor, CLIP normalisation."""
    if isinstance(image, (list, tuple)):
        return torch.stack([load_image(i) for i in image])
    image = image.convert("RGB") if isinstance(image, Image.Image) else media.read_image(image)
    w, h = image.size
    if min(w, h) == 0:
        raise MediaError(f"image has zero size {w}x{h}")
    # torchvision's Resize(int) on a PIL image: short side to 224, long side truncated, PIL bicubic
    short, long = (w, h) if w <= h else (h, w)
    size = (224, int(224 * long / short)) if w <= h else (int(224 * long / short), 224)
    if size != (w, h):
        image = image.resize(size, Image.BICUBIC)
    w, h = image.size
    top, left = int(round((h - 224) / 2.0)), int(round((w - 224) / 2.0))  # torchvision center_crop's rounding
    image = image.crop((left, top, left + 224, top + 224))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(224, 224, 3)
    return _normalize(x.permute(2, 0, 1).float().div(255), MEAN, STD)  # (3, 224, 224)


def load_video(path: str, clips=5, clip_duration=2, crop=224) -> torch.Tensor:
    """
    A video file (mp4 / webm / mov / ..., or a GIF) -> (15, 3, 2, 224, 224): 5 clips x 3 spatial crops, clip-major,
    as data.py's load_and_transform_video_data (decord + pytorchvideo there). A video shorter than 2 s gives 5
    identical clips over all of its frames, as there.
    """
    fps, count, get = media.read_video(path)
    windows = []
    for start, end in _clip_times(count / fps, clip_duration, clips):
        # EncodedVideoDecord.get_clip: frames ceil(fps * start) .. ceil(fps * end) - 1, then UniformTemporalSubsample(2)
        # keeps the first and the last of them
        first, stop = math.ceil(fps * float(start)), min(math.ceil(fps * float(end)), count)
        if stop <= first:
            raise MediaError(f"no frames in clip {float(start):.2f}-{float(end):.2f} s of {path}")
        t = torch.linspace(0, stop - first - 1, 2).long() + first
        windows.append(t.tolist())
    index = sorted({i for w in windows for i in w})
    frames = dict(zip(index, torch.from_numpy(get(index))))  # each (H, W, 3) uint8
    out = []
    for w in windows:
        x = torch.stack([frames[i] for i in w]).permute(3, 0, 1, 2).float() / 255.0  # (3, 2, H, W)
        _, _, h, wd = x.shape
        # pytorchvideo ShortSideScale(224): bilinear, align_corners=False, the long side floored
        size = (int(math.floor(h / wd * crop)), crop) if wd < h else (crop, int(math.floor(wd / h * crop)))
        x = _normalize(F.interpolate(x, size=size, mode="bilinear", align_corners=False), MEAN, STD)
        h, wd = size
        # data.SpatialCrop(224, 3): left / centre / right crops (top / centre / bottom for portrait videos)
        y0, x0 = math.ceil((h - crop) / 2), math.ceil((wd - crop) / 2)
        corners = [(y, x0) for y in (0, y0, h - crop)] if h > wd else [(y0, xx) for xx in (0, x0, wd - crop)]
        out += [x[:, :, y:y + crop, xx:xx + crop] for y, xx in corners]
    return torch.stack(out)  # (15, 3, 2, 224, 224)


def waveform_to_fbank(waveform, sample_rate=SAMPLE_RATE, mel_bins=128, frames=204):
    """data.waveform2melspec: Kaldi fbank of channel 0, (1, 128, frames) zero-padded or cut. Subtracts the mean
    from `waveform` in place, as the official code does (on a view of the whole recording)."""
    waveform -= waveform.mean()
    fbank = torchaudio.compliance.kaldi.fbank(
        waveform, htk_compat=True, sample_frequency=sample_rate, use_energy=False, window_type="hanning",
        num_mel_bins=mel_bins, dither=0.0, frame_length=25, frame_shift=10).transpose(0, 1)  # (128, T)
    p = frames - fbank.shape[1]
    fbank = F.pad(fbank, (0, p)) if p > 0 else fbank[:, :frames]
    return fbank.unsqueeze(0)  # (1, 128, 204)


def load_audio(path: str, clips=3, clip_duration=2) -> torch.Tensor:
    """
    An audio file -> (3, 1, 128, 204): resampled to 16 kHz, 3 clips of 2 s (identical when the audio is shorter),
    fbank, normalised with AudioSet's mean and std, as data.py's load_and_transform_audio_data.
    """
    waveform, sr = media.read_audio(path)
    if waveform.shape[1] == 0:
        raise MediaError(f"audio has no samples: {path}")
    if sr != SAMPLE_RATE:
            waveform = torchaudio.functional.resample(waveform, orig_freq=sr, new_freq=SAMPLE_RATE)
    if waveform.shape[1] < SAMPLE_RATE * 25 // 1000:
        raise MediaError(f"audio shorter than one 25 ms fbank window: {path}")
    out = []
    for start, end in _clip_times(waveform.shape[1] / SAMPLE_RATE, clip_duration, clips):
        # slices of the same tensor, as official: the in-place mean removal of one clip shows in overlapping ones
        clip = waveform[:, int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)]
        out.append(_normalize(waveform_to_fbank(clip), (AUDIO_MEAN,), (AUDIO_STD,)))
    return torch.stack(out)  # (3, 1, 128, 204)
