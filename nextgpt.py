"""
NExT-GPT: any-to-any through one LLM. ImageBind features go in as LLM tokens, the LLM answers in text plus signal
tokens ([IMG0..3], [VID0..23], [AUD0..7]), and output projectors turn the signal tokens' hidden states into the
conditioning of three frozen latent diffusion decoders.

    inputs --ImageBind--> (B, 1024) or (B, N, 1024) --input projection--> LLM tokens (B, 1 | 8, D)
    prompt embeddings --LLaMA + LoRA--> reply tokens + final hidden states (D)
    each run of signal tokens: hidden (N, D) + their embeddings --OutputProjector--> (77, 768) | (77, 1024) | (1, 512)
        --> Stable Diffusion 1.5 | Zeroscope v2 576w | AudioLDM  --> pixels, frames, waveform

References
- Wu et al., NExT-GPT: Any-to-Any Multimodal LLM, ICML 2024, https://arxiv.org/abs/2309.05519
- Released weights (ChocoWu/nextgpt_7b_tiva_v0) = the legacy code: NExT-GPT-Lagacy/code/model/anyToImageVideoAudio.py
  (prompt, signal tokens, generation), layers.py (TextFcLayer), common/utils.py (training prompts)
- The paper's concept grouping = the new code: nextgpt/model/multimodal_projector/projector.py (GroupProjector) and
  group.py (GroupViT: Xu et al. 2022, https://arxiv.org/abs/2202.11094), written out in grouping.py
"""

import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import bpe
import decoders as dec
import llm
import samplers
import weights
from encoder import Attention, ImageBind, ImageBindConfig, load_audio, load_image, load_video
from grouping import GroupProjector
from llm import LLaMA, LLaMAConfig

MODALITIES = ("image", "video", "audio")
ENCODER_MODALITY = {"image": "vision", "video": "vision", "audio": "audio"}  # ImageBind sees a video as 2-frame clips
SIGNAL_PREFIX = {"image": "IMG", "video": "VID", "audio": "AUD"}
LOADERS = {"image": load_image, "video": load_video, "audio": load_audio}  # a file -> official ImageBind input
# what NextGPT.diagnose compares a projector's output with, when the checkpoint names no captions of its own
REFERENCE_CAPTIONS = ("a photo of a dog running on the beach", "a red car parked on a city street", "a bowl of fruit "
                      "on a wooden table", "a man playing the guitar on stage", "birds singing in a forest",
                      "waves crashing on the rocks", "a cat sleeping on a sofa", "fireworks over a river at night")


def _with_paths(turn, folder):
    """A showcase turn with its media paths resolved against the checkpoint folder."""
    return {**turn, **{k: [os.path.join(folder, p) for p in turn[k]] for k in ("images", "videos", "audios")
                       if k in turn}}


def caption_distance(cond, target):
    """The training's caption alignment (common/utils.py l2_loss): the Euclidean distance per token, averaged. cond,
    target: (Q, W) -> a scalar (not an MSE)."""
    return ((cond.float() - target.float()) ** 2).sum(-1).sqrt().mean()


def added_tokens(n_image=4, n_video=24, n_audio=8):
    """The 38 tokens NExT-GPT adds, in the official order: ids 32000.. for <Img>, </Img>, [IMG0..3], [VID0..23],
    [AUD0..7]."""
    return (["<Img>", "</Img>"] + [f"[IMG{i}]" for i in range(n_image)] + [f"[VID{i}]" for i in range(n_video)]
            + [f"[AUD{i}]" for i in range(n_audio)])


@dataclass
class NextGPTConfig:
    llm: LLaMAConfig = field(default_factory=lambda: LLaMAConfig.preset("vicuna-7b"))
    imagebind: ImageBindConfig = field(default_factory=ImageBindConfig.huge)
    input_proj: str = "linear"  # "linear": the released weights, one token per input | "group": the paper's concepts
    signal_tokens: dict = field(default_factory=lambda: {"image": 4, "video": 24, "audio": 8})
    # what each decoder is conditioned on: (tokens, width)
    cond_shape: dict = field(default_factory=lambda: {"image": (77, 768), "video": (77, 1024), "audio": (1, 512)})
    # the output projectors' transformer: one size for all three (official), or {modality: value}, one each
    proj_hidden: int | dict = 512  # width
    proj_layers: int | dict = 4  # encoder and decoder layers each
    proj_heads: int | dict = 4
    # concept grouping (GroupViT), the new code's defaults
    group_dim: int = 512
    group_depths: tuple = (6, 3, 3)
    group_tokens: tuple = (64, 8)  # group tokens of the first two stages; the output is group_tokens[-1] concepts
    group_heads: int = 8
    # LoRA on the LLM (stage 3), config/stage_3.yaml
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    # generation
    stop_text: str = "###"  # the legacy template ends each turn with it (id 835 in LLaMA's vocabulary)
    official_inference: bool = False  # True: reproduce the official inference quirks (see NextGPT.generate)

    @property
    def vocab_size(self):
        return self.llm.vocab_size + len(self.added_tokens)

    def projector_size(self, m):
        """(width, layers, heads) of modality m's output projector."""
        sizes = {"proj_hidden": self.proj_hidden, "proj_layers": self.proj_layers, "proj_heads": self.proj_heads}
        for name, v in sizes.items():
            if isinstance(v, dict) and m not in v:
                raise ValueError(f"{name} {v} has no {m!r}: give one value for all three, or one per modality")
        return tuple(v[m] if isinstance(v, dict) else v for v in sizes.values())

    @property
    def added_tokens(self):
        s = self.signal_tokens
        return added_tokens(s["image"], s["video"], s["audio"])

    @classmethod
    def preset(cls, name):
        if name == "7b_tiva_v0":  # the released checkpoint: Vicuna-7B v0, legacy linear input, 4/24/8 signal tokens
            return cls()
        if name == "tiny":  # every part at toy size: tests, --tiny-random
            return cls(llm=LLaMAConfig.preset("tiny"), imagebind=ImageBindConfig.tiny(),
                       cond_shape={"image": (77, 32), "video": (77, 32), "audio": (1, 16)}, proj_hidden=32,
                       proj_layers=1, proj_heads=2, group_dim=32, group_depths=(1, 1, 1), group_tokens=(8, 4),
                       group_heads=2, lora_r=4, lora_alpha=8)
        raise ValueError(f"unknown NExT-GPT preset {name!r}; choose '7b_tiva_v0' or 'tiny'")

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        d["llm"] = LLaMAConfig(**d["llm"])
        d["imagebind"] = ImageBindConfig(**d["imagebind"])
        for k in ("group_depths", "group_tokens", "lora_targets"):
            if k in d:
                d[k] = tuple(d[k])
        d["cond_shape"] = {k: tuple(v) for k, v in d["cond_shape"].items()}
        return cls(**d)



@dataclass
class GenerationConfig:
    """
    How NextGPT.generate answers, the one home of every generation setting. The defaults are the official ones: the
    demo's 246 new tokens, greedy; each decoder's pipeline defaults, 50 steps at guidance 7.5, Stable Diffusion 1.5 at
    512 x 512, Zeroscope 24 frames at 320 x 576, AudioLDM 9 s. A checkpoint's nextgpt.json ("generation") overrides
    what it names (the toy: 32 px, 8 frames, 1 s), a caller or the command line what it gives.
    """
    max_new_tokens: int = 246
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # decoder run k starts from the noise of seed + k
    steps: int = 50  # denoising steps, every decoder
    guidance: dict = field(default_factory=lambda: {"image": 7.5, "video": 7.5, "audio": 7.5})  # one per decoder
    height: dict = field(default_factory=lambda: {"image": 512, "video": 320})
    width: dict = field(default_factory=lambda: {"image": 512, "video": 576})
    frames: int = 24
    seconds: float = 9.0

    @classmethod
    def preset(cls, name):
        if name == "official":
            return cls()
        if name == "tiny":  # tiny_random's: every path in seconds
            return cls(max_new_tokens=24, steps=4, height={"image": 32, "video": 32}, width={"image": 32, "video": 32},
                       frames=4, seconds=0.2)
        raise ValueError(f"unknown generation preset {name!r}; choose 'official' or 'tiny'")

    def override(self, **settings):
        """A copy with the given settings (None: keep). guidance, height and width take a number for every modality
        or a {modality: value} dict for some."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"unknown generation settings {unknown}; the settings are: {', '.join(sorted(names))}")
        new = {}
        for k, v in settings.items():
            if v is None:
                continue
            old = getattr(self, k)
            if isinstance(old, dict):
                v = {**old, **(v if isinstance(v, dict) else dict.fromkeys(old, v))}
            new[k] = v
        return replace(self, **new).check()

    def check(self):
        """Every setting within its rule, or a ValueError that names the setting, the rule and the value."""
        def fail(name, rule, value):
            raise ValueError(f"{name} must be {rule} (got {value})")

        for name, low, high in (("max_new_tokens", 1, 8192), ("steps", 1, 1000), ("frames", 1, 128)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                fail(name, f"an integer from {low} to {high}", v)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            fail("seed", "an integer from 0 to 2^63 - 1", self.seed)
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        if not (number(self.temperature) and 0 <= self.temperature <= 100):
            fail("temperature", "from 0 (greedy) to 100", self.temperature)
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            fail("top_p", "in (0, 1]", self.top_p)
        if not (number(self.seconds) and 0.1 <= self.seconds <= 60):
            fail("seconds", "from 0.1 to 60 (AudioLDM's clips are 10 s)", self.seconds)
        for m, g in self.guidance.items():
            if not (number(g) and 0 <= g <= 100):
                fail(f"guidance ({m})", "from 0 to 100 (1: no guidance; the official 7.5)", g)
        for name in ("height", "width"):
            for m, v in getattr(self, name).items():
                if isinstance(v, bool) or not isinstance(v, int) or not 8 <= v <= 2048 or v % 8:
                    fail(f"{name} ({m})", "a multiple of 8 from 8 to 2048 (the decoders' VAEs work in 8-pixel "
                         "cells)", v)
        return self

    def decoder_size(self, modality):
        """The size arguments of that decoder's generate."""
        if modality == "audio":
            return {"seconds": self.seconds}
        size = {"height": self.height[modality], "width": self.width[modality]}
        return {**size, "frames": self.frames} if modality == "video" else size

    def changes(self):
        """What differs from the official settings (what a manifest records)."""
        official = asdict(GenerationConfig())
        return {k: v for k, v in asdict(self).items() if v != official[k]}


# ----------------------------------------------------------------------------------------------------------------------
# Output side: TextFcLayer (mode "transformer"), written out with nn.Transformer's parameter names

class MultiheadAttention(Attention):
    """nn.MultiheadAttention's parameters (packed in_proj, as encoder.Attention), attending from x to memory."""

    def forward(self, x, memory):
        B, T, C = x.shape
        wq, wkv = self.in_proj_weight.split([C, 2 * C])
        bq, bkv = self.in_proj_bias.split([C, 2 * C])
        q = F.linear(x, wq, bq).view(B, T, self.heads, -1).transpose(1, 2)  # (B, h, T, hs)
        k, v = F.linear(memory, wkv, bkv).view(B, -1, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, h, T, hs); no mask: the official call passes none
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class TransformerLayer(nn.Module):
    """nn.TransformerEncoderLayer / DecoderLayer with norm_first=True, ReLU, dropout 0 (the official settings)."""

    def __init__(self, dim, heads, ff, cross):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        if cross:  # decoder layer: self-attention, cross-attention to the encoder's output, feed-forward
            self.multihead_attn = MultiheadAttention(dim, heads)
            self.norm3 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ff)
        self.linear2 = nn.Linear(ff, dim)

    def forward(self, x, memory=None):
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        if memory is not None:
            x = x + self.multihead_attn(self.norm2(x), memory)
        ff_norm = self.norm2 if memory is None else self.norm3
        return x + self.linear2(F.relu(self.linear1(ff_norm(x))))


class OutputProjector(nn.Module):
    """
    TextFcLayer(mode="transformer") of the legacy code: signal-token hidden states + their input embeddings -> fc
    -> nn.Transformer(d_model=hidden, nhead=4, 4 encoder + 4 decoder layers, pre-norm) whose decoder reads learnable
    queries -> model (Linear) -> the decoder's conditioning. State-dict names are the official ones (fc, tfm, model,
    query_embs), so gen_text_hidden_fcs*.0.* load as they are.
    """

    def __init__(self, in_dim, out_dim, num_output_tokens, hidden=512, layers=4, heads=4):
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden)
        self.tfm = nn.Module()
        self.tfm.encoder = nn.Module()
        self.tfm.encoder.layers = nn.ModuleList(
            TransformerLayer(hidden, heads, 4 * hidden, False) for _ in range(layers))
        self.tfm.encoder.norm = nn.LayerNorm(hidden)
        self.tfm.decoder = nn.Module()
        self.tfm.decoder.layers = nn.ModuleList(
            TransformerLayer(hidden, heads, 4 * hidden, True) for _ in range(layers))
        self.tfm.decoder.norm = nn.LayerNorm(hidden)
        self.model = nn.Linear(hidden, out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, num_output_tokens, hidden))

    def forward(self, hidden, signal_embeds):
        x = self.fc(hidden + signal_embeds)  # (B, N, hidden): N signal tokens
        for layer in self.tfm.encoder.layers:
            x = layer(x)
        memory = self.tfm.encoder.norm(x)
        q = self.query_embs.expand(x.shape[0], -1, -1)  # (B, Q, hidden): Q = 77 for the CLIP-conditioned decoders
        for layer in self.tfm.decoder.layers:
            q = layer(q, memory)
        return self.model(self.tfm.decoder.norm(q))  # (B, Q, out_dim)


# ----------------------------------------------------------------------------------------------------------------------
# The model

class NextGPT(nn.Module):
    """
    The trainable part of NExT-GPT (LLM with its new token rows and LoRA, input projection, output projectors) as
    an nn.Module; the frozen backbones (ImageBind, the decoders) are plain attributes, outside the state dict, so
    that they are loaded, moved and freed on their own.
    """

    def __init__(self, config, llm_model=None, tokenizer=None, encoder=None, decoders=None):
        super().__init__()
        self.config = c = config
        self.llm = llm_model if llm_model is not None else LLaMA(c.llm)
        self.tokenizer = tokenizer
        if tokenizer is not None and len(tokenizer) != c.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens with its added ones, the model "
                             f"{c.vocab_size}: is tokenizer.model the LLM's, with NextGPTConfig.added_tokens added?")
        got = self.llm.config
        shape = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim")
        if any(getattr(got, k) != getattr(c.llm, k) for k in shape):
            raise ValueError(f"the LLM is {({k: getattr(got, k) for k in shape})}, this NExT-GPT's "
                             f"{({k: getattr(c.llm, k) for k in shape})}: is its config.json a different model "
                             "(the released weights sit on Vicuna-7B v0)?")
        rows = self.llm.lm_head.out_features
        # a base LLM gets rows for the new tokens; Vicuna v0 from FastChat v0.1.10 has one more row (its [PAD]), and
        # as in the legacy code it is resized to the tokenizer's length all the same
        if rows != c.vocab_size:
            if not c.llm.vocab_size <= rows < c.vocab_size:
                raise ValueError(f"the LLM has {rows} token rows: expected {c.llm.vocab_size} (a base LLM, or one more "
                                 f"for FastChat's [PAD]) or {c.vocab_size} (with NExT-GPT's {len(c.added_tokens)})")
            resize_vocab(self.llm, c.vocab_size)
        D = c.llm.dim
        if c.input_proj == "linear":
            self.input_proj = nn.Linear(c.imagebind.out_dim, D)  # `llama_proj`: one token per input
        elif c.input_proj == "group":
            self.input_proj = GroupProjector(c.imagebind.out_dim, D, c.group_dim, c.group_depths, c.group_tokens,
                                             c.group_heads)
        else:
            raise ValueError(f"input_proj must be 'linear' or 'group', not {c.input_proj!r}")
        self.output_proj = nn.ModuleDict({
            m: OutputProjector(D, c.cond_shape[m][1], c.cond_shape[m][0], *c.projector_size(m)) for m in MODALITIES})
        # The frozen backbones sit in a plain dict, outside the module tree: no state-dict entries, no .to() of
        # 10 GB by accident. decoders: {"image": decoders.Decoder, or a function that loads one on first use}.
        self.backbones = {"encoder": encoder, **(decoders or {})}
        self.loaders = {m: d for m, d in (decoders or {}).items() if not hasattr(d, "generate")}  # to load again
        self.keep_decoders = True  # the decoders given stay; from_pretrained frees its loaded ones unless asked
        self.offload = False  # True: backbones wait on the CPU and visit the GPU only while they work
        self.generation = GenerationConfig()  # from_pretrained: with what the checkpoint's nextgpt.json names
        self.showcase = []  # from_pretrained: the checkpoint's example turns (`python sample.py` runs them)
        self.captions = {}  # from_pretrained: {modality: captions of the checkpoint's world}, for diagnose
        self._uncond = {}

    @property
    def encoder(self):
        return self.backbones["encoder"]

    # -- ids of the added tokens ---------------------------------------------------------------------------------------
    def token_id(self, text):
        return self.config.llm.vocab_size + self.config.added_tokens.index(text)

    def signal_ids(self, modality):
        n = self.config.signal_tokens[modality]
        return [self.token_id(f"[{SIGNAL_PREFIX[modality]}{i}]") for i in range(n)]

    @property
    def device(self):
        return self.llm.model.embed_tokens.weight.device

    # -- input side ----------------------------------------------------------------------------------------------------
    def encode(self, modality, x):
        """
        Official ImageBind input tensors -> LLM tokens. x: image (B, 3, 224, 224), video (B, 15, 3, 2, 224, 224),
        audio (B, 3, 1, 128, 204) (encoder.load_* give one item; stack them). Returns (B, 1 | 8, D).
        """
        return self.project(self.features(modality, x))

    def features(self, modality, x):
        """The same inputs -> what input_proj reads: (B, 1, 1024) pooled or (B, 256 | 228, 1024) patches."""
        if self.encoder is None:
            raise RuntimeError("no ImageBind loaded: pass encoder= or use NextGPT.from_pretrained")
        if self.offload:
            self.encoder.to(self.device)
        p = next(self.encoder.parameters())
        x = x.to(p.device, p.dtype)
        with torch.no_grad():  # the encoder is frozen in every stage
            if self.config.input_proj == "linear":
                feats = self.encoder.embed(ENCODER_MODALITY[modality], x)[:, None]  # (B, 1, 1024)
            else:
                feats = self.encoder.patch_features(ENCODER_MODALITY[modality], x)  # (B, 256 | 228, 1024)
        if self.offload:
            self.encoder.to("cpu")
        return feats

    def project(self, feats):
        """ImageBind features (B, 1, 1024) pooled or (B, N, 1024) patches -> LLM tokens (B, 1 | 8, D)."""
        w = self.llm.model.embed_tokens.weight  # never quantized (llm.quantize_int8)
        return self.input_proj(feats.to(w.device, w.dtype))

    def prompt_embeds(self, turns, media=(), labels=False, official=False):
        """
        The legacy template (common/utils.py), one turn after another:
            [BOS] ### Human: <Img> tokens </Img> text\n### Assistant: reply\n###Human: text\n### Assistant:
        turns: [(user_text, reply or None)]; a last reply of None leaves the prompt open for generation, ending as the
        training prompts do, "### Assistant: " (the space a token of its own, the reply tokenized apart); official=True
        ends it at "### Assistant:" as the official inference does, a prompt the LoRA never saw in training (the toy
        model, trained to its end, answers it with garbage).
        media: [(modality, LLM tokens (n, D))]. In user_text, `<image>`, `<video>`, `<audio>` mark where an input
        sits; inputs without a marker go first in the first turn. Every modality is wrapped in <Img> ... </Img>, as
        the legacy code does. Whitespace next to <Img> / </Img> drops out in tokenizing (bpe.LLaMATokenizer).
        -> embeds (1, T, D), and with labels=True the targets (T,) too: reply tokens (and their closing "\n###")
        as ids, everything else -100, as the official training builds them.
        """
        # each marker takes the next input of its modality; the inputs no marker takes lead the first turn
        lead, marked = list(media), []
        for want in re.findall(r"<(image|video|audio)>", " ".join(u for u, _ in turns)):
            k = next((k for k, (m, _) in enumerate(lead) if m == want), None)
            if k is None:
                raise ValueError(f"the prompt has more <{want}> markers than {want} inputs")
            marked.append(lead.pop(k))
        slot = "<Img>\x00</Img>"  # \x00: where an input's tokens go
        segments = []  # (text, is_target): user parts and replies are tokenized apart, as in training
        for k, (user, reply) in enumerate(turns):
            user = re.sub(r"<(image|video|audio)>", slot, user).strip()
            inputs = slot * len(lead) + " " if k == 0 and lead else ""
            head = ("### Human: " if k == 0 else "Human: ") + inputs + user + "\n### Assistant:"
            if reply is None:
                segments.append((head if official else head + " ", False))
            else:
                segments += [(head + " ", False), (reply + "\n###", True)]
        parts, targets = [], []
        for n, (text, is_target) in enumerate(segments):
            for k, chunk in enumerate(text.split("\x00")):
                if k:  # an input's tokens: the unmarked inputs' slots come first
                    tokens = (lead or marked).pop(0)[1]
                    parts.append(tokens)
                    targets += [-100] * len(tokens)
                ids = self.tokenizer.encode(chunk, bos=n == 0 and k == 0)
                parts.append(self.llm.model.embed_tokens(torch.tensor(ids, device=self.device, dtype=torch.long)))
                targets += ids if is_target else [-100] * len(ids)
        dtype = self.llm.model.embed_tokens.weight.dtype
        embeds = torch.cat([p.to(dtype) for p in parts])[None]  # (1, T, D)
        return (embeds, torch.tensor(targets)) if labels else embeds

    # -- output side ---------------------------------------------------------------------------------------------------
    def project_signal(self, modality, hidden):
        """Hidden states of a run of signal tokens (B, N, D) -> the decoder's conditioning (B, Q, W)."""
        ids = torch.tensor(self.signal_ids(modality), device=hidden.device)
        signal_embeds = self.llm.model.embed_tokens(ids)[None].expand(hidden.shape[0], -1, -1)  # (B, N, D)
        return self.output_proj[modality](hidden, signal_embeds)

    def decoder(self, modality):
        """The decoder of a modality, loaded on first use."""
        d = self.backbones.get(modality)
        if d is None:
            raise RuntimeError(f"no {modality} decoder: pass decoders={{'{modality}': ...}} or use from_pretrained")
        if not hasattr(d, "generate"):  # a loader: load now, once
            d = self.backbones[modality] = d()
        return d

    def release(self, modality):
        """Free a decoder that was loaded from its files, unless keep_decoders: the next use loads it again, so that
        only one decoder at a time holds memory (the official checkpoints' three take 8 GB in fp16)."""
        if not self.keep_decoders and modality in self.loaders:
            self.backbones[modality] = self.loaders[modality]

    def uncond(self, modality):
        """NExT-GPT's unconditional embedding: the decoder's own text encoder on "" (CLAP: normalised)."""
        if modality not in self._uncond:
            self._uncond[modality] = self.decoder(modality).embed_text([""]).to(self.device)
        return self._uncond[modality]

    # -- generation ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reply(self, embeds, max_new_tokens=246, temperature=0.0, top_p=1.0, want=(), generator=None, choose=None,
              on_token=None, forced_at=None):
        """
        Stream the LLM's reply to prompt embeddings (1, T, D), with the KV cache. Once a run starts ([IMG0], [VID0]
        or [AUD0]) its other tokens are forced, so every run is complete (the official code asserts instead: its
        issue #46). A modality in `want` that the reply has not produced is forced in place of the stop token.
        Returns (tokens, hs): hs[k + 1] is the final hidden state at the position where token k is the input, hs[k]
        the one whose logits chose it (hs[0]: the prompt's last position). choose(logits) -> id replaces sampling;
        on_token(tokens) is called after each new token (streaming); forced_at (a list) gets the position of every
        run that `want` forced.
        """
        stop_ids = {self.tokenizer.eos_id}
        stop_piece = self.tokenizer.encode(self.config.stop_text, bos=False)
        if len(stop_piece) == 1:
            stop_ids.add(stop_piece[0])
        starts = {self.signal_ids(m)[0]: m for m in MODALITIES}
        T = embeds.shape[1]
        room = sum(self.config.signal_tokens.values()) + 1  # to complete runs and wanted outputs past the budget
        max_new_tokens = min(max_new_tokens, self.config.llm.max_seq_len - T - room)
        if max_new_tokens <= 0:
            raise ValueError(f"the prompt ({T} tokens) leaves no room in the LLM's {self.config.llm.max_seq_len}")
        cache = self.llm.new_cache(1, T + max_new_tokens + room)
        logits, h = self.llm(embeds=embeds, cache=cache, return_hidden=True, last_only=True)  # prefill
        tokens, hs, forced, produced = [], [h[0, -1]], [], set()
        while True:
            if forced:
                token = forced.pop(0)
            else:
                token = choose(logits[0, -1]) if choose else llm.sample(logits[0, -1], temperature, top_p, generator)
                if token in stop_ids or len(tokens) >= max_new_tokens:
                    missing = [m for m in want if m not in produced]
                    if not missing:
                        if token in stop_ids:
                            tokens.append(token)
                            hs.append(self._step(token, cache, T + len(tokens) - 1)[1])
                        return tokens, hs
                    token = self.signal_ids(missing[0])[0]  # a wanted output the LLM did not give: force its run
                    if forced_at is not None:
                        forced_at.append(len(tokens))
                if token in starts:
                    produced.add(starts[token])
                    forced = self.signal_ids(starts[token])[1:]
            tokens.append(token)
            if on_token:
                on_token(tokens)
            logits, h = self._step(token, cache, T + len(tokens) - 1)
            hs.append(h)

    def _step(self, token, cache, pos):
        """Feed one token at position pos: -> logits (1, 1, V), its final hidden state (D,)."""
        x = self.llm.model.embed_tokens(torch.tensor([[token]], device=self.device))
        logits, h = self.llm(embeds=x, cache=cache, start_pos=pos, return_hidden=True)
        return logits, h[0, -1]

    def signal_runs(self, tokens):
        """[(modality, index of its first token)] for each complete run of signal tokens in a reply."""
        runs = []
        for m in MODALITIES:
            ids = self.signal_ids(m)
            runs += [(m, i) for i in range(len(tokens)) if tokens[i:i + len(ids)] == ids]
        return sorted(runs, key=lambda r: r[1])

    def reply_text(self, tokens):
        """The reply as text: signal tokens and the closing stop text stripped; the text around a run of signal
        tokens joined by a space (the tokenizer drops the whitespace next to them)."""
        signal = {i for m in MODALITIES for i in self.signal_ids(m)} | {self.tokenizer.eos_id}
        parts = [[]]  # the text between runs
        for t in tokens:
            if t not in signal:
                parts[-1].append(t)
            elif parts[-1]:
                parts.append([])
        text = " ".join(self.tokenizer.decode(p) for p in parts if p).strip()
        if text.endswith(self.config.stop_text):
            text = text[:-len(self.config.stop_text)]
        return re.sub(r"\s+", " ", text).strip()

    @torch.no_grad()
    def generate(self, prompt: str, images=(), videos=(), audios=(), inputs=(), history=(), want=(),
                 config: GenerationConfig | None = None, official_inference: bool | None = None, progress=True,
                 choose=None, stream=None, caption_bypass=False, **settings) -> dict:
        """
        Any-to-any: prompt text plus inputs (file paths or official ImageBind tensors) -> dict(text, tokens,
        image=[(3, H, W)], video=[(F, 3, H, W)], audio=[(samples,)]) with pixels in [0, 1] and 16 kHz audio, plus
        reply (the reply with its signal tokens, as history keeps it) and media (this turn's inputs as LLM tokens).
        inputs: more of this turn's inputs, already LLM tokens [(modality, (n, D))], after images, videos, audios.
        history: earlier turns, (user text, reply) or (user text, reply, media): inputs stay the tokens they were
        projected to, marked in the user text by <image> / <video> / <audio>. want: modalities to force when the reply
        has none. stream(text): called with the reply's text so far as it grows, then with None once it is whole
        (before the decoders start). out["runs"]: each signal-token run, where it starts, whether `want` forced it,
        the reply's caption before it and the projector's output (what NextGPT.diagnose reads). caption_bypass: each
        decoder also draws from its own text encoder's embedding of that caption instead of the projector's output,
        into out["bypass"] (tells a projector failure from a decoder one).
        How it samples: config (default: this model's `generation`, the checkpoint's settings over the official
        ones), then **settings, any GenerationConfig field (steps=20, guidance={"video": 1.5}, height=32, ...).

        official_inference (default: the config's) reproduces the official inference code: the prompt ends at
        "### Assistant:" without the space training put there, and the projector reads the hidden states one position
        early (those that chose each signal token, `embeddings[:, gen_idx-1 : ...]`), while training used the hidden
        states at the signal tokens' own positions. Our default is the training side of both.
        """
        g = (config or self.generation).override(**settings)
        official = self.config.official_inference if official_inference is None else official_inference
        media = []
        for modality, items in (("image", images), ("video", videos), ("audio", audios)):
            for item in items:
                x = LOADERS[modality](item) if isinstance(item, (str, os.PathLike)) else item
                media.append((modality, self.encode(modality, x[None])[0]))  # (n, D)
        past = [m for turn in history for m in (turn[2] if len(turn) > 2 else ())]
        turns = [(turn[0], turn[1]) for turn in history] + [(prompt, None)]
        media += list(inputs)
        embeds = self.prompt_embeds(turns, past + media, official=official)
        on_token = (lambda tokens: stream(self.reply_text(tokens))) if stream else None
        forced_at = []
        tokens, hs = self.reply(embeds, g.max_new_tokens, g.temperature, g.top_p, want,
                                torch.Generator().manual_seed(g.seed), choose, on_token, forced_at)
        if stream:
            stream(None)
        stop = self.tokenizer.encode(self.config.stop_text, bos=False)
        kept = tokens[:-len(stop)] if tokens[-len(stop):] == stop else tokens  # the template adds the closing ###
        out = {"text": self.reply_text(tokens), "tokens": tokens, "reply": self.tokenizer.decode(kept).strip(),
               "media": media, "runs": [], "image": [], "video": [], "audio": [],
               "bypass": {"image": [], "video": [], "audio": []}}
        hs = torch.stack(hs)  # (len(tokens) + 1, D)
        end = 0  # where the text before the next run starts
        for k, (modality, i) in enumerate(self.signal_runs(tokens)):
            n = self.config.signal_tokens[modality]
            hidden = hs[i:i + n] if official else hs[i + 1:i + 1 + n]  # (N, D)
            cond = self.project_signal(modality, hidden[None])  # (1, Q, W)
            caption = self.reply_text(tokens[end:i]) or out["text"]
            out["runs"].append({"modality": modality, "position": i, "forced": i in forced_at, "caption": caption,
                                "cond": cond[0].float().cpu()})
            end = i + n
            decoder = self.decoder(modality)
            if self.offload:
                decoder.to(self.device)
            conds = [cond[:, 0] if modality == "audio" else cond]  # AudioLDM reads one vector (1, 512)
            if caption_bypass:
                conds.append(decoder.embed_text([caption]).to(self.device))
            for c, into in zip(conds, (out[modality], out["bypass"][modality])):
                result = decoder.generate(c, self.uncond(modality), steps=g.steps, guidance=g.guidance[modality],
                                          generator=torch.Generator().manual_seed(g.seed + k), progress=progress,
                                          **g.decoder_size(modality))
                into.append(result[0].float().cpu())
            if self.offload:
                decoder.to("cpu")
            del decoder
            self.release(modality)
        return out

    @torch.no_grad()
    def diagnose(self, out, references=None) -> list:
        """
        Where an output went wrong: for each run of out["runs"], whether the LLM emitted it or `want` forced it (and at
        which token), the norm of the projector's output against the norms the decoder's own text encoder gives real
        captions (references; default: the checkpoint's "captions" of that modality, else REFERENCE_CAPTIONS), and,
        when the reply has a
        caption, the training's caption-alignment distance to the decoder's embedding of it (and their cosine, for the
        image and audio decoders, whose embeddings are compared as one vector). -> [dict per output]
        """
        rows = [None] * len(out["runs"])
        for m in MODALITIES:  # one decoder at a time, loaded once for all its runs
            runs = [(k, run) for k, run in enumerate(out["runs"]) if run["modality"] == m]
            if not runs:
                continue
            d = self.decoder(m)
            refs = d.embed_text(list(references or self.captions.get(m) or REFERENCE_CAPTIONS)).float().cpu()
            norms = refs.reshape(len(refs), -1).norm(dim=1)
            for k, run in runs:
                cond = run["cond"]  # (Q, W)
                row = {"modality": m, "position": run["position"], "forced": run["forced"], "caption": run["caption"],
                       "norm": float(cond.norm()), "caption_norms": (float(norms.min()), float(norms.mean()),
                                                                      float(norms.max()))}
                if run["caption"]:
                    target = d.embed_text([run["caption"]]).float().cpu().reshape(cond.shape)
                    row["distance"] = float(caption_distance(cond, target))
                    if m in ("image", "audio"):
                        row["cosine"] = float(F.cosine_similarity(cond.flatten(), target.flatten(), dim=0))
                rows[k] = row
            del d
            self.release(m)
        return rows

    # -- weights -------------------------------------------------------------------------------------------------------
    def load_delta(self, path_or_state_dict):
        """
        The official delta (7b_tiva_v0/pytorch_model.pt): every tensor placed through an explicit rename, every shape
        checked; an error names any tensor it cannot place and any trainable tensor it leaves empty. LoRA is added
        first if the model has none. Works on a model built on the meta device.
        """
        sd = path_or_state_dict
        if not isinstance(sd, dict):
            sd = weights.load_file(sd)
        has_lora = any(".lora_" in n for n in sd)
        if has_lora and not llm.lora_state_dict(self.llm):
            llm.add_lora(self.llm, self.config.lora_r, self.config.lora_alpha, self.config.lora_dropout,
                         self.config.lora_targets)
        ours, lora = {}, {}
        unplaced = []
        for name, t in sd.items():
            new = _official_name(name)
            if new is None:
                unplaced.append(name)
            elif ".lora_" in new:
                lora[new] = t
            else:
                ours[new] = t
        if unplaced:
            raise weights.CheckpointError("load_delta:\n" + weights.listing("no place in NextGPT", unplaced))
        if has_lora:
            llm.load_lora(self.llm, {k[len("llm."):]: v for k, v in lora.items()})
        expected = [n for n in self.trainable_state_dict() if ".lora_" not in n]  # LoRA: checked by load_lora
        weights.place(self, ours, what="NExT-GPT delta", partial=True, required=expected)
        return self

    def trainable_state_dict(self):
        """NExT-GPT's own tensors, in our naming (what train.py saves and load_delta reads back): the LLM's
        embedding and output rows, LoRA if any, the input projection, the output projectors."""
        return {n: t for n, t in self.state_dict().items() if not n.startswith("llm.") or ".lora_" in n
                or n in ("llm.model.embed_tokens.weight", "llm.lm_head.weight")}

    @classmethod
    def from_pretrained(cls, ckpt: str = "checkpoints", dtype: torch.dtype | None = None, device=None,
                        decoders=MODALITIES, delta: str | None = None, offload: bool = False,
                        keep_decoders: bool = False) -> "NextGPT":
        """
        A folder with the official files (README.md, 'Weights'):
            imagebind_huge.pth, vicuna-7b-v0/, nextgpt_7b_tiva_v0/pytorch_model.pt,
            stable-diffusion-v1-5/, zeroscope_v2_576w/, audioldm-l-full/
        or any folder with a `nextgpt.json` naming its config and files (the toy world, checkpoints of train.py), and
        optionally the generation settings it was made for ("generation", over GenerationConfig's) and example turns
        ("showcase": [{"prompt", "images" / "videos" / "audios": paths relative to the folder, "want"}], or
        {"turns": [such turns]} for a dialogue).
        delta: another delta file to load instead (e.g. a train.py checkpoint over the official backbones).
        offload: ImageBind and the decoders wait on the CPU and visit `device` only while they work, so that the LLM
        and one backbone at a time share the GPU (README.md, 'Memory').
        Each missing piece is named with where it comes from. Decoders load on first use, one at a time, and are
        freed after their work unless keep_decoders (faster for many generations, if memory allows all three).
        """
        manifest = os.path.join(ckpt, MANIFEST)
        m = weights.read_json(manifest) if os.path.isfile(manifest) else None
        if m is not None:
            try:
                config = NextGPTConfig.from_dict(m["config"])
                files = {k: (str(v), f"named in {manifest}") for k, v in m["files"].items()}
                generation = GenerationConfig().override(**m.get("generation", {}))
                captions = {k: list(v) for k, v in m.get("captions", {}).items()}
                showcase = [{"turns": [_with_paths(t, ckpt) for t in entry["turns"]]} if "turns" in entry
                            else _with_paths(entry, ckpt) for entry in m.get("showcase", [])]
            except (KeyError, TypeError, AttributeError, ValueError) as e:
                raise weights.CheckpointError(
                    f"{manifest} is not a NExT-GPT manifest ({type(e).__name__}: {e}); it holds \"config\" (the "
                    "fields of NextGPTConfig) and \"files\"; NextGPT.save_manifest writes one") from None
        else:
            config, files, generation = NextGPTConfig.preset("7b_tiva_v0"), OFFICIAL_FILES, GenerationConfig()
            captions, showcase = {}, []
        paths = {name: os.path.join(ckpt, rel) for name, (rel, _) in files.items()}
        if delta is not None:
            paths["delta"] = delta
        for name, path in paths.items():
            if (name in MODALITIES and name not in decoders) or (name == "delta" and path is None):
                continue
            if not os.path.exists(path):
                raise FileNotFoundError(f"missing {path}: {files[name][1]} (see README.md, 'Weights')")
        tok_path = os.path.join(paths["vicuna"], "tokenizer.model")
        tok = bpe.LLaMATokenizer(tok_path, config.added_tokens)
        if tok.sp.get_piece_size() != config.llm.vocab_size:  # checked before the LLM's gigabytes are read
            raise ValueError(f"{tok_path} has {tok.sp.get_piece_size()} pieces, this NExT-GPT's LLM "
                             f"{config.llm.vocab_size} (LLaMA-1's, which Vicuna v0 and the delta were made with): "
                             "the tokenizer of another model?")
        lm = LLaMA.from_pretrained(paths["vicuna"], dtype=dtype, device=device, expect=config.llm)
        home = "cpu" if offload else device  # where the backbones live between uses
        imagebind = ImageBind.from_pretrained(paths["imagebind"], config=config.imagebind,
                                              modalities=("vision", "audio"), dtype=dtype, device=home)
        imagebind.requires_grad_(False)
        loaders = {"image": dec.load_image_decoder, "video": dec.load_video_decoder, "audio": dec.load_audio_decoder}
        lazy = {m: (lambda m=m: loaders[m](paths[m], dtype=dtype, device=home)) for m in decoders}
        model = cls(config, lm, tok, imagebind, lazy)
        model.offload, model.keep_decoders = offload, keep_decoders
        model.input_proj.to(device=device, dtype=dtype or torch.float32)
        model.output_proj.to(device=device, dtype=dtype or torch.float32)
        if paths.get("delta"):
            model.load_delta(paths["delta"])
        model.source = {k: os.path.abspath(p) for k, p in paths.items() if p}  # where each piece came from
        model.generation = generation
        model.captions, model.showcase = captions, showcase
        return model.eval()

    def save_manifest(self, folder, files):
        """Write nextgpt.json: this model's config, where its files are (relative to folder), and its generation
        settings where they differ from the official ones."""
        m = {"config": self.config.to_dict(), "files": files}
        if self.generation.changes():
            m["generation"] = self.generation.changes()
        with open(os.path.join(folder, MANIFEST), "w") as f:
            json.dump(m, f, indent=1)


MANIFEST = "nextgpt.json"
OFFICIAL_FILES = {
    "imagebind": ("imagebind_huge.pth", "the ImageBind-huge release, https://dl.fbaipublicfiles.com/imagebind/"
                  "imagebind_huge.pth"),
    "vicuna": ("vicuna-7b-v0", "LLaMA-1 7B with lmsys/vicuna-7b-delta-v0 applied (FastChat v0.1.10), in HF format"),
    "delta": ("nextgpt_7b_tiva_v0/pytorch_model.pt", "the NExT-GPT release, huggingface.co/ChocoWu/nextgpt_7b_tiva_v0"),
    "image": ("stable-diffusion-v1-5", "the diffusers folder of stable-diffusion-v1-5/stable-diffusion-v1-5"),
    "video": ("zeroscope_v2_576w", "the diffusers folder of cerspense/zeroscope_v2_576w"),
    "audio": ("audioldm-l-full", "the diffusers folder of cvssp/audioldm-l-full"),
}

# official delta name -> ours (LoRA names are translated by llm.load_lora)
_DELTA_PREFIXES = [
    ("llama_model.base_model.model.model.embed_tokens.", "llm.model.embed_tokens."),
    ("llama_model.base_model.model.lm_head.", "llm.lm_head."),
    ("llama_model.base_model.model.model.layers.", "llm.model.layers."),
    ("llama_proj.", "input_proj."),
    ("gen_text_hidden_fcs.0.", "output_proj.image."),
    ("gen_text_hidden_fcs_video.0.", "output_proj.video."),
    ("gen_text_hidden_fcs_audio.0.", "output_proj.audio."),
]


def _official_name(name):
    if name.startswith(("llm.", "input_proj.", "output_proj.")):
        return name  # already ours: a checkpoint written by train.py
    for old, new in _DELTA_PREFIXES:
        if name.startswith(old):
            new = new + name[len(old):]
            if new.startswith("llm.model.layers.") and ".lora_" not in new:
                return None  # the delta holds only LoRA inside the layers
            return re.sub(r"\.(lora_[AB])\.(default\.)?weight$", r".\1", new)
    return None


@torch.no_grad()
def resize_vocab(model, n):
    """Grow embed_tokens and lm_head to n rows; new rows start at the mean of the old ones (the new code's choice)."""
    old_emb, old_head = model.model.embed_tokens.weight, model.lm_head.weight
    V, D = old_emb.shape

    def grown(w):
        new = torch.empty(n, D, device=w.device, dtype=w.dtype)
        if not w.is_meta:
            new[:V] = w
            new[V:] = w.mean(dim=0, keepdim=True)
        return nn.Parameter(new, requires_grad=w.requires_grad)

    model.model.embed_tokens.weight = grown(old_emb)
    model.lm_head.weight = grown(old_head)
    model.model.embed_tokens.num_embeddings = model.lm_head.out_features = n
    model.config = replace(model.config, vocab_size=n)  # a copy: NextGPTConfig.llm keeps the base vocabulary


# ----------------------------------------------------------------------------------------------------------------------
# A random tiny NExT-GPT: every path at toy size, offline, in seconds (the tests, sample.py / train.py --tiny-random)

TINY_CORPUS = """### Human: describe this image
### Assistant: a red circle on a blue square moving left, two high beeps and a low beep.
draw show play generate a caption picture video sound audio the of and with what is in it
""" * 3


def tiny_random(seed: int = 0, input_proj: str = "linear") -> NextGPT:
    """NextGPTConfig.preset("tiny") with random weights, with the leaves' tiny presets for ImageBind and the three
    decoders; its tokenizers: a sentencepiece model trained here on TINY_CORPUS, byte-level CLIP and RoBERTa."""
    torch.manual_seed(seed)
    config = replace(NextGPTConfig.preset("tiny"), input_proj=input_proj)
    with tempfile.TemporaryDirectory() as d:
        tok = bpe.LLaMATokenizer(bpe.train_sentencepiece(TINY_CORPUS, config.llm.vocab_size, os.path.join(d, "tok")))
    config.llm = replace(config.llm, vocab_size=len(tok))  # the corpus may give fewer pieces than asked
    tok.add_special_tokens(config.added_tokens)
    clip_vocab = {t: i for i, t in enumerate(bpe.byte_vocab("clip"))}
    clip = (dec.CLIPTextEncoder(dec.CLIPTextConfig.preset("tiny")),
            bpe.CLIPTokenizer(clip_vocab, [], pad_id=0, clean="hf"))
    clap = (dec.CLAPTextEncoder(dec.CLAPTextConfig.preset("tiny")),
            bpe.RobertaTokenizer({t: i for i, t in enumerate(bpe.byte_vocab("roberta"))}, [], max_length=32))
    decoders = {}
    for kind, unet, vae, text in (("image", "tiny", "tiny", clip), ("video", "tiny-video", "tiny", clip),
                                  ("audio", "tiny-audio", "tiny-audio", clap)):
        unet = (dec.UNet3D if kind == "video" else dec.UNet2D)(dec.UNetConfig.preset(unet))
        vocoder = dec.HiFiGAN(dec.HiFiGANConfig.preset("tiny")) if kind == "audio" else None
        decoders[kind] = dec.Decoder(kind, None, unet, dec.VAE(dec.VAEConfig.preset(vae)), samplers.DDIM(), vocoder,
                                     text_encoder=text[0], tokenizer=text[1])
        for part in (unet, decoders[kind].vae, vocoder, text[0]):
            if part is not None:
                part.eval().requires_grad_(False)
    encoder = ImageBind(config.imagebind, modalities=("vision", "audio")).eval().requires_grad_(False)
    model = NextGPT(config, LLaMA(config.llm), tok, encoder, decoders)
    model.generation = GenerationConfig.preset("tiny")
    return model.eval()
