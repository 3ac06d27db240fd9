"""nextgpt.py: projectors against torch's nn.Transformer layout, the official delta's key set, grouping, prompts,
signal tokens."""

import json
import os

import pytest
import torch
import torch.nn as nn

import bpe
import nextgpt
import weights
from nextgpt import NextGPT, NextGPTConfig, OutputProjector


class TextFcLayer(nn.Module):
    """The official TextFcLayer(mode='transformer') layout (NExT-GPT-Lagacy/code/model/layers.py), as a reference."""

    def __init__(self, in_dim, out_dim, num_output_tokens, hidden=512, layers=4, heads=4):
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden)
        self.tfm = nn.Transformer(batch_first=True, norm_first=True, d_model=hidden, num_encoder_layers=layers,
                                  num_decoder_layers=layers, dim_feedforward=hidden * 4, dropout=0.0, nhead=heads)
        self.model = nn.Linear(hidden, out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, num_output_tokens, hidden))

    def forward(self, x, input_embs):
        x = self.fc(x + input_embs)
        x = self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1))
        return self.model(x)


def test_output_projector_equals_official_layout():
    torch.manual_seed(0)
    ref = TextFcLayer(48, 24, num_output_tokens=7, hidden=32, layers=2, heads=4).eval()
    with torch.no_grad():  # random norms and biases, so that any misplaced tensor shows
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = OutputProjector(48, 24, 7, hidden=32, layers=2, heads=4)
    ours.load_state_dict(ref.state_dict(), strict=True)  # the same names and shapes
    h, e = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    with torch.no_grad():
        want, got = ref(h, e), ours(h, e)
    assert got.shape == (3, 7, 24)
    assert (got - want).abs().max() <= 1e-5


def test_output_projectors_of_their_own_size():
    """proj_hidden / proj_layers as {modality: value}: each projector is built at its own size, and the config goes
    through nextgpt.json (to_dict, JSON, from_dict) unchanged; an int is one size for all three, as the official."""
    config = NextGPTConfig.preset("tiny")
    config.proj_hidden = {"image": 32, "video": 32, "audio": 16}
    config.proj_layers = {"image": 2, "video": 2, "audio": 1}
    again = NextGPTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.projector_size("audio") == (16, 1, 2)
    model = NextGPT(again)
    widths = {m: p.fc.out_features for m, p in model.output_proj.items()}
    layers = {m: len(p.tfm.encoder.layers) for m, p in model.output_proj.items()}
    assert widths == {"image": 32, "video": 32, "audio": 16} and layers == {"image": 2, "video": 2, "audio": 1}
    assert NextGPTConfig.preset("tiny").projector_size("audio") == (32, 1, 2)
    config.proj_hidden = {"image": 32, "video": 32}
    with pytest.raises(ValueError, match="proj_hidden .* has no 'audio'"):
        NextGPT(config)


def official_delta_shapes(config):
    """The key set of ChocoWu/nextgpt_7b_tiva_v0/pytorch_model.pt with its shapes, as meta tensors."""
    V, D = config.vocab_size, config.llm.dim
    sd = {"llama_model.base_model.model.model.embed_tokens.weight": (V, D),
          "llama_model.base_model.model.lm_head.weight": (V, D),
          "llama_proj.weight": (D, config.imagebind.out_dim), "llama_proj.bias": (D,)}
    for i in range(config.llm.n_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"llama_model.base_model.model.model.layers.{i}.self_attn.{proj}"
            sd[f"{name}.lora_A.default.weight"] = (config.lora_r, D)
            sd[f"{name}.lora_B.default.weight"] = (D, config.lora_r)
    for official, m in (("gen_text_hidden_fcs", "image"), ("gen_text_hidden_fcs_video", "video"),
                        ("gen_text_hidden_fcs_audio", "audio")):
        with torch.device("meta"):
            ref = TextFcLayer(D, config.cond_shape[m][1], config.cond_shape[m][0], config.proj_hidden,
                              config.proj_layers, config.proj_heads)
        sd.update({f"{official}.0.{k}": tuple(v.shape) for k, v in ref.state_dict().items()})
    return {k: torch.empty(s, device="meta", dtype=torch.float16) for k, s in sd.items()}


def test_official_delta_loads_exactly_on_meta():
    config = NextGPTConfig.preset("7b_tiva_v0")
    with torch.device("meta"):
        model = NextGPT(config)
    delta = official_delta_shapes(config)
    assert delta["llama_model.base_model.model.lm_head.weight"].shape == (32038, 4096)
    model.load_delta(delta)
    trainable_names = {n for n in model.state_dict() if not n.startswith("llm.") or ".lora_" in n
                       or n in ("llm.model.embed_tokens.weight", "llm.lm_head.weight")}
    assert len(trainable_names) == len(delta)  # every official tensor has exactly one place, and back
    assert model.output_proj["video"].query_embs.shape == (1, 77, 512)
    assert model.output_proj["audio"].model.weight.shape == (512, 512)
    assert model.token_id("[VID0]") == 32006 and model.token_id("[AUD7]") == 32037

    extra = dict(delta)
    extra["gen_text_hidden_fcs.1.fc.weight"] = torch.empty(512, 4096, device="meta")
    with pytest.raises(weights.CheckpointError, match=r"gen_text_hidden_fcs\.1\.fc\.weight"):
        model.load_delta(extra)
    short = dict(delta)
    short.pop("gen_text_hidden_fcs_audio.0.query_embs")
    with pytest.raises(weights.CheckpointError, match=r"output_proj\.audio\.query_embs"):
        model.load_delta(short)
    wrong = dict(delta)
    wrong["llama_proj.weight"] = torch.empty(4096, 768, device="meta")
    with pytest.raises(weights.CheckpointError, match=r"input_proj\.weight: file \(4096, 768\)"):
        model.load_delta(wrong)


def test_grouping_projector():
    torch.manual_seed(0)
    proj = nextgpt.GroupProjector(in_dim=24, out_dim=40, dim=32, depths=(1, 1, 1), group_tokens=(64, 8), heads=4)
    x = torch.randn(2, 256, 24)
    out = proj(x)
    assert out.shape == (2, 8, 40)  # 8 concept tokens per input
    for layer in proj.layers[:2]:
        a = layer.downsample.last_assignment  # (B, S, L) after the 1 + sum normalisation
        one_hot = (a > 0).float()
        assert torch.equal(one_hot.sum(dim=1), torch.ones(2, a.shape[-1]))  # every token in exactly one group
    # gradients: through the hard assignment (straight-through) into the assignment's queries and keys, and in_fc
    out.square().mean().backward()
    assert proj.layers[0].downsample.assign.q_proj.weight.grad.abs().sum() > 0
    assert proj.in_fc.weight.grad.abs().sum() > 0
    # eval is deterministic (argmax), training samples Gumbel noise
    proj.eval()
    with torch.no_grad():
        assert torch.equal(proj(x), proj(x))


@pytest.fixture(scope="module")
def tiny(tiny_sp_model):
    torch.manual_seed(0)
    config = NextGPTConfig.preset("tiny")
    tok = bpe.LLaMATokenizer(tiny_sp_model, config.added_tokens)
    return NextGPT(config, tokenizer=tok).eval()


def test_tokenizer_and_model_must_agree(tiny_sp_model):
    config = NextGPTConfig.preset("tiny")
    with pytest.raises(ValueError, match="tokenizer has"):
        NextGPT(config, tokenizer=bpe.LLaMATokenizer(tiny_sp_model, config.added_tokens[:-1]))


def test_prompt_embeds_splice_inputs_where_they_sit(tiny):
    D = tiny.config.llm.dim
    img, aud = torch.randn(1, D), torch.randn(8, D)  # a linear token and 8 concept tokens
    emb = tiny.prompt_embeds([("what is in <audio> ?", None)], [("image", img), ("audio", aud)])
    tok, E = tiny.tokenizer, tiny.llm.model.embed_tokens.weight
    ids_a = tok.encode("### Human: <Img>")
    ids_b = tok.encode("</Img><Img>", bos=False)
    ids_c = tok.encode("</Img> ?\n### Assistant: ", bos=False)  # open for the reply, as training prompts end
    pre = tok.encode("what is in", bos=False)
    want = torch.cat([E[ids_a], img, E[ids_b[:1]], E[pre], E[ids_b[1:]], aud, E[ids_c]])
    assert emb.shape == (1, len(want), D)
    assert torch.equal(emb[0], want)
    assert ids_a[0] == tok.bos_id and ids_a[-1] == tiny.token_id("<Img>")
    # multi-turn history: one BOS, the legacy turn separators; user parts and replies tokenized apart, as the
    # official training does, and only the replies are targets
    emb2, labels = tiny.prompt_embeds([("hi", "hello"), ("draw", None)], labels=True)
    user1 = tok.encode("### Human: hi\n### Assistant: ")
    reply = tok.encode("hello\n###", bos=False)
    user2 = tok.encode("Human: draw\n### Assistant: ", bos=False)
    assert torch.equal(emb2[0], E[user1 + reply + user2])
    assert labels.tolist() == [-100] * len(user1) + reply + [-100] * len(user2)
    # the official inference's prompt ends at the colon
    official = tiny.prompt_embeds([("hi", "hello"), ("draw", None)], official=True)
    assert torch.equal(official[0], E[user1 + reply + tok.encode("Human: draw\n### Assistant:", bos=False)])
    assert official.shape[1] < emb2.shape[1]
    with pytest.raises(ValueError, match="more <image> markers"):
        tiny.prompt_embeds([("<image> and <image>", None)], [("image", img)])


def scripted(model, script):
    """A choose() that plays back token ids (then the stop token)."""
    stop = model.tokenizer.encode("###", bos=False)[0]
    it = iter(script)
    return lambda logits: next(it, stop)


def test_signal_runs_complete_partial_and_several(tiny):
    word = tiny.tokenizer.encode("red", bos=False)
    img, vid, aud = tiny.signal_ids("image"), tiny.signal_ids("video"), tiny.signal_ids("audio")
    emb = tiny.prompt_embeds([("draw", None)])
    # the LLM starts three runs and then would go on with text: the rest of each run is forced (choose() is not
    # even asked), so an image, a video and an audio run come out whole
    script = word + img[:1] + word + vid[:1] + word + word + aud[:1]
    tokens, hs = tiny.reply(emb, max_new_tokens=100, choose=scripted(tiny, script))
    assert tokens[:len(word) + 4] == word + img
    runs = tiny.signal_runs(tokens)
    assert [m for m, _ in runs] == ["image", "video", "audio"]
    i = runs[1][1]
    assert tokens[i:i + len(vid)] == vid  # the partial run was completed
    assert tokens[-1] == tiny.tokenizer.encode("###", bos=False)[0]  # the stop token ends the reply
    assert len(hs) == len(tokens) + 1
    assert tiny.reply_text(tokens).split() == ["red"] * 4  # signal tokens and the stop text stripped
    # hidden states: hs[k + 1] is at token k's own position (a plain forward over the same embeddings agrees)
    full = torch.cat([emb, tiny.llm.model.embed_tokens(torch.tensor([tokens]))], dim=1)
    with torch.no_grad():
        _, h = tiny.llm(embeds=full, return_hidden=True)
    T = emb.shape[1]
    assert (torch.stack(hs) - h[0, T - 1:]).abs().max() <= 1e-5


def test_want_forces_an_output(tiny):
    emb = tiny.prompt_embeds([("draw", None)])
    word = tiny.tokenizer.encode("blue", bos=False)
    tokens, _ = tiny.reply(emb, max_new_tokens=50, want=("audio",), choose=scripted(tiny, word))
    assert [m for m, _ in tiny.signal_runs(tokens)] == ["audio"]
    # the budget runs out before the stop: a wanted run still comes, and runs are never cut
    tokens, _ = tiny.reply(emb, max_new_tokens=3, want=("video",), choose=lambda logits: word[0])
    assert [m for m, _ in tiny.signal_runs(tokens)] == ["video"]
    assert len(tokens) == 3 + len(tiny.signal_ids("video"))


def test_grouping_equals_the_official_group_projector():
    """tests/fixtures/grouping: the official GroupProjector (nextgpt/model/multimodal_projector/projector.py and
    group.py, NExT-GPT commit 60d618b) in eval mode, on sin() weights and inputs (see its README)."""
    from safetensors.torch import load_file

    from grouping_data import make_input, make_weights
    fx = load_file(os.path.join(os.path.dirname(__file__), "fixtures", "grouping",
                                "official_group_projector.safetensors"))
    ours = nextgpt.GroupProjector(in_dim=24, out_dim=40, dim=512, depths=(1, 1, 1), group_tokens=(64, 8), heads=8)
    ours.load_state_dict(make_weights(ours.state_dict()), strict=True)  # the official names, one to one
    ours.eval()
    x = make_input()
    assert torch.equal(x, fx["input"])
    with torch.no_grad():
        out = ours(x)
    assert (out - fx["output"]).abs().max() <= 1e-4
    used = (ours.layers[0].downsample.last_assignment[0] > 0).any(dim=-1).sum()
    assert used > 16  # the tokens spread over many of the 64 groups: the comparison exercises the assignment


def test_guidance_per_decoder():
    """generate(guidance={modality: scale}) gives each decoder its own scale (the official code has one per decoder;
    the toy samples video at 1.5, images and audio at 3): the same outputs as the scalar for that modality."""
    model = nextgpt.tiny_random(0)
    kw = dict(want=("image", "video"), max_new_tokens=4, steps=2, height=16, width=16, frames=2, progress=False)
    mixed = model.generate("hi", guidance={"image": 7.5, "video": 1.0, "audio": 7.5}, **kw)
    strong, weak = (model.generate("hi", guidance=g, **kw) for g in (7.5, 1.0))
    assert torch.equal(mixed["image"][0], strong["image"][0]) and torch.equal(mixed["video"][0], weak["video"][0])
    assert not torch.equal(strong["video"][0], weak["video"][0])


def test_generation_settings_have_one_source():
    """GenerationConfig holds the official defaults; override changes only what it is given (a number for every
    modality, or a dict for some), and changes() is what a manifest records."""
    g = nextgpt.GenerationConfig()
    assert (g.max_new_tokens, g.temperature, g.top_p, g.steps, g.frames, g.seconds) == (246, 0.0, 1.0, 50, 24, 9.0)
    assert g.guidance == {"image": 7.5, "video": 7.5, "audio": 7.5}
    assert (g.height, g.width) == ({"image": 512, "video": 320}, {"image": 512, "video": 576})
    h = g.override(height=32, guidance={"video": 1.5}, steps=None)
    assert h.height == {"image": 32, "video": 32} and h.guidance == {"image": 7.5, "video": 1.5, "audio": 7.5}
    assert h.steps == 50 and g.height["image"] == 512  # None keeps; the original is untouched
    assert h.changes() == {"height": {"image": 32, "video": 32}, "guidance": {"image": 7.5, "video": 1.5, "audio": 7.5}}
    with pytest.raises(ValueError, match="unknown generation settings"):
        g.override(step=3)


def test_the_manifest_names_what_it_changes(tmp_path):
    """A checkpoint's nextgpt.json "generation" overrides only what it names; save_manifest writes it back."""
    model = nextgpt.tiny_random(0)
    model.generation = nextgpt.GenerationConfig().override(steps=7, height={"image": 64})
    model.save_manifest(str(tmp_path), {})
    written = json.loads((tmp_path / "nextgpt.json").read_text())["generation"]
    assert written == {"steps": 7, "height": {"image": 64, "video": 320}}
    again = nextgpt.GenerationConfig().override(**written)
    assert again == model.generation and again.width == {"image": 512, "video": 576}
