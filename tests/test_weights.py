"""weights.py: our safetensors reader against the safetensors library, and the strict placement's errors."""

import os

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


def _rss_file_kib():  # file-backed resident pages of this process (Linux), KiB
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status (Linux)")
def test_safetensors_kept_as_is_are_mapped_lazily_and_copy_on_write(tmp_path):
    path = str(tmp_path / "m.safetensors")
    save_file({"w": torch.ones(64, 2**16), "b": torch.arange(4)}, path)  # w: 16 MiB of float32
    before, on_disk = _rss_file_kib(), open(path, "rb").read()
    sd = weights.load_file(path)
    assert _rss_file_kib() - before < 4096  # nothing read yet: a view of the mapped file
    assert sd["w"].sum() == 64 * 2**16 and _rss_file_kib() - before > 12 * 1024  # read when used
    sd["w"].add_(1)  # training writes into its own copy of the pages, never into the file
    assert open(path, "rb").read() == on_disk and torch.equal(weights.load_file(path)["w"], torch.ones(64, 2**16))
    assert weights.load_file(path, dtype=torch.float16)["w"].dtype == torch.float16  # a cast is read, not mapped


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
