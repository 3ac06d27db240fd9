"""
Reading official checkpoints: the one small piece that llm.py, encoder.py and decoders.py share.

Every official file we load goes through here, so the rules are written once:
- never unpickle arbitrary objects: `.bin` / `.pt` / `.pth` go through `torch.load(weights_only=True, mmap=True)`;
- memory-lean: files are memory-mapped (a safetensors tensor that must be cast is read straight into place), and `place`
  puts each tensor into the model as it is (no `copy_` into a second, randomly initialised buffer); models are built
  on the meta device;
- strict: every tensor of the file is used and every tensor of the model is filled, shapes checked, and anything
  else is an error that lists what is missing, unexpected or mis-shaped.
"""

import json
import os
import struct

import torch
import torch.nn as nn


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message says which tensors and what to do."""


def listing(title, names, limit=20):
    names = sorted(names)
    more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"  {title} ({len(names)}):\n" + "\n".join("    " + n for n in names[:limit]) + more


def load_file(path: str, dtype: torch.dtype | None = None, device=None) -> dict:
    """One weights file -> {name: tensor}. safetensors, or a pickled state dict read with weights_only=True."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path, dtype, device)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files written by torch < 1.6 (not zip) cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # some releases wrap the state dict; the tensors are the same
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(sd).__name__})")
    return {k: _cast(v, dtype, device) for k, v in sd.items()}


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _read_safetensors(path, dtype, device):
    """
    The safetensors format is an 8-byte header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
    raw little-endian bytes. A tensor kept as it is in the file (no cast, no move) is a view of the file mapped
    copy-on-write, as transformers does it and as load_file maps a `.bin`: nothing is read until it is used, and the
    pages are the page cache's. One that is cast or moved is read straight into its own buffer instead (no staging
    copy), so that the peak stays the size of the result, plus one tensor while casting.
    """
    out, size = {}, os.path.getsize(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        mapped = None
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = info["data_offsets"]
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which we do not read")
            file_dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            if 8 + n + end > size:
                raise CheckpointError(f"{path} is truncated (tensor {name}); download it again")
            kept = dtype is None or dtype == file_dtype or not file_dtype.is_floating_point  # _cast leaves it
            as_is = kept and torch.device(device or "cpu").type == "cpu"
            if as_is and end > start and (8 + n + start) % file_dtype.itemsize == 0:
                if mapped is None:  # MAP_PRIVATE: writes to these tensors (training) never reach the file
                    mapped = torch.from_file(path, shared=False, size=size, dtype=torch.uint8)
                out[name] = mapped[8 + n + start:8 + n + end].view(file_dtype).view(info["shape"])
                continue
            t = torch.empty(info["shape"], dtype=file_dtype)
            if end > start:
                f.seek(8 + n + start)
                buf = t.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes, written in place
                if f.readinto(memoryview(buf)) != end - start:
                    raise CheckpointError(f"{path} is truncated (tensor {name}); download it again")
            out[name] = _cast(t, dtype, device)
    return out


def _cast(t, dtype, device):
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    if device is not None:
        t = t.to(device)
    return t


def load_folder(folder: str, stems=("model", "diffusion_pytorch_model", "pytorch_model"),
                dtype: torch.dtype | None = None, device=None) -> dict:
    """
    The weights of a Hugging Face style folder, whatever form they were saved in:
    `<stem>.safetensors`, sharded `<stem>-0000k-of-0000n.safetensors` + `<stem>.safetensors.index.json`,
    or the `.bin` equivalents. safetensors win when both are there (as in transformers and diffusers).
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    for ext in (".safetensors", ".bin"):
        for stem in stems:
            single = os.path.join(folder, stem + ext)
            if os.path.isfile(single):
                return load_file(single, dtype, device)
            index = os.path.join(folder, stem + ext + ".index.json")
            if os.path.isfile(index):
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                out = {}
                for shard in shards:
                    out.update(load_file(os.path.join(folder, shard), dtype, device))
                return out
    raise FileNotFoundError(
        f"no weights in {folder}: expected one of "
        + ", ".join(s + e for e in (".safetensors", ".bin") for s in stems)
        + " (or a sharded form with its .index.json)")


def read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore or download it again") from None


def check(module, state_dict, what="checkpoint", partial=False, required=()):
    """Raise CheckpointError unless state_dict fits module exactly (names and shapes). partial: missing names allowed,
    except those in required."""
    expected = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    # non-persistent buffers (rotary tables, masks we compute) are not part of any checkpoint
    transient = {n for n, _ in _non_persistent(module)}
    expected = {n: t for n, t in expected.items() if n not in transient}
    missing = [n for n in (required if partial else expected) if n not in state_dict]
    unexpected = [n for n in state_dict if n not in expected]
    misshaped = [f"{n}: file {tuple(state_dict[n].shape)}, model {tuple(expected[n].shape)}"
                 for n in state_dict if n in expected and state_dict[n].shape != expected[n].shape]
    if missing or unexpected or misshaped:
        parts = [f"{what} does not fit {type(module).__name__}:"]
        if missing:
            parts.append(listing("missing from the file", missing))
        if unexpected:
            parts.append(listing("in the file but not in the model", unexpected))
        if misshaped:
            parts.append(listing("wrong shape", misshaped))
        parts.append("  Is this the right checkpoint for this config? (See README.md, 'Weights'.)")
        raise CheckpointError("\n".join(parts))


def _non_persistent(module, prefix=""):
    for name in module._non_persistent_buffers_set:
        yield prefix + name, None
    for child_name, child in module.named_children():
        yield from _non_persistent(child, prefix + child_name + ".")


def place(module, state_dict, what="checkpoint", partial=False, required=()):
    """
    Check, then put each tensor into module as it is (the module may live on the meta device).
    A tensor takes the dtype of the slot it fills unless that slot is on the meta device (then the file's dtype
    stays: from_pretrained casts while reading). requires_grad of every parameter is kept.
    """
    check(module, state_dict, what, partial, required)
    for name, t in state_dict.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        old = getattr(owner, leaf)
        if not old.is_meta:
            t = t.to(device=old.device, dtype=old.dtype if t.is_floating_point() else t.dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)
        else:
            owner._buffers[leaf] = t
    return module


def still_on_meta(module):
    """Names of parameters and persistent buffers left on the meta device (should be none after loading)."""
    return [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
