"""Every bad input gets a one-line error that names it, with exit status 2 for a bad argument and 1 for a bad file or
model, no traceback, and no output file created. Run in-process (sample.main / train.main), as the command line does."""

import json
import os
import shutil

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import sample
import train

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(HERE, "assets", "toy")
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A folder of bad inputs: files that are not what their names say, checkpoints with one damaged piece."""
    d = tmp_path_factory.mktemp("bad")
    (d / "broken.png").write_bytes(b"not an image at all")
    (d / "empty.wav").write_bytes(b"")
    soundfile.write(d / "nan.wav", np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    (d / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    (d / "a_file").write_text("not a folder")
    (d / "not_json.json").write_text("image_name: red.png")
    (d / "empty.json").write_text("[]")
    (d / "string.json").write_text('"hello"')
    Image.new("RGB", (8, 8)).save(d / "ok.png")
    (d / "cc3m.json").write_text(json.dumps([{"image_name": "ok.png", "caption": "a black square"}]))
    (d / "bad_config.json").write_text('{"epochs": "many"}')
    for name in ("truncated", "malformed", "wrong_manifest"):
        shutil.copytree(TOY, d / name)
    w = d / "truncated" / "nextgpt.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    (d / "malformed" / "nextgpt.json").write_text('{"config": {"llm": ')
    (d / "wrong_manifest" / "nextgpt.json").write_text(json.dumps({"config": {"llm": {"dim": 8}}, "files": {}}))
    (d / "empty_ckpt").mkdir()
    return d


S, T = "sample.py", "train.py"
CASES = [  # (tool, arguments, exit status, words the message must have); {d}: the bad-input folder, {out}: the output
    (S, "--steps 0", 2, "--steps must be an integer from 1 to 1000 (got 0)"),
    (S, "--steps -3", 2, "(got -3)"),
    (S, "--frames 0", 2, "--frames must be an integer from 1 to 128"),
    (S, "--seconds -1", 2, "--seconds must be from 0.1 to 60"),
    (S, "--seconds 100000", 2, "--seconds must be from 0.1 to 60"),
    (S, "--guidance -5", 2, "--guidance must be from 0 to 100"),
    (S, "--temperature -1", 2, "--temperature must be from 0"),
    (S, "--top-p 5", 2, "--top-p must be in (0, 1]"),
    (S, "--top-p 0", 2, "--top-p must be in (0, 1]"),
    (S, "--height 7", 2, "--height must be a multiple of 8"),
    (S, "--height 100000 --width 100000", 2, "from 8 to 2048"),
    (S, "--max-new-tokens 0", 2, "--max-new-tokens must be an integer"),
    (S, "--seed -1", 2, "--seed must be an integer from 0"),
    (S, "--steps many", 2, "invalid int value: 'many'"),
    (S, "--want smell", 2, "--want takes image, video, audio; not smell"),
    (S, "--no-such-option", 2, "unrecognized arguments: --no-such-option"),
    (S, "--image {d}/missing.png", 2, "--image {d}/missing.png: no such file"),
    (S, "--out {d}/a_file", 2, "--out {d}/a_file is a file"),
    (S, "--device nonsense", 2, "--device nonsense is not a device name"),
    (S, "--device mps", 2, "no MPS device"),
    *([(S, "--device cuda", 2, "no CUDA device")] if NO_CUDA else []),
    (S, "--dtype float64", 2, "invalid choice: 'float64'"),
    (S, "--tiny-random --prompt hi --image {d}/broken.png", 1, "cannot read image {d}/broken.png"),
    (S, "--tiny-random --prompt hi --audio {d}/empty.wav", 1, "audio file is empty (0 bytes): {d}/empty.wav"),
    (S, "--tiny-random --prompt hi --audio {d}/nan.wav", 1, "{d}/nan.wav has non-finite samples"),
    (S, "--tiny-random --prompt hi --video {d}/junk.mp4", 1, "{d}/junk.mp4"),
    (S, "--tiny-random --prompt <image><image> --image {d}/ok.png", 1, "more <image> markers than image inputs"),
    (S, "--ckpt {d}/truncated --prompt hi", 1, "{d}/truncated/nextgpt.safetensors is truncated"),
    (S, "--ckpt {d}/malformed --prompt hi", 1, "{d}/malformed/nextgpt.json is not valid JSON"),
    (S, "--ckpt {d}/wrong_manifest --prompt hi", 1, "{d}/wrong_manifest/nextgpt.json is not a NExT-GPT manifest"),
    (S, "--ckpt {d}/empty_ckpt --prompt hi", 1, "missing {d}/empty_ckpt/imagebind_huge.pth"),
    (T, "--lr=abc", 2, "--lr takes a float, not 'abc'"),
    (T, "--stage=4", 2, "--stage must be 1, 2 or 3 (got 4)"),
    (T, "--batch-size=0", 2, "--batch-size must be an integer of at least 1 (got 0)"),
    (T, "--lr=-1", 2, "--lr must be a number of at least 0 (got -1.0)"),
    (T, "--beta1=1.5", 2, "--beta1 must be in [0, 1) (got 1.5)"),
    (T, "--input-proj=conv", 2, "--input-proj must be one of '', 'linear', 'group' (got 'conv')"),
    (T, "--device=nonsense", 2, "--device nonsense is not a device name"),
    *([(T, "--device=cuda", 2, "no CUDA device")] if NO_CUDA else []),
    (T, "--config={d}/missing.json", 2, "--config {d}/missing.json: No such file or directory"),
    (T, "--config={d}/bad_config.json", 2, "--epochs takes an int, not 'many'"),
    (T, "--tiny-random --data={d}/not_json.json", 1, "data file {d}/not_json.json is not JSON"),
    (T, "--tiny-random --data={d}/empty.json", 1, "data file {d}/empty.json holds no records"),
    (T, "--tiny-random --data={d}/string.json", 1, "data file {d}/string.json holds str"),
    (T, "--tiny-random --data={d}/none.json", 1, "data file {d}/none.json: No such file or directory"),
    (T, "--tiny-random --resume --data={d}/cc3m.json", 1, "--resume: no checkpoint in {out}"),
    (T, "--tiny-random --prepare", 1, "--prepare needs --features-dir"),
    (T, "--ckpt={d}/empty_ckpt", 1, "missing {d}/empty_ckpt/imagebind_huge.pth"),
]


@pytest.mark.parametrize("tool, args, status, words", CASES, ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_bad_input(tool, args, status, words, bad, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = [a.format(d=bad, out=out) for a in args.split()]
    if tool == S:
        argv += ["--out", str(out)] if "--out" not in args else []
        main = sample.main
    else:
        argv += [f"--out-dir={out}", "--log-every=0"]
        main = train.main
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(bad))
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")
    code = 1 if isinstance(e.value.code, str) else e.value.code
    assert code == status, err
    assert words.format(d=bad, out=out) in err and "Traceback" not in err, err
    message = [line for line in err.strip().splitlines() if not line.startswith("usage:")]
    assert len(message) == 1, err  # one line (argparse adds its short usage line above it)
    assert not out.exists() and sorted(os.listdir(bad)) == before and os.listdir(tmp_path) == []


def test_a_request_larger_than_the_memory_is_refused_before_the_decoder_allocates(monkeypatch, tmp_path, capsys):
    """The decoder's measured estimate against the memory free: refused in one line, nothing written."""
    import decoders

    monkeypatch.setattr(decoders, "free_memory", lambda device: 10 * 2**20)  # 10 MiB free
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "Draw a red circle.", "--height", "2048", "--width", "2048", "--out",
                     str(tmp_path / "out")])
    assert "the image decoder at 2048 x 2048 needs about" in str(e.value.code) and "GiB are free" in str(e.value.code)
    assert not (tmp_path / "out").exists()


def test_the_memory_estimate_matches_what_was_measured():
    """SD 1.5's layout in float32: ~1.4 GiB at 512 x 512 (measured 0.98 + 0.42), four times that at 1,024."""
    import decoders
    import nextgpt

    model = nextgpt.tiny_random(0)
    d = model.decoder("image")
    d.unet.cfg.block_out_channels, d.vae.cfg.block_out_channels = (320, 640, 1280, 1280), (128, 256, 512, 512)
    assert 1.2 < d.memory_needed(height=512, width=512) / 2**30 < 1.6
    assert d.memory_needed(height=1024, width=1024) == 4 * d.memory_needed(height=512, width=512)
    assert decoders.free_memory("cpu") is None or decoders.free_memory("cpu") > 0
