"""Vicuna v0 as people have it (FastChat v0.1.10's 32,001 rows, the 2023 config quirks, fp16 .bin shards) under the
official-format NExT-GPT delta, through nextgpt.NextGPT; real mismatches refused naming the file; vicuna.apply_delta
against FastChat v0.1.10's procedure restated with transformers. All at tiny size, offline."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_nextgpt import official_delta_shapes

import bpe
import llm
import nextgpt
import vicuna
import weights
from encoder import ImageBind

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = llm.LLaMAConfig.preset("tiny")  # 256 token rows: conftest's tiny_sp_model has 256 pieces
# config.json as LLaMA-1's conversion and FastChat v0.1.10 (transformers 4.28.0.dev0) wrote it: no
# max_position_embeddings, bos 0 / eos 1 / pad -1 where tokenizer.model says 1 / 2, fp16
QUIRKS = {"architectures": ["LLaMAForCausalLM"], "model_type": "llama", "bos_token_id": 0, "eos_token_id": 1,
          "pad_token_id": -1, "hidden_act": "silu", "initializer_range": 0.02, "max_sequence_length": 2048,
          "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float16",
          "transformers_version": "4.28.0.dev0", "use_cache": True}


def hf_config(cfg, rows, quirks=True):
    c = {"hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
         "num_attention_heads": cfg.n_heads, "vocab_size": rows}
    return {**QUIRKS, **c} if quirks else {**c, "model_type": "llama", "max_position_embeddings": 2048,
                                           "bos_token_id": 1, "eos_token_id": 2}


def random_llama(cfg, rows, seed=0):
    """An fp16-exact random state dict in HF names (norms random too, so a misplaced one shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in llm.LLaMA(cfg).state_dict().items()}
    sd = {k: (1 + 0.1 * torch.randn(s, generator=g)) if "norm" in k else 0.05 * torch.randn(s, generator=g)
          for k, s in shapes.items()}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):  # rows past the tokenizer: FastChat's [PAD]
        sd[k] = torch.cat([sd[k], 0.05 * torch.randn(rows - cfg.vocab_size, cfg.dim, generator=g)])
    return {k: v.half() for k, v in sd.items()}


def write_bin_shards(folder, sd, shards=2, inv_freq=None):
    """pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json as transformers 4.28's save_pretrained wrote
    them, with the per-layer rotary_emb.inv_freq buffers it saved (inv_freq: their values, e.g. zeros in a delta)."""
    os.makedirs(folder, exist_ok=True)
    names = list(sd)
    if inv_freq is not None:
        for i in range(sum(k.endswith("input_layernorm.weight") for k in names)):
            sd = {**sd, f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq}
        names = list(sd)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: sd[n] for n in names[k * per:(k + 1) * per]}, os.path.join(folder, file))
        weight_map.update(dict.fromkeys(names[k * per:(k + 1) * per], file))
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def inv_freq(cfg):
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))


def vicuna_folder(folder, sd, sp_model, form, config):
    """A Vicuna folder in one of the forms people have: 'safetensors' (LLaMA.save_pretrained's), 'bin' (FastChat
    v0.1.10 + transformers 4.28: two fp16 .bin shards, index, inv_freq buffers, delta tokenizer files), 'bin+added'
    (the same with an added_tokens.json {"[PAD]": 32000} and [PAD] as the pad token)."""
    os.makedirs(folder, exist_ok=True)
    if form == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, os.path.join(folder, "model.safetensors"))
    else:
        write_bin_shards(folder, sd, inv_freq=inv_freq(TINY))
        write_json(os.path.join(folder, "tokenizer_config.json"), {"tokenizer_class": "LlamaTokenizer"})
        special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        if form == "bin+added":
            special["pad_token"] = "[PAD]"
            write_json(os.path.join(folder, "added_tokens.json"), {"[PAD]": TINY.vocab_size})
        write_json(os.path.join(folder, "special_tokens_map.json"), special)
    write_json(os.path.join(folder, "config.json"), config)
    with open(sp_model, "rb") as src, open(os.path.join(folder, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())
    return folder


@pytest.fixture(scope="module")
def official(tmp_path_factory, tiny_sp_model):
    """A NExT-GPT checkpoint folder with the official file names at tiny size: imagebind_huge.pth,
    nextgpt_7b_tiva_v0/pytorch_model.pt (fp16, the official key names), and a nextgpt.json naming the tiny config;
    the Vicuna folder is put in by each test. Plus the reference: the same weights put together by hand."""
    root = tmp_path_factory.mktemp("official")
    config = nextgpt.NextGPTConfig.preset("tiny")
    torch.manual_seed(0)
    torch.save(ImageBind(config.imagebind, modalities=("vision", "audio")).state_dict(), root / "imagebind_huge.pth")
    g = torch.Generator().manual_seed(1)
    delta = {k: (0.05 * torch.randn(v.shape, generator=g)).half() for k, v in official_delta_shapes(config).items()}
    (root / "nextgpt_7b_tiva_v0").mkdir()
    torch.save(delta, root / "nextgpt_7b_tiva_v0" / "pytorch_model.pt")
    base = random_llama(TINY, TINY.vocab_size)
    lm = llm.LLaMA(TINY)
    lm.load_state_dict({k: v.float() for k, v in base.items()})
    ref = nextgpt.NextGPT(config, lm, bpe.LLaMATokenizer(tiny_sp_model, config.added_tokens)).load_delta(delta).eval()
    return root, config, base, delta, ref


def load(root, config, vicuna_dir):
    """NextGPT.from_pretrained on the official layout (nextgpt.json only names the tiny config and the files)."""
    files = {"imagebind": "imagebind_huge.pth", "vicuna": os.path.relpath(vicuna_dir, root),
             "delta": "nextgpt_7b_tiva_v0/pytorch_model.pt"}
    write_json(os.path.join(root, "nextgpt.json"), {"config": config.to_dict(), "files": files})
    return nextgpt.NextGPT.from_pretrained(str(root), decoders=())


@pytest.mark.parametrize("rows, form, quirks", [
    (256, "safetensors", False),  # a base LLM (32,000 rows), clean config
    (257, "bin", True),  # FastChat v0.1.10's Vicuna v0 as most people have it: 32,001 rows, no added_tokens.json
    (257, "bin+added", True),  # the same with added_tokens.json {"[PAD]": 32000}
    (257, "safetensors", True),  # as vicuna.apply_delta writes it
])
def test_vicuna_v0_as_people_have_it_loads_under_the_official_delta(official, tiny_sp_model, tmp_path, rows, form,
                                                                     quirks):
    root, config, base, delta, ref = official
    sd = dict(base)
    if rows > TINY.vocab_size:  # the [PAD] row: the delta's <Img> row replaces it
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[k] = torch.cat([sd[k], torch.full((1, TINY.dim), 7.0, dtype=torch.float16)])
    vicuna_dir = vicuna_folder(str(root / f"vicuna-{rows}-{form}-{quirks}"), sd, tiny_sp_model, form,
                               hf_config(TINY, rows, quirks))
    model = load(root, config, vicuna_dir)
    # the tokenizer's ids win over config.json's bos 0 / eos 1; added_tokens.json is not read: <Img> is 256
    assert (model.tokenizer.bos_id, model.tokenizer.eos_id, len(model.tokenizer)) == (1, 2, 294)
    assert model.token_id("<Img>") == 256 and model.llm.lm_head.weight.shape == (294, 64)
    for ours, official_name in (("model.embed_tokens.weight", "llama_model.base_model.model.model.embed_tokens.weight"),
                                ("lm_head.weight", "llama_model.base_model.model.lm_head.weight")):
        assert torch.equal(model.llm.state_dict()[ours], delta[official_name].float())
    assert torch.equal(model.llm.model.layers[1].mlp.up_proj.weight, base["model.layers.1.mlp.up_proj.weight"].float())
    emb = model.prompt_embeds([("describe this", None)])
    assert torch.equal(emb, ref.prompt_embeds([("describe this", None)]))
    with torch.no_grad():
        assert torch.equal(model.llm(embeds=emb), ref.llm(embeds=emb))


def test_a_base_of_another_size_is_refused_naming_its_config_json(official, tiny_sp_model, tmp_path):
    root, config, *_ = official
    big = llm.LLaMAConfig(dim=96, n_layers=3, n_heads=4, n_kv_heads=4, vocab_size=256, hidden_dim=256)  # "13B"
    vicuna_dir = vicuna_folder(str(root / "vicuna-13b"), random_llama(big, 257), tiny_sp_model, "bin",
                               hf_config(big, 257))
    with pytest.raises(ValueError, match=r"config\.json"):
        load(root, config, vicuna_dir)
    # LLaMA.from_pretrained(expect=...) refuses before any weights are read (none needed to say so)
    os.makedirs(tmp_path / "only-config")
    write_json(str(tmp_path / "only-config" / "config.json"), hf_config(big, 257))
    with pytest.raises(ValueError, match=r"only-config/config\.json describes a LLaMA of \{'dim': 96"):
        llm.LLaMA.from_pretrained(str(tmp_path / "only-config"), expect=TINY)
    assert llm.LLaMA.from_pretrained(str(root / "vicuna-13b"), expect=big).config.vocab_size == 257


def test_a_tokenizer_that_does_not_fit_is_refused_naming_tokenizer_model(official, tmp_path):
    root, config, base, *_ = official
    other = bpe.train_sentencepiece(nextgpt.TINY_CORPUS, 120, str(tmp_path / "other"))  # another piece count
    assert bpe.LLaMATokenizer(other).sp.get_piece_size() != 256
    vicuna_dir = vicuna_folder(str(root / "vicuna-other-tokenizer"), base, other, "bin", hf_config(TINY, 256))
    with pytest.raises(ValueError, match=r"tokenizer\.model"):
        load(root, config, vicuna_dir)


def test_config_quirks_are_read_and_the_ids_ignored():
    """max_sequence_length stands for max_position_embeddings; bos / eos / pad ids of config.json change nothing."""
    quirky, clean = (llm.LLaMAConfig.from_hf(hf_config(TINY, 257, q)) for q in (True, False))
    assert quirky == clean and (quirky.max_seq_len, quirky.vocab_size, quirky.dim) == (2048, 257, 64)


# ----------------------------------------------------------------------------------------------------------------------
# apply-delta

def llama1_base(folder, sp_model, seed=2, form="bin"):
    """LLaMA-1 7B in HF format as its 2023 conversion left it, at tiny size: fp16 .bin shards with inv_freq buffers
    (or one model.safetensors, as a newer copy has it), the quirky config.json, tokenizer.model and an empty
    special_tokens_map.json (no pad token)."""
    if form == "bin":
        write_bin_shards(folder, random_llama(TINY, 256, seed), inv_freq=inv_freq(TINY))
    else:
        from safetensors.torch import save_file
        os.makedirs(folder)
        save_file(random_llama(TINY, 256, seed), os.path.join(folder, "model.safetensors"))
    write_json(os.path.join(folder, "config.json"), hf_config(TINY, 256))
    write_json(os.path.join(folder, "special_tokens_map.json"), {})
    with open(sp_model, "rb") as src, open(os.path.join(folder, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())
    return folder


def vicuna_delta(folder, sp_model, rows=257, cfg=TINY, added=False, seed=3):
    """lmsys/vicuna-7b-delta-v0 at tiny size: 32,001 rows (target - base: small values), fp16 .bin shards whose
    inv_freq buffers are zero (make_delta subtracted them too), the delta's tokenizer files."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: (0.01 * torch.randn(v.shape, generator=g)).half() for k, v in random_llama(cfg, rows, seed).items()}
    write_bin_shards(folder, sd, inv_freq=torch.zeros(cfg.head_dim // 2))
    write_json(os.path.join(folder, "config.json"), hf_config(cfg, rows))
    write_json(os.path.join(folder, "tokenizer_config.json"), {"tokenizer_class": "LlamaTokenizer",
                                                               "add_bos_token": True, "add_eos_token": False})
    write_json(os.path.join(folder, "special_tokens_map.json"),
               {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **({"pad_token": "[PAD]"} if added
                                                                                  else {})})
    if added:
        write_json(os.path.join(folder, "added_tokens.json"), {"[PAD]": 256})
    with open(sp_model, "rb") as src, open(os.path.join(folder, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())
    return folder


def fastchat_v0_1_10(base_path, delta_path):
    """fastchat/model/apply_delta.py at tag v0.1.10, with transformers (dtype= is 5.x's torch_dtype=; the tokenizer
    is the one transformers has now: what matters here is its length)."""
    transformers = pytest.importorskip("transformers")
    base = transformers.LlamaForCausalLM.from_pretrained(base_path, dtype=torch.float16)
    delta = transformers.LlamaForCausalLM.from_pretrained(delta_path, dtype=torch.float16)
    base_tokenizer = transformers.LlamaTokenizer.from_pretrained(base_path)
    num_new_tokens = base_tokenizer.add_special_tokens(dict(pad_token="[PAD]"))
    base.resize_token_embeddings(len(base_tokenizer), mean_resizing=False)
    base.get_input_embeddings().weight.data[-num_new_tokens:] = 0
    base.get_output_embeddings().weight.data[-num_new_tokens:] = 0
    for name, param in base.state_dict().items():
        assert name in delta.state_dict()
        param.data += delta.state_dict()[name]
    return base.state_dict()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("added, base_form", [(False, "bin"), (True, "bin"), (False, "safetensors")])
def test_apply_delta_equals_fastchat_v0_1_10(tmp_path, tiny_sp_model, added, base_form):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")  # transformers reads tokenizer.model through it
    base = llama1_base(str(tmp_path / "llama-7b"), tiny_sp_model, form=base_form)
    delta = vicuna_delta(str(tmp_path / "vicuna-7b-delta-v0"), tiny_sp_model, added=added)
    out = vicuna.apply_delta(base, delta, str(tmp_path / "vicuna-7b-v0"), log=lambda *a: None)
    files = sorted(os.listdir(out))
    assert files == sorted(["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                            "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.model",
                            "tokenizer_config.json"] + (["added_tokens.json"] if added else []))
    ours = weights.load_folder(out)
    want = fastchat_v0_1_10(base, delta)
    assert sorted(ours) == sorted(want)  # every tensor, no inv_freq
    for name in want:
        assert ours[name].dtype == torch.float16 and torch.equal(ours[name], want[name]), name
    d = weights.load_folder(delta)
    assert torch.equal(ours["lm_head.weight"][256], d["lm_head.weight"][256])  # the [PAD] row: 0 + delta
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["vocab_size"], config["torch_dtype"], config["bos_token_id"]) == (257, "float16", 0)
    if added:
        assert json.load(open(os.path.join(out, "added_tokens.json"))) == {"[PAD]": 256}
    # both readers take it, with the same logits
    mine = llm.LLaMA.from_pretrained(out)
    theirs = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 257, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (mine(ids) - theirs(ids).logits).abs().max() <= 1e-4
    tok_out, tok_delta = (transformers.LlamaTokenizer.from_pretrained(p) for p in (out, delta))
    assert len(tok_out) == len(tok_delta) and tok_out("a red circle")["input_ids"] == \
        tok_delta("a red circle")["input_ids"]


def drop_from_index(folder, name):
    path = os.path.join(folder, "pytorch_model.bin.index.json")
    index = json.load(open(path))
    del index["weight_map"][name]
    write_json(path, index)


@pytest.mark.parametrize("edit, named", [
    (lambda delta, sp: vicuna_delta(delta, sp, rows=256), r"vicuna-7b-delta-v0/config\.json has vocab_size 256"),
    (lambda delta, sp: vicuna_delta(delta, sp, cfg=llm.LLaMAConfig(dim=96, n_layers=2, n_heads=4, n_kv_heads=4,
                                                                   vocab_size=256, hidden_dim=172)),
     r"vicuna-7b-delta-v0/config\.json describes a LLaMA of \{'dim': 96"),
    (lambda delta, sp: (vicuna_delta(delta, sp), os.remove(os.path.join(delta, "tokenizer.model"))),
     r"vicuna-7b-delta-v0/tokenizer\.model not found"),
    (lambda delta, sp: (vicuna_delta(delta, sp), drop_from_index(delta, "model.norm.weight")),
     r"in the base, not in the delta \(1\):\n\s+model\.norm\.weight"),
])
def test_apply_delta_refuses_what_does_not_fit(tmp_path, tiny_sp_model, edit, named):
    base = llama1_base(str(tmp_path / "llama-7b"), tiny_sp_model)
    delta = str(tmp_path / "vicuna-7b-delta-v0")
    edit(delta, tiny_sp_model)
    with pytest.raises((ValueError, FileNotFoundError), match=named):
        vicuna.apply_delta(base, delta, str(tmp_path / "out"), log=lambda *a: None)
    assert not os.path.exists(tmp_path / "out")


def test_apply_delta_command_line(tmp_path, tiny_sp_model, capsys):
    """--help runs nothing; a bad path is a one-line error (exit 2), a file that does not fit too (exit 1)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "llm.py"), "apply-delta", "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and all(o in r.stdout for o in ("--base", "--delta", "--out", "FastChat")), r.stderr
    assert not os.listdir(tmp_path), "--help wrote files"
    with pytest.raises(SystemExit) as e:
        vicuna.main(["--help"])
    assert e.value.code == 0 and "apply-delta" in capsys.readouterr().out
    base = llama1_base(str(tmp_path / "llama"), tiny_sp_model)
    delta = vicuna_delta(str(tmp_path / "delta"), tiny_sp_model, rows=256)  # a v1.1-style delta: refused
    out = str(tmp_path / "vicuna")
    for args, code, said in ((["--base", "nowhere", "--delta", delta, "--out", out], 2, "--base nowhere: no such"),
                             (["--base", base, "--delta", delta, "--out", base], 2, "exists and is not an empty"),
                             (["--base", base, "--delta", delta], 2, "required: --out"),
                             (["--base", base, "--delta", delta, "--out", out], 1, "has vocab_size 256")):
        with pytest.raises(SystemExit) as e:
            vicuna.main(["apply-delta", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == code and said in err[-1] and len(err) <= 2, err  # (the usage line and) the reason
    assert not os.path.exists(out)
    vicuna_delta(delta, tiny_sp_model)  # the 257-row delta: it works
    vicuna.main(["apply-delta", "--base", base, "--delta", delta, "--out", out])
    assert llm.LLaMA.from_pretrained(out).config.vocab_size == 257
