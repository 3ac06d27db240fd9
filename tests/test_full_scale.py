"""bench.py --full-scale, the whole dry run at tiny size: every stage runs and is printed, and what it writes has the
official layouts and formats (the same code writes the official sizes)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("diffusers")
pytest.importorskip("google.protobuf")  # sentencepiece's model protobuf, for tokenizer.model


def test_the_dry_run_at_tiny_size_prints_every_stage(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--full-scale", str(tmp_path / "dry"),
                        "--scale", "tiny", "--steps", "1", "--threads", "2"], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-3000:]
    stages = ["write vicuna-7b-v0", "write imagebind_huge.pth", "write nextgpt_7b_tiva_v0/pytorch_model.pt",
              "write stable-diffusion-v1-5", "write zeroscope_v2_576w", "write audioldm-l-full",
              "NextGPT.from_pretrained, bfloat16", "generate: image+audio+video in, all out",
              "train.py stage 1, one step", "train.py stage 2, one step", "train.py stage 3, one step",
              "decode 16 tokens, bfloat16", "decode 16 tokens, int8 (llm.quantize_int8 first)"]
    lines = r.stdout.splitlines()
    for stage in stages:
        row = next((ln for ln in lines if ln.startswith(stage)), None)
        assert row is not None and " s  peak " in row and "GiB" in row, (stage, r.stdout)
        assert f"| {stage}" in r.stdout  # and in the table for the README
    gen = next(ln for ln in lines if ln.startswith("generate"))
    assert "'image': (3, 32, 32), 'video': (2, 3, 32, 32), 'audio': (3200,)" in gen
    assert "denoise" in next(ln for ln in lines if ln.startswith("train.py stage 2"))
    for kind in ("bfloat16", "int8"):
        assert "tokens/s" in next(ln for ln in lines if ln.startswith(f"decode 16 tokens, {kind}"))

    dry = tmp_path / "dry"
    # Vicuna v0 as FastChat v0.1.10 left it: two fp16 .bin shards + index, inv_freq buffers, the 2023 config
    vicuna = dry / "vicuna-7b-v0"
    index = json.load(open(vicuna / "pytorch_model.bin.index.json"))["weight_map"]
    assert sorted(set(index.values())) == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert "model.layers.1.self_attn.rotary_emb.inv_freq" in index
    sd = weights.load_folder(str(vicuna))
    assert sd["model.embed_tokens.weight"].shape == (257, 64) and sd["lm_head.weight"].dtype == torch.float16
    config = json.load(open(vicuna / "config.json"))
    assert (config["vocab_size"], config["pad_token_id"], config["bos_token_id"]) == (257, -1, 0)
    assert "max_position_embeddings" not in config and not (vicuna / "added_tokens.json").exists()
    import sentencepiece as spm
    assert spm.SentencePieceProcessor(model_file=str(vicuna / "tokenizer.model")).get_piece_size() == 256
    delta = torch.load(dry / "nextgpt_7b_tiva_v0" / "pytorch_model.pt", weights_only=True)
    assert delta["llama_model.base_model.model.lm_head.weight"].shape == (294, 64)
    assert "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in delta
    assert all(t.dtype == torch.float16 for t in delta.values())
    assert "modality_trunks.vision.blocks.0.attn.in_proj_weight" in torch.load(dry / "imagebind_huge.pth",
                                                                                weights_only=True)
    for folder, parts in (("stable-diffusion-v1-5", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]),
                          ("zeroscope_v2_576w", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]),
                          ("audioldm-l-full", ["unet", "vae", "text_encoder", "tokenizer", "scheduler", "vocoder"])):
        assert sorted(os.listdir(dry / folder)) == sorted(parts + ["model_index.json"]), folder
    assert not any(name.startswith("dry_run_train") for name in os.listdir(dry))  # training checkpoints removed


def test_tokenizer_model_of_32000_pieces_in_seconds(tmp_path):
    import time

    import sentencepiece as spm
    t0 = time.perf_counter()
    path = bench.sentencepiece_model(32000, str(tmp_path / "tokenizer.model"))
    assert time.perf_counter() - t0 < 30
    sp = spm.SentencePieceProcessor(model_file=path)
    assert (sp.get_piece_size(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (32000, 0, 1, 2)
    assert sp.decode(sp.encode("### Human: describe this image")) == "### Human: describe this image"


def test_dry_run_options_are_checked(capsys, tmp_path):
    (tmp_path / "dry_run.json").write_text('{"scale": "tiny"}')  # a folder of one scale takes no other
    for args, said in ((["--scale", "huge", "--full-scale", "x"], "--scale must be official or tiny"),
                       (["--full-scale", str(tmp_path)], "holds a dry run at tiny size, not official"),
                       (["--steps", "2"], "give --full-scale DIR too"),
                       (["--full-scale", "x", "--dtype", "int8"], "--dtype takes bfloat16"),
                       (["--full-scale", "x", "--decode", "-1"], "--decode -1 is too small")):
        with pytest.raises(SystemExit) as e:
            bench.main(args)
        assert e.value.code == 2 and said in capsys.readouterr().err.strip().splitlines()[-1]
    assert not os.path.exists("x")
