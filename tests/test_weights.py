"""weights.py: our safetensors reader against the safetensors library, and the strict placement's errors."""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file

import weights


def test_safetensors_reader_equals_the_library(tmp_path):
    torch.manual_seed(0)
    sd = {"f32": torch.randn(3, 5), "f16": torch.randn(7).half(), "bf16": torch.randn(2, 2, 2).bfloat16(),
          "i64": torch.arange(6).view(2, 3), "i8": torch.tensor([-3, 4], dtype=torch.int8),
          "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "m.safetensors")
    save_file(sd, path, metadata={"format": "pt"})
    ours, ref = weights.load_file(path), st_load(path)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape and torch.equal(ours[k], ref[k]), k
    cast = weights.load_file(path, dtype=torch.float16)
    assert cast["f32"].dtype == torch.float16 and cast["i64"].dtype == torch.int64  # only floats are cast


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(weights.CheckpointError, match="truncated"):
        weights.load_file(str(path))


def test_place_is_strict_and_keeps_requires_grad():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))
    m[1].requires_grad_(False)
    sd = {"0.weight": torch.ones(3, 2), "0.bias": torch.zeros(3), "1.weight": torch.ones(3), "1.bias": torch.zeros(3)}
    weights.place(m, sd)
    assert not weights.still_on_meta(m) and m[0].weight.requires_grad and not m[1].weight.requires_grad
    with pytest.raises(weights.CheckpointError, match=r"missing from the file \(1\):\n\s+1.bias"):
        weights.place(m, {k: v for k, v in sd.items() if k != "1.bias"})
    with pytest.raises(weights.CheckpointError, match=r"0.weight: file \(2, 3\), model \(3, 2\)"):
        weights.place(m, {**sd, "0.weight": torch.ones(2, 3)})
