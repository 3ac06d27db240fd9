"""train.py on the tiny random model and a small synthetic data set in the official formats."""

import json
import math
import os
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import nextgpt
import train

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def write_wav(path, freq, seconds=0.3, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    x = (0.5 * np.sin(2 * math.pi * freq * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr), w.writeframes(x.tobytes())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """cc3m / webvid / audiocap / T2X files with media, plus broken records."""
    d = tmp_path_factory.mktemp("data")
    cc3m, webvid, audiocap, t2x = [], [], [], []
    for k, (name, rgb) in enumerate(COLORS.items()):
        img = Image.new("RGB", (32, 32), (0, 0, 0))
        img.paste(rgb, (8, 8, 24, 24))
        img.save(d / f"{name}.png")
        frames = [Image.new("RGB", (32, 32), (0, 0, 0)) for _ in range(4)]
        for i, f in enumerate(frames):
            f.paste(rgb, (4 + 4 * i, 12, 12 + 4 * i, 20))
        frames[0].save(d / f"{name}.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
        write_wav(d / f"{name}.wav", 300 + 300 * k)
        cc3m.append({"image_name": f"{name}.png", "caption": f"a {name} square"})
        webvid.append({"video_name": f"{name}.gif", "caption": f"a {name} square moving right"})
        audiocap.append({"audio_name": f"{name}.wav", "caption": f"a {name} beep"})
        t2x.append({"mm_name": f"{name}.png", "conversation": [
            {"from": "human", "value": f"draw a {name} square", "input_modality": "text"},
            {"from": "gpt", "value": "here it is", "caption": f"a {name} square", "output_modality": "image"}]})
    broken = cc3m + [{"image_name": "missing.png", "caption": "x"}, {"image_name": "red.png", "caption": " "},
                     {"caption": "no media key"}]
    for name, records in (("cc3m", cc3m), ("webvid", webvid), ("audiocap", audiocap), ("t2x", t2x),
                          ("broken", broken)):
        (d / f"{name}.json").write_text(json.dumps(records))
    return d


def run(cfg_args, data_files, model=None):
    cfg, _ = train.parse_args(cfg_args + ["--tiny_random=true", "--log_every=0"])
    cfg.data = ",".join(str(f) for f in data_files)
    model = model or nextgpt.tiny_random(cfg.seed)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    lines = []
    trained = train.train(cfg, model=model, log=lines.append)
    log = [json.loads(line) for line in open(os.path.join(cfg.out_dir, "log.jsonl"))]
    return trained, initial, log, lines


@torch.no_grad()
def eval_losses(model, cfg_args, data_files):
    """The mean losses over every example of the files, with the model as it is (fixed data: no batch noise)."""
    cfg, _ = train.parse_args(cfg_args)
    examples = [e for f in data_files for e in train.read_data(str(f), cfg, model.config)[0]]
    torch.manual_seed(0)  # the denoising loss draws noise
    parts = train.compute_losses(model, examples, cfg, {})
    return {k: float(s) / max(n, 1) for k, (s, n) in parts.items()}


def changed(model, initial):
    return {k for k, v in model.state_dict().items() if k in initial and not torch.equal(v, initial[k])}


def test_stage1_trains_only_the_input_projection(data, tmp_path):
    files = [data / "cc3m.json", data / "webvid.json", data / "audiocap.json"]
    before = eval_losses(nextgpt.tiny_random(0), ["--stage=1"], files)
    model, initial, log, _ = run(["--stage=1", "--max_steps=25", "--lr=3e-2", "--warmup=0", "--batch_size=4",
                                  f"--out_dir={tmp_path}"], files)
    after = eval_losses(model, ["--stage=1"], files)
    # a random LLM stays frozen: only the input token and the new rows can move the caption NLL
    assert after["nll"] < before["nll"] - 0.1, (before, after)
    assert changed(model, initial) == {"input_proj.weight", "input_proj.bias", "llm.model.embed_tokens.weight",
                                       "llm.lm_head.weight"}
    base = model.config.llm.vocab_size  # the original rows of the vocabulary stay bit-identical
    for name in ("llm.model.embed_tokens.weight", "llm.lm_head.weight"):
        assert torch.equal(model.state_dict()[name][:base], initial[name][:base])
    # the saved checkpoint holds only NExT-GPT's own tensors, and loads back
    saved = load_file(str(tmp_path / open(tmp_path / "latest").read() / "nextgpt.safetensors"))
    assert set(saved) == set(model.trainable_state_dict())
    fresh = nextgpt.tiny_random(0).load_delta(saved)
    assert torch.equal(fresh.input_proj.weight, model.input_proj.weight)


def test_a_grouping_delta_carries_into_the_next_stage(data, tmp_path):
    """Stage 1 with --input_proj=group over a checkpoint whose config says linear, then stage 2 from its delta
    without --input_proj: the next stage builds the grouping and loads it (it once refused the delta)."""
    files = [data / "cc3m.json"]
    run(["--stage=1", "--max_steps=2", "--input_proj=group", f"--out_dir={tmp_path / 's1'}"], files,
        model=train.build_model(train.parse_args(["--tiny_random=true", "--input_proj=group"])[0]))
    delta = str(tmp_path / "s1" / open(tmp_path / "s1" / "latest").read() / "nextgpt.safetensors")
    cfg, _ = train.parse_args(["--stage=2", "--tiny_random=true", f"--delta={delta}"])
    model = train.build_model(cfg)
    assert model.config.input_proj == "group"
    assert torch.equal(model.input_proj.in_fc.weight, load_file(delta)["input_proj.in_fc.weight"])


def test_stage2_align_and_denoise(data, tmp_path):
    files = [data / "cc3m.json", data / "webvid.json", data / "audiocap.json"]
    args = ["--stage=2", "--denoise_weight=1.0"]
    before = eval_losses(nextgpt.tiny_random(0), args, files)
    model, initial, log, _ = run(args + ["--max_steps=20", "--lr=3e-3", "--warmup=0", "--batch_size=3",
                                         f"--out_dir={tmp_path}"], files)
    after = eval_losses(model, args, files)
    for name in ("nll", "align", "denoise"):
        assert after[name] < before[name], (name, before, after)
    # the LLM is frozen: of the NLL only the signal tokens' part can fall (through their rows)
    assert after["align"] < 0.8 * before["align"] and after["nll"] < before["nll"] - 0.3, (before, after)
    assert all(r["denoise"] > 0 for r in log)
    touched = changed(model, initial)
    assert touched and all(k.startswith("output_proj.") or k.startswith("llm.lm_head") or
                           k.startswith("llm.model.embed_tokens") for k in touched)
    assert any(k.startswith("output_proj.video") for k in touched) and any(k.startswith("output_proj.audio")
                                                                         for k in touched)


def test_denoising_loss_reaches_the_projector_not_the_unet(data):
    model = nextgpt.tiny_random(0)
    cfg, _ = train.parse_args(["--stage=2", "--denoise_weight=1", "--align_weight=0", "--nll_weight=0"])
    train.select_trainable(model, cfg)
    examples, _ = train.read_data(str(data / "cc3m.json"), cfg, model.config)
    parts = train.compute_losses(model, examples[:2], cfg, {})
    parts["denoise"][0].backward()
    proj = model.output_proj["image"]
    assert proj.fc.weight.grad is not None and proj.fc.weight.grad.abs().sum() > 0
    unet = model.decoder("image").unet
    assert all(p.grad is None and not p.requires_grad for p in unet.parameters())


def test_stage3_lora_and_projections(data, tmp_path):
    files = [data / "t2x.json", data / "cc3m.json"]
    before = eval_losses(nextgpt.tiny_random(0), ["--stage=3"], files)
    model, initial, log, _ = run(["--stage=3", "--max_steps=16", "--lr=1e-2", "--warmup=0", "--batch_size=2",
                                  f"--out_dir={tmp_path}"], files)
    after = eval_losses(model, ["--stage=3"], files)
    assert after["nll"] < 0.8 * before["nll"] and after["align"] < before["align"], (before, after)
    touched = changed(model, initial)
    lora_b = [v for k, v in model.trainable_state_dict().items() if ".lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: LoRA trained
    assert any(k.startswith("output_proj.image") for k in touched)
    assert not any(k.startswith("llm.model.layers.") and ".lora_" not in k for k in touched)  # base LLM frozen


def test_resume_continues_exactly(data, tmp_path):
    files = [data / "cc3m.json", data / "audiocap.json"]
    common = ["--stage=3", "--lr=1e-3", "--warmup=2", "--batch_size=2", "--max_steps=6"]
    straight, _, _, _ = run(common + [f"--out_dir={tmp_path / 'a'}"], files)
    # the same run, saving at steps 3 and 6; then as if it had died after step 3: resume from that save
    run(common + [f"--out_dir={tmp_path / 'b'}", "--save_every=3", "--keep=2"], files)
    import shutil
    shutil.rmtree(tmp_path / "b" / "step_0000006")
    (tmp_path / "b" / "latest").write_text("step_0000003")
    resumed, _, _, lines = run(common + [f"--out_dir={tmp_path / 'b'}", "--resume=true"], files)
    assert any("resumed" in line for line in lines)
    a, c = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], c[k]), k


def test_a_crash_in_a_save_or_a_damaged_save_loses_no_complete_checkpoint(data, tmp_path, monkeypatch):
    """A run that dies while writing step 4 leaves step 2 whole (and latest on it); a damaged newest checkpoint is
    named by --resume, which continues from the one before and deletes nothing."""
    files = [data / "cc3m.json"]
    common = ["--stage=1", "--lr=1e-3", "--warmup=0", "--batch_size=2", f"--out_dir={tmp_path}", "--save_every=2",
              "--keep=2"]
    run(common + ["--max_steps=2"], files)
    real_save = torch.save

    def dies_mid_save(obj, path, *a, **kw):  # the safetensors file is written; the process dies before the rest
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train.torch, "save", dies_mid_save)
    with pytest.raises(KeyboardInterrupt):
        run(common + ["--max_steps=4", "--resume"], files)
    monkeypatch.setattr(train.torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["latest", "log.jsonl", "step_0000002", "step_0000004.tmp"]
    assert (tmp_path / "latest").read_text() == "step_0000002"
    nextgpt.tiny_random(0).load_delta(str(tmp_path / "step_0000002" / "nextgpt.safetensors"))  # still loads
    run(common + ["--max_steps=4", "--resume"], files)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step_")) == ["step_0000002", "step_0000004"]
    state = tmp_path / "step_0000004" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # the newest save damaged after the fact
    _, _, _, lines = run(common + ["--max_steps=6", "--resume"], files)
    assert any("step_0000004 is damaged" in line for line in lines) and any("resumed from" in line and
                                                                            "step_0000002" in line for line in lines)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step_")) == ["step_0000004", "step_0000006"]


def test_broken_records_are_reported_and_skipped(data, tmp_path):
    cfg, _ = train.parse_args(["--stage=1"])
    examples, problems = train.read_data(str(data / "broken.json"), cfg, nextgpt.NextGPTConfig.preset("tiny"))
    assert len(examples) == 4 and len(problems) == 3
    assert any("broken.json:4" in p and "missing.png" in p for p in problems)
    assert any("broken.json:5" in p and "empty caption" in p for p in problems)
    assert any("broken.json:6" in p and "unknown record format" in p for p in problems)
    _, _, _, lines = run(["--stage=1", "--max_steps=2", f"--out_dir={tmp_path}"], [data / "broken.json"])
    assert any("skipped 3 bad records of 7" in line for line in lines)


def test_options_are_checked(tmp_path, capsys):
    """Unknown options, bad values and bad config files end with exit status 2 and a one-line reason."""
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"stage": 3, "lr": 1e-4}))
    bad_key, bad_type, not_object = tmp_path / "k.json", tmp_path / "t.json", tmp_path / "o.json"
    bad_key.write_text('{"learning_rate": 1}')
    bad_type.write_text('{"epochs": "many"}')
    not_object.write_text("[1, 2]")
    for argv, reason in ((["--learning_rate=1"], "unrecognized arguments: --learning-rate=1"),
                         (["--lr=fast"], "--lr takes a float, not 'fast'"),
                         (["--stage=4"], "--stage must be 1, 2 or 3"),
                         (["--resume=maybe"], "--resume takes true or false"),
                         ([f"--config={bad_key}"], "unknown option(s) learning_rate"),
                         ([f"--config={bad_type}"], "--epochs takes an int, not 'many'"),
                         ([f"--config={not_object}"], "must hold a JSON object"),
                         ([f"--config={tmp_path / 'none.json'}"], "No such file")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and reason in err and "Traceback" not in err, (argv, err)
    cfg, _ = train.parse_args(["--stage=3"])
    assert cfg.lr == 5e-4 and cfg.lora and cfg.video_align_weight == 2.0  # the official stage-3 settings
    cfg, _ = train.parse_args([f"--config={good}", "--lr", "2e-4", "--tiny-random", "--max_steps=3"])
    assert (cfg.stage, cfg.lr, cfg.lora, cfg.tiny_random, cfg.max_steps) == (3, 2e-4, True, True, 3)  # file, then flags


def test_torchrun_two_processes_equal_one_on_the_combined_batch(data, tmp_path):
    files = f"--data={data / 'cc3m.json'},{data / 'audiocap.json'}"
    common = [files, "--stage=1", "--tiny_random=true", "--max_steps=2", "--lr=1e-2", "--warmup=0", "--log_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    os.path.join(HERE, "train.py"), *common, "--batch_size=1", f"--out_dir={tmp_path / 'ddp'}"],
                   check=True, cwd=HERE, env=env, capture_output=True)
    subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *common, "--batch_size=2",
                    f"--out_dir={tmp_path / 'one'}"], check=True, cwd=HERE, env=env, capture_output=True)
    a = load_file(str(tmp_path / "ddp" / "step_0000002" / "nextgpt.safetensors"))
    b = load_file(str(tmp_path / "one" / "step_0000002" / "nextgpt.safetensors"))
    moved = 0
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5, k
    init = nextgpt.tiny_random(0).trainable_state_dict()
    moved = sum(not torch.equal(a[k], init[k]) for k in a)
    assert moved >= 2  # the run did train


def test_prepare_caches_features_and_training_reads_them(data, tmp_path):
    feats = tmp_path / "features"
    cfg, _ = train.parse_args(["--stage=2", f"--features_dir={feats}"])
    model = nextgpt.tiny_random(0)
    examples, _ = train.read_data(str(data / "audiocap.json"), cfg, model.config)
    cfg1, _ = train.parse_args(["--stage=1", f"--features_dir={feats}"])
    examples1, _ = train.read_data(str(data / "cc3m.json"), cfg1, model.config)
    train.prepare(model, examples + examples1, cfg)
    assert len(list((feats / "imagebind_linear").glob("*.npy"))) == 4  # one per input image
    cached = list((feats / "captions_audio").glob("*.npy"))
    assert len(cached) == 4 and np.load(cached[0]).shape == (1, 16)  # the CLAP width of the tiny decoder
    # what training reads back equals what the frozen backbones compute
    ex = examples1[0]
    live = train.input_features(model, "image", ex.inputs[0][1], train.TrainConfig())
    assert torch.allclose(train.input_features(model, "image", ex.inputs[0][1], cfg), live, atol=1e-6)
    m, caption, media, emb = examples[0].outputs[0]
    want = model.decoder("audio").embed_text([caption])[0].reshape(1, 16)
    assert torch.allclose(train.caption_target(model, m, caption, emb, {}), want, atol=1e-3)  # stored as fp16


def test_config_file_and_gradient_checkpointing(data, tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"lr": 0.01, "batch_size": 3}))
    cfg, _ = train.parse_args(["--stage=3", f"--config={tmp_path / 'c.json'}", "--batch_size=2"])
    assert cfg.lr == 0.01 and cfg.batch_size == 2 and cfg.lora  # preset < file < command line
    grads = []
    for ckpt in (False, True):
        model = nextgpt.tiny_random(0)
        train.select_trainable(model, cfg)
        model.train()
        model.llm.gradient_checkpointing = ckpt
        for mod in model.llm.modules():  # no dropout, so the two runs see the same function
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        examples, _ = train.read_data(str(data / "t2x.json"), cfg, model.config)
        parts = train.compute_losses(model, examples[:2], cfg, {})
        (parts["nll"][0] + parts["align"][0]).backward()
        grads.append(model.output_proj["image"].fc.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
