"""llm.py against transformers' LlamaForCausalLM and peft, on tiny random weights written in the official HF format."""

import os

import pytest
import torch

import bpe
import llm
import weights

transformers = pytest.importorskip("transformers")


def hf_tiny(n_kv_heads=4, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=n_kv_heads, vocab_size=256, max_position_embeddings=128,
                                   rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms too, so that a norm read from the wrong place would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def save_hf(model, folder, **kw):
    model.save_pretrained(folder, **kw)
    return folder


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    ref = hf_tiny()
    folder = save_hf(ref, str(tmp_path_factory.mktemp("llama")))
    return ref, llm.LLaMA.from_pretrained(folder)


def test_config_presets_and_hf_reader(tmp_path):
    c = llm.LLaMAConfig.preset("vicuna-7b")
    assert (c.dim, c.n_layers, c.n_heads, c.vocab_size, c.hidden_dim, c.norm_eps, c.rope_theta, c.max_seq_len) == \
        (4096, 32, 32, 32000, 11008, 1e-6, 10000.0, 2048)
    with pytest.raises(ValueError, match="unknown LLaMA preset"):
        llm.LLaMAConfig.preset("vicuna-13b-typo")
    folder = save_hf(hf_tiny(n_kv_heads=2), str(tmp_path))
    c = llm.LLaMAConfig.from_hf(os.path.join(folder, "config.json"))
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size) == (64, 2, 4, 2, 172, 256)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("form", ["single", "sharded", "bin"])
def test_logits_parity(tmp_path, n_kv_heads, form):
    ref = hf_tiny(n_kv_heads)
    if form == "single":
        save_hf(ref, tmp_path)
    elif form == "sharded":
        save_hf(ref, tmp_path, max_shard_size="100KB")
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    else:  # the older pytorch_model.bin form, as torch.save writes it
        ref.config.save_pretrained(tmp_path)
        torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    ours = llm.LLaMA.from_pretrained(str(tmp_path))
    assert not weights.still_on_meta(ours)
    ids = torch.randint(0, 256, (2, 37))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
        _, hidden = ours(ids, return_hidden=True)
        want_hidden = ref(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm in HF
    assert got.shape == (2, 37, 256)
    assert (got - want).abs().max() <= 1e-4
    assert (hidden - want_hidden).abs().max() <= 1e-4


def test_embeds_input_equals_ids(hf_and_ours):
    _, ours = hf_and_ours
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        a = ours(ids)
        b = ours(embeds=ours.model.embed_tokens(ids))
    assert torch.equal(a, b)


def test_cache_equals_uncached(hf_and_ours):
    _, ours = hf_and_ours
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(batch=2, max_len=32)
        pre = ours(ids[:, :8], cache=cache, start_pos=0)  # prefill
        chunk = ours(ids[:, 8:14], cache=cache, start_pos=8)  # a chunk after cached tokens (explicit mask)
        steps = [ours(ids[:, t:t + 1], cache=cache, start_pos=t) for t in range(14, 20)]  # one token at a time
    got = torch.cat([pre, chunk] + steps, dim=1)
    assert (got - full).abs().max() <= 1e-5


def test_greedy_generation_matches_hf_and_uncached(hf_and_ours):
    ref, ours = hf_and_ours
    ids = torch.randint(3, 256, (1, 9))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20, eos_token_id=None,
                            pad_token_id=0)[0, 9:].tolist()
    got = ours.generate(ids, max_new_tokens=20)
    assert got == want
    # and our own uncached forward, one argmax at a time
    seq = ids
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, ours(seq)[:, -1:].argmax(-1)], dim=1)
    assert seq[0, 9:].tolist() == got


def test_stream_stops_and_yields_hidden(hf_and_ours):
    _, ours = hf_and_ours
    ids = torch.randint(3, 256, (1, 6))
    greedy = ours.generate(ids, max_new_tokens=10)
    stop = greedy[4]
    out = list(ours.stream(ids, max_new_tokens=10, stop_ids=(stop,)))
    assert [t for t, _ in out] == greedy[:greedy.index(stop) + 1]  # the stop token ends the stream, included
    # the hidden state yielded with token k is the one at the position whose logits chose it
    seq = torch.cat([ids, torch.tensor([[t for t, _ in out]])], dim=1)
    with torch.no_grad():
        _, h = ours(seq, return_hidden=True)
    for k, (_, hk) in enumerate(out):
        assert (hk - h[0, 5 + k]).abs().max() <= 1e-5


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([5.0, 4.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    # top_p 0.5: token 0 alone holds more than half the mass, so nothing else may ever come out
    assert {llm.sample(logits, 1.0, 0.5, g) for _ in range(50)} == {0}
    draws = {llm.sample(logits, 1.0, 0.99, g) for _ in range(200)}
    assert draws >= {0, 1} and 3 not in draws  # token 3 is outside the 0.99 nucleus
    assert llm.sample(logits, 0.0) == 0


def test_lora_parity_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    ref = hf_tiny()
    folder = save_hf(ref, str(tmp_path / "base"))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    pm = peft.get_peft_model(ref, cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # peft starts B at zero; make the update visible
                p.copy_(torch.randn_like(p) * 0.1)
    peft_sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    assert any(k.startswith("base_model.model.") and ".default." in k for k in peft_sd)
    ids = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        want = pm(input_ids=ids).logits

    ours = llm.add_lora(llm.LLaMA.from_pretrained(folder), r=4, alpha=8)
    llm.load_lora(ours, peft_sd)
    with torch.no_grad():
        got = ours(ids)
    assert (got - want).abs().max() <= 1e-4
    # the official checkpoint's naming: llama_model. prefix, with and without .default
    official = {"llama_model." + k.replace(".default", ""): v for k, v in peft_sd.items()}
    ours2 = llm.load_lora(llm.add_lora(llm.LLaMA.from_pretrained(folder), r=4, alpha=8), official)
    with torch.no_grad():
        assert (ours2(ids) - want).abs().max() <= 1e-4
    # only LoRA trains; lora_state_dict round-trips
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert set(llm.lora_state_dict(ours)) == trainable
    # merged: same outputs, plain Linears, no LoRA left
    llm.merge_lora(ours)
    with torch.no_grad():
        assert (ours(ids) - want).abs().max() <= 1e-4
    assert not llm.lora_state_dict(ours)
    assert type(ours.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_lora_starts_as_identity_and_trains():
    torch.manual_seed(0)
    model = llm.LLaMA(llm.LLaMAConfig.preset("tiny"))
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        before = model(ids)
    llm.add_lora(model, r=2, alpha=4, dropout=0.1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # B = 0: the wrapped model is the base model
    model.train()
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)


def test_load_lora_errors_name_the_tensor():
    model = llm.add_lora(llm.LLaMA(llm.LLaMAConfig.preset("tiny")), r=2, alpha=2)
    sd = llm.lora_state_dict(model)
    bad = dict(sd)
    bad["model.layers.9.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(2, 64)
    with pytest.raises(weights.CheckpointError, match="layers.9.self_attn.q_proj.lora_A"):
        llm.load_lora(model, bad)
    short = dict(sd)
    short.pop("model.layers.1.self_attn.v_proj.lora_B")
    with pytest.raises(weights.CheckpointError, match="layers.1.self_attn.v_proj.lora_B"):
        llm.load_lora(model, short)
    wrong = dict(sd)
    wrong["model.layers.0.self_attn.k_proj.lora_A"] = torch.zeros(3, 64)
    with pytest.raises(weights.CheckpointError, match="k_proj.lora_A"):
        llm.load_lora(model, wrong)


def test_lora_on_meta_device():
    with torch.device("meta"):
        model = llm.add_lora(llm.LLaMA(llm.LLaMAConfig.preset("tiny")), r=2, alpha=2)
    sd = {k: torch.randn(v.shape) for k, v in llm.lora_state_dict(model).items()}
    llm.load_lora(model, sd)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_A, sd["model.layers.0.self_attn.q_proj.lora_A"])


def test_bad_checkpoints_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="Vicuna"):
        llm.LLaMA.from_pretrained(str(tmp_path / "nowhere"))
    ref = hf_tiny()
    ref.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights"):
        llm.LLaMA.from_pretrained(str(tmp_path))
    sd = dict(ref.state_dict())
    sd.pop("model.layers.1.mlp.up_proj.weight")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(weights.CheckpointError, match=r"missing from the file \(1\):\n\s+model.layers.1.mlp.up_proj"):
        llm.LLaMA.from_pretrained(str(tmp_path))
    sd = dict(ref.state_dict())
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 65)
    sd["model.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(weights.CheckpointError) as e:
        llm.LLaMA.from_pretrained(str(tmp_path))
    assert "model.extra.weight" in str(e.value) and "q_proj.weight: file (64, 65), model (64, 64)" in str(e.value)


def test_weights_only_refuses_pickled_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        weights.load_file(str(tmp_path / "evil.bin"))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    text = d / "corpus.txt"
    words = ["a red circle", "a blue square moving left", "two high beeps", "the cat sat on the mat",
             "### Human: describe this", "### Assistant: here it is", "Numbers 1 2 3 and ünïcödé too!"]
    text.write_text("\n".join(words * 50))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(d / "tok"), vocab_size=400,
                                   model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1,
                                   # as LLaMA's tokenizer.model: no normalisation, spaces kept, digits split, bytes
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, byte_fallback=True)
    return str(d / "tok.model")


NEXTGPT_TOKENS = ["<Img>", "</Img>"] + [f"[IMG{i}]" for i in range(4)] + [f"[VID{i}]" for i in range(24)] + \
    [f"[AUD{i}]" for i in range(8)]


def test_tokenizer_round_trip_and_special_tokens(sp_model):
    tok = bpe.LLaMATokenizer(sp_model, NEXTGPT_TOKENS)
    n = tok.sp.get_piece_size()
    assert len(tok) == n + 38
    assert tok.special["<Img>"] == n and tok.special["[VID0]"] == n + 6 and tok.special["[AUD7]"] == n + 37
    text = "a red circle moving left"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == text
    assert tok.encode(text, bos=False) == ids[1:] == tok.sp.encode(text)
    # special tokens are whole, even glued to text, and [VID1] is never read as [VID1] + "0]" inside [VID10]
    mixed = "### Human:<Img></Img> draw[IMG0][IMG1][VID10][VID1] on"
    ids = tok.encode(mixed, bos=False)
    for t in ["<Img>", "</Img>", "[IMG0]", "[IMG1]", "[VID10]", "[VID1]"]:
        assert ids.count(tok.special[t]) == 1
    assert tok.decode(ids) == mixed
    # whitespace around added tokens is dropped, as transformers 4.29's slow LlamaTokenizer did for NExT-GPT
    assert tok.encode("### Human: <Img> </Img>  draw", bos=False) == \
        tok.sp.encode("### Human:") + [tok.special["<Img>"], tok.special["</Img>"]] + tok.sp.encode("draw")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        bpe.LLaMATokenizer("/nonexistent/tokenizer.model")


def test_tokenizer_matches_transformers(sp_model, tmp_path):
    # transformers reads tokenizer.model through its converted (tokenizers) backend, which needs protobuf
    pytest.importorskip("google.protobuf")
    import shutil
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), legacy=True)
    hf.add_tokens(NEXTGPT_TOKENS)  # as NExT-GPT's legacy code adds them
    tok = bpe.LLaMATokenizer(sp_model, NEXTGPT_TOKENS)
    # (added tokens are left out: transformers 5 keeps the spaces around them, 4.29 dropped them; see above)
    for text in ["a red circle", "the cat sat on the mat.", "Numbers 1 2 3 and 45", "### Human: describe this",
                 "ünïcödé\n### Assistant: a blue  square "]:
        assert tok.encode(text, bos=False) == hf(text, add_special_tokens=False)["input_ids"], text


def test_save_pretrained_round_trips_through_transformers(tmp_path, hf_and_ours):
    ref, ours = hf_and_ours
    ours.save_pretrained(str(tmp_path))
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()  # the official reader takes it
    ids = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        assert (back(ids).logits - ref(ids).logits).abs().max() <= 1e-5
    again = llm.LLaMA.from_pretrained(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


# ----------------------------------------------------------------------------------------------------------------------
# Weight-only int8 (llm.quantize_int8)

def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return llm.LLaMA(llm.LLaMAConfig.preset("tiny")).eval()


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 0.015), (torch.bfloat16, 0.02)])
def test_int8_logits_and_greedy_tokens_stay_close(dtype, bound):
    """The tiny preset runs both paths: torch's int8 kernel (in_features 64) and the dequantised one (down_proj's
    172, which the kernel cannot take). Measured: relative error (Frobenius) 0.0051 in float32, 0.0064 in bfloat16."""
    model = tiny_llama().to(dtype)
    quant = llm.quantize_int8(tiny_llama().to(dtype))
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids).float(), quant(ids).float()
    assert got.dtype == want.dtype and torch.isfinite(got).all()
    assert 1e-4 < ((got - want).norm() / want.norm()).item() < bound  # close, and not the float weights after all
    # measured: the first 32 greedy tokens of this prompt agree in both dtypes; 16 asserted
    assert quant.generate(ids[:1, :16], max_new_tokens=16) == model.generate(ids[:1, :16], max_new_tokens=16)


def test_int8_memory_state_dict_and_devices():
    model = tiny_llama()
    float_bytes = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is torch.nn.Linear)
    llm.quantize_int8(model)
    linears = [m for m in model.modules() if isinstance(m, llm.Int8Linear)]
    assert len(linears) == 2 * 7 + 1 and not any(type(m) is torch.nn.Linear for m in model.modules())
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the embedding stays float
    assert all(m.weight.dtype == torch.int8 for m in linears)
    assert 4 * sum(m.weight.numel() * m.weight.element_size() for m in linears) == float_bytes  # a quarter
    scale_bytes = sum(m.scale.numel() * m.scale.element_size() for m in linears)
    assert scale_bytes / float_bytes <= 1 / 64  # + 4 bytes a row: 1 / in_features of float32's (1/64 here)
    # the state dict: the float names (int8) plus one .scale each; a fresh quantized model loads it strictly
    sd = model.state_dict()
    assert sd["lm_head.weight"].dtype == torch.int8 and sd["lm_head.scale"].shape == (256,)
    other = llm.quantize_int8(tiny_llama(seed=1))
    other.load_state_dict(sd)
    ids = torch.randint(3, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(other(ids), model(ids))
        with pytest.raises(RuntimeError, match="scale"):  # a float model refuses it (unexpected .scale keys)
            tiny_llama().load_state_dict(sd)
        model.to(torch.bfloat16)  # casts the scales and the rest, never the int8
        assert model.lm_head.weight.dtype == torch.int8 and model(ids).dtype == torch.bfloat16
        assert model.new_cache().kv.dtype == torch.bfloat16  # the cache takes the embedding's dtype, not int8's


def test_int8_frees_each_float_layer_as_it_goes(monkeypatch):
    """quantize_int8 replaces layer by layer and keeps no list of the float ones: when the k-th Int8Linear is made,
    the k - 1 float layers before it are gone, so the peak is the float model plus one layer (a 7B model in bf16:
    bench.py --full-scale)."""
    import weakref
    model = tiny_llama()
    refs = [weakref.ref(m) for m in model.modules() if type(m) is torch.nn.Linear]
    alive = []  # float layers still alive as each Int8Linear is made
    make = llm.Int8Linear.__init__

    def counting(self, linear):
        alive.append(sum(r() is not None for r in refs))
        make(self, linear)
    monkeypatch.setattr(llm.Int8Linear, "__init__", counting)
    llm.quantize_int8(model)
    assert alive == list(range(len(refs), 0, -1)), alive


def test_int8_refuses_lora_and_a_second_call_changes_nothing():
    model = llm.add_lora(tiny_llama(), r=4, alpha=8)
    with pytest.raises(ValueError, match="merge_lora"):
        llm.quantize_int8(model)
    llm.quantize_int8(llm.merge_lora(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    llm.quantize_int8(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    head = llm.quantize_int8(tiny_llama(), lm_head=False)  # the head left float
    assert type(head.lm_head) is torch.nn.Linear and isinstance(head.model.layers[0].mlp.up_proj, llm.Int8Linear)
