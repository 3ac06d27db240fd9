"""
Vicuna-7B v0 without FastChat: LLaMA-1 7B + lmsys's delta, as FastChat v0.1.10 makes it, one shard at a time.

    python llm.py apply-delta --base llama-7b --delta vicuna-7b-delta-v0 --out checkpoints/vicuna-7b-v0

(the command is llm.py's, the code here: a conversion of checkpoint files, with no model built.)

References
- FastChat v0.1.10, fastchat/model/apply_delta.py (lm-sys/FastChat at tag v0.1.10), restated by apply_delta
- the safetensors format (an 8-byte header length, a JSON header, the raw bytes), https://github.com/huggingface/safetensors
"""

import inspect
import json
import math
import os
import shutil
import struct
import sys
import time

import torch

import bpe
import cli
import weights

ROTARY_BUFFER = "rotary_emb.inv_freq"  # saved by transformers < 4.31, recomputed from the config by every reader


def apply_delta(base: str, delta: str, out: str, log=print) -> str:
    """
    Vicuna v0 = LLaMA-1 + lmsys's delta (e.g. lmsys/vicuna-7b-delta-v0), as FastChat v0.1.10 makes it
    (fastchat/model/apply_delta.py at tag v0.1.10 of lm-sys/FastChat), restated without FastChat or transformers:
      1. base and delta are read in float16 (from_pretrained(torch_dtype=torch.float16));
      2. the base tokenizer gets a [PAD] special token (32,000 -> 32,001 tokens) and resize_token_embeddings(32,001)
         keeps the base rows of embed_tokens and lm_head; the new last row of both is set to zero;
      3. every base tensor gets the delta's tensor of the same name added, in float16
         (`param.data += delta.state_dict()[name]`): the [PAD] row ends up the delta's own row;
      4. the model is saved (config.json: the base's, vocab_size 32001) with the *delta's* tokenizer files.
    The numbers are FastChat's bit for bit (the same float16 additions). The files differ in form only: safetensors
    shards, one per delta shard (model-0000k-of-0000n.safetensors + model.safetensors.index.json), not .bin, and no
    rotary_emb.inv_freq buffers (readers recompute them; FastChat saved base + delta ones, which are zero in the delta).
    One delta shard at a time: its tensors, the base tensors they need (.bin files memory-mapped), and one sum at a
    time written straight into the output shard, so the peak is about two shards. Written into OUT.partial, renamed to
    OUT when complete. A mismatch (another model size, another vocabulary, a tensor missing) is refused naming the file.
    """
    for what, folder in (("base", base), ("delta", delta)):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{what} folder not found: {folder}")
    cfgs = {what: weights.read_json(os.path.join(folder, "config.json")) for what, folder in (("base", base),
                                                                                           ("delta", delta))}
    if shape(cfgs["base"]) != shape(cfgs["delta"]):
        raise ValueError(f"{os.path.join(delta, 'config.json')} describes a LLaMA of {shape(cfgs['delta'])}, "
                         f"{os.path.join(base, 'config.json')} one of {shape(cfgs['base'])}: a delta for another "
                         "model size")
    # the rows FastChat gives the result: len(base tokenizer) + [PAD]
    tok_path = os.path.join(base, "tokenizer.model")
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"{tok_path} not found: FastChat counts the base's tokens to add [PAD] after them")
    n_tokens = bpe.LLaMATokenizer(tok_path).sp.get_piece_size() + len(_read_optional(base, "added_tokens.json"))
    if _read_optional(base, "special_tokens_map.json").get("pad_token"):
        raise ValueError(f"{os.path.join(base, 'special_tokens_map.json')} already names a pad token: FastChat "
                         "v0.1.10 would add none and its `[-0:] = 0` would zero every row; give the plain LLaMA-1 base")
    base_rows, delta_rows = cfgs["base"]["vocab_size"], cfgs["delta"]["vocab_size"]
    if base_rows != n_tokens:
        raise ValueError(f"{os.path.join(base, 'config.json')} has vocab_size {base_rows}, its tokenizer "
                         f"{n_tokens} tokens: not a plain LLaMA-1 base")
    rows = n_tokens + 1
    if delta_rows != rows:
        raise ValueError(f"{os.path.join(delta, 'config.json')} has vocab_size {delta_rows}; FastChat v0.1.10 gives "
                         f"the base's {n_tokens} tokens + [PAD] = {rows} rows (a v0 delta, e.g. vicuna-7b-delta-v0). "
                         "A v1.1 delta (32,000 rows) needs FastChat >= 0.2's apply_delta instead")
    base_files, delta_files = _weight_files(base), _weight_files(delta)
    base_at = {n: path for path, names in base_files.items() for n in names if not n.endswith(ROTARY_BUFFER)}
    delta_names = {n for names in delta_files.values() for n in names if not n.endswith(ROTARY_BUFFER)}
    if set(base_at) != delta_names:
        parts = [f"the base {base} and the delta {delta} hold different tensors:"]
        if set(base_at) - delta_names:
            parts.append(weights.listing("in the base, not in the delta", set(base_at) - delta_names))
        if delta_names - set(base_at):
            parts.append(weights.listing("in the delta, not in the base", delta_names - set(base_at)))
        raise weights.CheckpointError("\n".join(parts))

    partial = out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    log(f"apply-delta: {base} ({base_rows} rows) + {delta} ({delta_rows} rows, {len(delta_files)} shard(s)) -> {out}")
    n_shards, weight_map, total = len(delta_files), {}, 0
    for k, (delta_path, names) in enumerate(delta_files.items(), 1):
        t0 = time.time()
        names = [n for n in names if not n.endswith(ROTARY_BUFFER)]
        d_sd, b_sd = _load_tensors(delta_path, names), {}
        for path in sorted({base_at[n] for n in names}):
            b_sd.update(_load_tensors(path, [n for n in names if base_at[n] == path]))
        specs = []
        for n in names:
            grown = n in ("model.embed_tokens.weight", "lm_head.weight")
            if grown and b_sd[n].shape[0] != n_tokens:
                raise weights.CheckpointError(f"{base_at[n]}: {n} has {b_sd[n].shape[0]} rows, the base's config.json "
                                              f"and tokenizer {n_tokens}")
            want = (rows, *b_sd[n].shape[1:]) if grown else tuple(b_sd[n].shape)
            if tuple(d_sd[n].shape) != want:
                raise weights.CheckpointError(f"{delta_path}: {n} is {tuple(d_sd[n].shape)}, the base with [PAD] "
                                              f"needs {want} ({base_at[n]})")
            specs.append((n, want))

        file = "model.safetensors" if n_shards == 1 else f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        total += _write_safetensors(os.path.join(partial, file), specs, _sums(specs, b_sd, d_sd, n_tokens))
        weight_map.update(dict.fromkeys(names, file))
        del d_sd, b_sd
        log(f"  {file}: {len(names)} tensors, {os.path.getsize(os.path.join(partial, file)) / 1e9:.2f} GB, "
            f"{time.time() - t0:.0f} s")
    if n_shards > 1:
        _write_json(os.path.join(partial, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    # save_pretrained writes the base's config with the new vocabulary size (and its own class name, dtype)
    _write_json(os.path.join(partial, "config.json"),
                {**cfgs["base"], "architectures": ["LlamaForCausalLM"], "torch_dtype": "float16", "vocab_size": rows})
    _save_tokenizer(delta, partial)
    if os.path.isdir(out):
        os.rmdir(out)  # an empty folder only (main refuses a full one)
    os.replace(partial, out)
    log(f"apply-delta: wrote {out} ({total / 1e9:.2f} GB)")
    return out


def _sums(specs, base_sd, delta_sd, n_tokens):
    """base + delta for each (name, shape), one at a time, in float16 (the order of FastChat's operations)."""
    for name, shape in specs:
        if shape[0] != base_sd[name].shape[0]:  # embed_tokens, lm_head: resize_token_embeddings, [PAD] row zeroed
            x = torch.zeros(shape, dtype=torch.float16)
            x[:n_tokens] = base_sd[name]
        else:
            x = base_sd[name].to(torch.float16, copy=True)
        x += delta_sd[name]  # `param.data += delta.state_dict()[name]`
        yield x


def _load_tensors(path, names):
    """Only `names` of one weights file, in float16: safetensors read tensor by tensor, a .bin memory-mapped (only what
    is used is read)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            return {n: f.get_tensor(n).to(torch.float16) for n in names}
    sd = weights.load_file(path)
    return {n: sd[n].to(torch.float16) for n in names}


def _read_optional(folder, name):
    path = os.path.join(folder, name)
    return weights.read_json(path) if os.path.isfile(path) else {}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _save_tokenizer(delta, out):
    """What FastChat's `delta_tokenizer.save_pretrained(out)` writes (transformers 4.28, slow LlamaTokenizer): the
    delta's tokenizer.model, its special_tokens_map.json and tokenizer_config.json, and added_tokens.json when the
    tokenizer has added tokens: those of the delta's added_tokens.json, and any special token that tokenizer.model
    lacks (as [PAD]: the loader adds it after the pieces)."""
    src = os.path.join(delta, "tokenizer.model")
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src} not found: FastChat saves the delta's tokenizer with the result")
    shutil.copy(src, os.path.join(out, "tokenizer.model"))
    sp = bpe.LLaMATokenizer(src).sp
    special = _read_optional(delta, "special_tokens_map.json") or {"bos_token": "<s>", "eos_token": "</s>",
                                                                     "unk_token": "<unk>"}
    config = _read_optional(delta, "tokenizer_config.json") or {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "sp_model_kwargs": {},
        "clean_up_tokenization_spaces": False, **special}
    added = _read_optional(delta, "added_tokens.json")
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        text = special.get(key)
        text = text.get("content") if isinstance(text, dict) else text
        if isinstance(text, str) and text not in added and sp.piece_to_id(text) == sp.unk_id() and \
                text != sp.id_to_piece(sp.unk_id()):
            added[text] = sp.get_piece_size() + len(added)
    _write_json(os.path.join(out, "special_tokens_map.json"), special)
    _write_json(os.path.join(out, "tokenizer_config.json"), config)
    if added:
        _write_json(os.path.join(out, "added_tokens.json"), added)


def _weight_files(folder):
    """{file: [tensor names]} of an HF folder's weights, chosen as weights.load_folder does (safetensors first, single
    file or index), in shard order, without reading tensors (a single .bin is memory-mapped for its names)."""
    for ext in (".safetensors", ".bin"):
        for stem in ("model", "pytorch_model"):
            single = os.path.join(folder, stem + ext)
            if os.path.isfile(single):
                if ext == ".bin":
                    return {single: list(weights.load_file(single))}
                with open(single, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    return {single: [k for k in json.loads(f.read(n)) if k != "__metadata__"]}
            if os.path.isfile(single + ".index.json"):
                files = {}
                for name, file in weights.read_json(single + ".index.json")["weight_map"].items():
                    files.setdefault(os.path.join(folder, file), []).append(name)
                return dict(sorted(files.items()))
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors, pytorch_model.bin or a sharded form "
                            "with its .index.json")


def _write_safetensors(path, specs, tensors):
    """A safetensors file written one tensor at a time: specs [(name, shape)] fix the header (float16), `tensors`
    yields each in that order, so that one tensor at a time is in memory. Returns the bytes of tensor data."""
    header, offset = {}, 0
    for name, shape in specs:
        size = math.prod(shape) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for (name, shape), t in zip(specs, tensors):
            assert t.dtype == torch.float16 and tuple(t.shape) == tuple(shape), name
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes, no copy
    return offset


def main(argv=None):
    p = cli.parser("llm.py", __doc__)
    p.usage = "%(prog)s apply-delta --base LLAMA_DIR --delta DELTA_DIR --out OUT_DIR  (--help lists the commands)"
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    a = commands.add_parser("apply-delta", help="Vicuna v0 from LLaMA-1 and lmsys's delta, as FastChat v0.1.10 does",
                            prog="llm.py apply-delta", usage="%(prog)s --base LLAMA_DIR --delta DELTA_DIR --out DIR",
                            description=inspect.cleandoc(apply_delta.__doc__), formatter_class=p.formatter_class,
                            allow_abbrev=False)
    a.add_argument("--base", required=True, metavar="DIR", help="LLaMA-1 7B in HF format (config.json, weights, "
                   "tokenizer.model)")
    a.add_argument("--delta", required=True, metavar="DIR", help="the delta in HF format (lmsys/vicuna-7b-delta-v0)")
    a.add_argument("--out", required=True, metavar="DIR", help="where Vicuna v0 goes (a new or empty folder)")
    args = p.parse_args(argv)
    for what in ("base", "delta"):
        if not os.path.isdir(getattr(args, what)):
            a.error(f"--{what} {getattr(args, what)}: no such folder")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        a.error(f"--out {args.out} exists and is not an empty folder; give a new one")
    try:
        apply_delta(args.base, args.delta, args.out)
    except (OSError, ValueError) as e:  # FileNotFoundError, weights.CheckpointError
        print(f"llm.py apply-delta: error: {e}", file=sys.stderr)
        sys.exit(1)


def shape(config):
    """What fixes a LLaMA's weight shapes but the vocabulary, from its config.json: two with the same shape share a
    delta."""
    return {"dim": config["hidden_size"], "n_layers": config["num_hidden_layers"],
            "n_heads": config["num_attention_heads"],
            "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
            "hidden_dim": config["intermediate_size"]}
