"""
The language model of NExT-GPT: LLaMA / Vicuna-7B, with a KV cache and a hand-written LoRA (its tokenizer: bpe.py).

References
- LLaMA: Touvron et al. 2023, https://arxiv.org/abs/2302.13971 (RMSNorm, SwiGLU, rotary embeddings)
- Vicuna-7B v0: LLaMA-1 7B + lmsys/vicuna-7b-delta-v0, shipped in Hugging Face format; NExT-GPT's released weights
  (ChocoWu/nextgpt_7b_tiva_v0) sit on top of it. NExT-GPT-Lagacy/code/model/anyToImageVideoAudio.py
- transformers/models/llama/modeling_llama.py: the module names below are its state-dict names, so an HF folder loads
  as it is. HF-format weights were permuted for the `rotate_half` form of RoPE: that is the form used here (meta's
  complex-number RoPE on HF weights would be silently wrong).
- LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685; peft's naming is read by `load_lora`.
- Weight-only int8: LLM.int8()'s per-row absmax (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339) without its
  outlier split, as pytorch-labs/gpt-fast quantize.py's WeightOnlyInt8Linear does it.
- FastChat v0.1.10, fastchat/model/apply_delta.py: how Vicuna v0 is made from LLaMA-1 and the delta, restated by
  `vicuna.apply_delta` (no FastChat, no transformers):

    python llm.py apply-delta --base llama-7b --delta vicuna-7b-delta-v0 --out checkpoints/vicuna-7b-v0
"""

import json
import math
import os
import re
import shutil
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import weights


@dataclass
class LLaMAConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32  # < n_heads: grouped-query attention (LLaMA-2 70B, LLaMA-3); LLaMA-1 has none
    vocab_size: int = 32000
    hidden_dim: int = 11008  # the SwiGLU width
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @classmethod
    def preset(cls, name):
        presets = {
            # LLaMA-1 7B, which Vicuna-7B v0 fine-tunes: the LLM of the released NExT-GPT weights
            "vicuna-7b": cls(),
            # every part at toy size: tests and the toy world
            "tiny": cls(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=256, hidden_dim=172, max_seq_len=256),
        }
        if name not in presets:
            raise ValueError(f"unknown LLaMA preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]

    @classmethod
    def from_hf(cls, config):
        """
        An HF `config.json` (path or dict) -> LLaMAConfig. The configs of 2023 load as they are: LLaMA-1's conversion
        wrote `max_sequence_length` (no `max_position_embeddings`) and `bos_token_id 0, eos_token_id 1,
        pad_token_id -1`, which disagree with tokenizer.model's 1 and 2. Nothing here reads those ids: the tokenizer's
        win, as in the legacy NExT-GPT code (its LlamaTokenizer decides what BOS and the stop token are).
        """
        c = weights.read_json(config) if isinstance(config, (str, os.PathLike)) else config
        if c.get("rope_scaling"):
            raise ValueError(f"rope_scaling {c['rope_scaling']} is not supported: only plain RoPE (LLaMA-1/2, Vicuna)")
        return cls(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                   n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"], vocab_size=c["vocab_size"],
                   hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
                   rope_theta=c.get("rope_theta", 10000.0),
                   max_seq_len=c.get("max_position_embeddings") or c.get("max_sequence_length", 2048),
                   tie_embeddings=c.get("tie_word_embeddings", False))

    def shape(self):
        """What fixes the weights' shapes, but the vocabulary: two configs with equal shapes share a delta."""
        return {k: getattr(self, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim")}


# ----------------------------------------------------------------------------------------------------------------------
# The network

class RMSNorm(nn.Module):
    """LlamaRMSNorm: x / rms(x) * w, computed in float32 (as HF does) and cast back."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x):
    # HF convention: the two halves of each head are the (real, imaginary) pairs, not interleaved neighbours
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(head_dim, max_len, theta, device=None):
    """cos, sin of shape (max_len, head_dim), float32: position p rotates pair i by p * theta^(-2i/head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)  # (L, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (L, hd), matching rotate_half's halves
    return angles.cos(), angles.sin()


class Attention(nn.Module):
    """LlamaAttention with an optional preallocated KV cache."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin  # cos, sin: (T, hd) for positions start_pos .. start_pos + T - 1
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            # write this step's keys and values, then attend over everything written so far (a fresh prefill
            # attends over its own k, v: the same numbers, without reading them back from the cache)
            k_all, v_all = cache
            k_all[:B, :, start_pos:start_pos + T] = k
            v_all[:B, :, start_pos:start_pos + T] = v
            if start_pos > 0:
                k, v = k_all[:B, :, :start_pos + T], v_all[:B, :, :start_pos + T]  # (B, nkv, S, hd), S = start_pos + T
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: each kv head serves n_heads / n_kv_heads queries
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        S = k.shape[2]
        if T == 1:
            mask, causal = None, False  # one new token sees every cached position
        elif S == T:
            mask, causal = None, True  # a fresh prefill: the plain causal triangle
        else:
            # a chunk after cached tokens: query i sits at position start_pos + i and sees keys 0 .. start_pos + i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            causal = False
        # softmax(q k^T / sqrt(hd) + mask) v, fused
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """LlamaMLP: SwiGLU, down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """LlamaDecoderLayer: pre-norm attention and MLP, each with a residual."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLaMA(nn.Module):
    """LlamaForCausalLM. State-dict names are HF's: model.embed_tokens, model.layers.N.*, model.norm, lm_head."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        # nn.ModuleDict named `model` so that the parameter names are exactly the HF checkpoint's
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.dim),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers)),
            norm=RMSNorm(cfg.dim, cfg.norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False  # train.py may switch it on: recompute each block in backward
        self.init_rope()

    def init_rope(self, device=None):
        # Non-persistent: not in any checkpoint, so after a meta-device build it is recomputed here.
        device = device or self.lm_head.weight.device
        cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta,
                               device=None if device.type == "meta" else device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx=None, embeds=None, cache=None, start_pos=0, return_hidden=False, last_only=False):
        """
        idx (B, T) token ids, or embeds (B, T, D) input embeddings (NExT-GPT splices encoder tokens into them).
        cache: a KVCache, filled at positions start_pos .. start_pos + T - 1 (prefill: start_pos 0, then one token
        at a time). Returns logits (B, T, V) (only the last position if last_only), and with return_hidden also the
        hidden states after the final norm (B, T, D): NExT-GPT's output projectors read those.
        """
        if embeds is None:
            embeds = self.model.embed_tokens(idx)  # (B, T, D)
        B, T, _ = embeds.shape
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} positions is longer than max_seq_len "
                             f"{self.config.max_seq_len}")
        cos = self.rope_cos[start_pos:start_pos + T].to(embeds.dtype)  # (T, hd)
        sin = self.rope_sin[start_pos:start_pos + T].to(embeds.dtype)
        x = embeds
        for i, block in enumerate(self.model.layers):
            layer_cache = cache.layer(i) if cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, layer_cache, start_pos)
        h = self.model.norm(x)  # (B, T, D)
        logits = self.lm_head(h[:, -1:] if last_only else h)  # (B, T, V)
        return (logits, h) if return_hidden else logits

    def new_cache(self, batch=1, max_len=None, device=None, dtype=None):
        w = self.model.embed_tokens.weight  # the embedding: never int8 (quantize_int8), so the activations' dtype
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, device or w.device, dtype or w.dtype)

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype | None = None, device=None,
                        expect: LLaMAConfig | None = None) -> "LLaMA":
        """
        An HF-format folder (config.json + model*.safetensors or pytorch_model*.bin, sharded or not) -> LLaMA, loaded
        by weights.place's rules (strict, meta-device build, one copy). dtype None means float32, as transformers.
        The rows are the file's: a Vicuna v0 made by FastChat v0.1.10 has 32,001 (its [PAD], see vicuna.apply_delta),
        and NextGPT resizes them to its tokenizer's. expect: the config the caller needs; a config.json of another shape
        (a 13B base for a 7B model) is refused before any weights are read.
        """
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"LLaMA / Vicuna folder not found: {folder}. NExT-GPT's released weights need Vicuna-7B v0 in HF "
                f"format (LLaMA-1 7B with lmsys/vicuna-7b-delta-v0 applied; see README.md, 'Weights').")
        cfg = LLaMAConfig.from_hf(os.path.join(folder, "config.json"))
        if expect is not None and (cfg.shape() != expect.shape() or cfg.vocab_size < expect.vocab_size):
            raise ValueError(
                f"{os.path.join(folder, 'config.json')} describes a LLaMA of {cfg.shape()} and {cfg.vocab_size} token "
                f"rows; expected {expect.shape()} and at least {expect.vocab_size} rows: a base model of another "
                f"size? (NExT-GPT's released weights sit on Vicuna-7B v0)")
        sd = weights.load_folder(folder, stems=("model", "pytorch_model"), dtype=dtype or torch.float32, device=device)
        # older transformers saved the computed rotary buffers (model.rotary_emb. or per layer): recomputed here
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        if cfg.tie_embeddings:
            sd.pop("lm_head.weight", None)
        with torch.device("meta"):
            model = cls(cfg)
        weights.place(model, sd, what=f"LLaMA checkpoint {folder}")
        if cfg.tie_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.init_rope(model.lm_head.weight.device)
        return model.eval()

    def save_pretrained(self, folder, tokenizer_model=None):
        """Write an HF-format folder (config.json + model.safetensors [+ tokenizer.model]) that from_pretrained and
        transformers' LlamaForCausalLM both read."""

        from safetensors.torch import save_file
        os.makedirs(folder, exist_ok=True)
        c = self.config
        hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
              "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
              "vocab_size": c.vocab_size, "intermediate_size": c.hidden_dim, "rms_norm_eps": c.norm_eps,
              "rope_theta": c.rope_theta, "max_position_embeddings": c.max_seq_len,
              "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hf, f, indent=1)
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()
              if not (c.tie_embeddings and k == "lm_head.weight")}
        path = os.path.join(folder, "model.safetensors")
        # written beside, then renamed: a model loaded from this very file is a view of it (weights.load_file)
        save_file(sd, path + ".partial", metadata={"format": "pt"})
        os.replace(path + ".partial", path)
        if tokenizer_model:
            shutil.copy(tokenizer_model, os.path.join(folder, "tokenizer.model"))

    # ------------------------------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def stream(self, idx=None, embeds=None, max_new_tokens=128, temperature=0.0, top_p=1.0, stop_ids=(),
               generator=None, cache=None):
        """
        Generate one token at a time (batch 1) with the KV cache. Yields (token_id, hidden) where hidden (D,) is the
        final-norm hidden state of the position whose logits chose the token. temperature 0 = greedy.
        Stops after a token in stop_ids (which is yielded) or max_new_tokens.
        """
        if embeds is None:
            embeds = self.model.embed_tokens(idx)
        if embeds.shape[0] != 1:
            raise ValueError("stream() generates for one sequence at a time (batch 1)")
        T = embeds.shape[1]
        if cache is None:
            cache = self.new_cache(1, min(self.config.max_seq_len, T + max_new_tokens))
        logits, h = self(embeds=embeds, cache=cache, start_pos=0, return_hidden=True, last_only=True)  # prefill
        pos = T
        for _ in range(max_new_tokens):
            token = sample(logits[0, -1], temperature, top_p, generator)
            yield token, h[0, -1]
            if token in stop_ids or pos >= cache.max_len:
                return
            x = self.model.embed_tokens(torch.tensor([[token]], device=embeds.device))  # (1, 1, D)
            logits, h = self(embeds=x, cache=cache, start_pos=pos, return_hidden=True)
            pos += 1

    def generate(self, idx=None, embeds=None, max_new_tokens=128, temperature=0.0, top_p=1.0, stop_ids=(),
                 generator=None):
        """The stream, collected: a list of new token ids (the stop token included when one was produced)."""
        return [t for t, _ in self.stream(idx, embeds, max_new_tokens, temperature, top_p, stop_ids, generator)]


class KVCache:
    """Preallocated keys and values for every layer: (n_layers, 2, B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        self.max_len = max_len
        # empty, not zeros: a position is only ever read after it was written
        self.kv = torch.empty(cfg.n_layers, 2, batch, cfg.n_kv_heads, max_len, cfg.head_dim, device=device,
                              dtype=dtype)

    def layer(self, i):
        return self.kv[i, 0], self.kv[i, 1]


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """logits (V,) -> a token id: argmax at temperature 0, else nucleus sampling over the smallest top-p set."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # drop a token when the tokens before it already hold top_p of the mass (the first one always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


# ----------------------------------------------------------------------------------------------------------------------
# LoRA, by hand (no peft at run time)

class LoRALinear(nn.Linear):
    """
    A frozen Linear plus a trainable low-rank update: y = x W^T + b + scale * dropout(x) A^T B^T, scale = alpha / r.
    A starts random and B at zero, so the wrapped model starts out exactly the base model (peft's LoraLayer).
    The base `weight` / `bias` keep their names, so base checkpoints still load into a wrapped model.
    """

    def __init__(self, base, r, alpha, dropout=0.0):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.scale = r, alpha / r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's init for A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale


def add_lora(model, r, alpha, dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """Wrap every nn.Linear named one of targets. As peft does, every other parameter of the model is frozen: only
    the LoRA tensors train (NExT-GPT then unfreezes what else it trains, e.g. its projectors)."""
    model.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, r, alpha, dropout))
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"add_lora found no nn.Linear named one of {targets}")
    return model


# peft: "<prefix>model.layers.3.self_attn.q_proj.lora_A.default.weight"; ours: "model.layers.3.self_attn.q_proj.lora_A"
_PEFT_PREFIXES = ("llama_model.", "base_model.model.")


def _our_lora_name(name):
    for p in _PEFT_PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
    return re.sub(r"\.(lora_[AB])(\.default)?(\.weight)?$", r".\1", name)


def lora_state_dict(model):
    """Only the LoRA tensors, in our naming (load_lora reads it back, as well as peft's naming)."""
    return {n: p for n, p in model.state_dict().items() if re.search(r"\.lora_[AB]$", n)}


def load_lora(model: nn.Module, state_dict: dict) -> nn.Module:
    """
    Put LoRA tensors into a model that add_lora wrapped. Reads our naming and peft's (with or without the
    `llama_model.base_model.model.` / `base_model.model.` prefix, with or without `.default`). Every tensor of the
    model's LoRA must be given and every given tensor placed, shapes checked; otherwise CheckpointError.
    """
    ours = {}
    for name, t in state_dict.items():
        if not re.search(r"\.lora_[AB](\.default)?(\.weight)?$", name):
            raise weights.CheckpointError(f"load_lora: {name} is not a LoRA tensor (lora_A / lora_B)")
        ours[_our_lora_name(name)] = t
    expected = lora_state_dict(model)
    if not expected:
        raise weights.CheckpointError("load_lora: the model has no LoRA layers; call add_lora(model, r, alpha) first")
    return weights.place(model, ours, what="LoRA state dict (was add_lora called with the same targets?)",
                         partial=True, required=expected)


@torch.no_grad()
def merge_lora(model):
    """Fold every LoRA update into its base weight (W += scale B A) and unwrap it into a plain nn.Linear: inference
    then costs nothing extra. lora_state_dict is empty afterwards."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                delta = (child.lora_B.float() @ child.lora_A.float()) * child.scale  # (out, in)
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device="meta")
                plain.weight = nn.Parameter((child.weight.float() + delta).to(child.weight.dtype), requires_grad=False)
                if child.bias is not None:
                    plain.bias = child.bias
                setattr(module, child_name, plain)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Weight-only int8, by hand: decode reads every weight once a token, so a byte a weight instead of 4 or 2 is speed too

class Int8Linear(nn.Module):
    """
    gpt-fast's WeightOnlyInt8Linear: an nn.Linear whose weight is int8 with one float scale per output row
    (symmetric), W ~= weight * scale[:, None].
    The int8 tensor keeps the name `weight` (state dict: the float one's names plus `.scale`); buffers, as it does not
    train. model.to(device) moves both, model.to(dtype) leaves the int8 alone.
    """

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): each row's largest |w| becomes +-127
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x):
        if x.device.type == "cpu" and self.in_features % 16 == 0 and hasattr(torch, "_weight_int8pack_mm"):  # 2.3+
            # torch's weight-only int8 kernel, in bfloat16 whatever x is: on this kind of CPU ~3x faster than a float
            # matmul and far faster than the branch below (which converts the whole weight each call) or the
            # kernel's float32 form. It needs in_features % 16 == 0 (else it crashes or is wrong, torch 2.14).
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight,
                                          self.scale.to(torch.bfloat16))  # (B*T, out)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)  # (B, T, out)
        else:  # elsewhere: the int8 as floats (exact: |weight| <= 127), the matmul, then each row's scale
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)  # (B, T, out)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


@torch.no_grad()
def quantize_int8(model, lm_head=True):
    """
    Replace every nn.Linear of a LLaMA in place by an Int8Linear: attention q/k/v/o, MLP gate/up/down, and lm_head
    unless lm_head=False. The embedding stays float (a lookup reads one row a token), so the activations' dtype and
    device are read from it. Inference only. LoRA wrappers are refused rather than merged here: merging is the
    caller's choice (it ends the LoRA's training), so merge_lora(model) first. A second call finds no nn.Linear left
    and changes nothing.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("quantize_int8: the model has LoRA layers; call merge_lora(model) first (int8 of the merged "
                         "weights)")
    # (parent, name) pairs, not the Linears themselves: each float weight is freed as soon as its int8 copy replaces
    # it, so the peak is the float model plus one layer (a list of the modules, or a variable holding the head, would
    # keep float weights alive to the end)
    slots = [(module, name) for module in model.modules() for name, child in module.named_children()
             if type(child) is nn.Linear and (lm_head or (module, name) != (model, "lm_head"))]
    for module, name in slots:
        setattr(module, name, Int8Linear(getattr(module, name)))
    return model


if __name__ == "__main__":  # python llm.py apply-delta ...: a conversion of files, written in vicuna.py (imported
    import vicuna  # here only: the model itself never needs it)

    vicuna.main()
