"""
encoder.py against the official ImageBind: model outputs, preprocessing, tokenizer, checkpoint loading.
The fixtures in tests/fixtures/imagebind/ were made by running the official code (see the README there).
"""
import gzip
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "imagebind"))

import bpe  # noqa: E402
import encoder  # noqa: E402
import imagebind_inputs as fx  # noqa: E402
import weights  # noqa: E402
from encoder import ImageBind, ImageBindConfig  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "imagebind")


def _fixture(name):
    from safetensors.torch import load_file
    return load_file(os.path.join(FIXTURES, name))


def _tiny_state():
    """The official tiny model's state dict; the token table was stored sparse (only the rows the texts use)."""
    st = _fixture("tiny_state.safetensors")
    ids, rows, text = st.pop("token_embedding.ids"), st.pop("token_embedding.rows"), st.pop("input.text")
    table = torch.zeros(ImageBindConfig.tiny().vocab_size, rows.shape[1])
    table[ids] = rows
    st["modality_preprocessors.text.token_embedding.weight"] = table
    return st, text


@pytest.fixture(scope="module")
def tiny():
    st, text = _tiny_state()
    with torch.device("meta"):
        model = ImageBind(ImageBindConfig.tiny())
    weights.place(model, st, what="official tiny state")  # strict: every name and shape
    assert weights.still_on_meta(model) == []
    return model.eval(), text


@pytest.fixture(scope="module")
def bpe_path():
    open_clip = pytest.importorskip("open_clip")
    return os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


# ----------------------------------------------------------------------------- model parity


def test_forward_matches_official(tiny):
    model, text = tiny
    ref = _fixture("tiny_outputs.safetensors")
    image, video, audio = fx.image_batch(), fx.video_batch(), fx.audio_batch()
    with torch.no_grad():
        ours = {
            "forward.vision.image": model({"vision": image})["vision"],
            "forward.vision.video": model({"vision": video})["vision"],  # 6-D: clips averaged
            "forward.audio": model({"audio": audio})["audio"],  # 5-D: clips averaged, x 20
            "forward.audio.single": model({"audio": audio[:, 0]})["audio"],
            "forward.text": model({"text": text})["text"],  # x exp(log_logit_scale)
            "embed.audio": model.embed("audio", audio),  # legacy: no x 20
            "embed.vision.video": model.embed("vision", video),
            "patch.vision.image": model.patch_features("vision", image),
            "patch.vision.video": model.patch_features("vision", video),
            "patch.audio": model.patch_features("audio", audio),
        }
    for key, y in ours.items():
        assert y.shape == ref[key].shape, key
        # 1e-5 plus a few float32 ulps of the value: the text outputs are x exp(logit scale), up to about 30, and
        # another CPU's kernels round them 1.05e-5 away from the fixture's machine
        assert ((y - ref[key]).abs() <= 1e-5 + 1e-6 * ref[key].abs()).all(), key
    assert ours["patch.vision.image"].shape == (2, 256, 16) and ours["patch.audio"].shape == (2, 228, 16)
    assert torch.allclose(ours["embed.audio"] * 20, ours["forward.audio"], atol=1e-5)


def test_forward_dict_keeps_modalities(tiny):
    model, text = tiny
    with torch.no_grad():
        out = model({"vision": fx.image_batch()[:1], "text": text[:1], "audio": None})
    assert set(out) == {"vision", "text"}
    assert torch.allclose(out["vision"].norm(dim=-1), torch.ones(1), atol=1e-6)


def test_audio_drop_path_in_training_matches_official(tiny):
    # same seed, same draws: the official DropPath runs in (T, B, D) layout, one keep/drop per token position
    model, _ = tiny
    ref = _fixture("tiny_outputs.safetensors")["train.audio"]
    model.train()
    try:
        torch.manual_seed(1234)
        with torch.no_grad():
            y = model({"audio": fx.audio_batch()})["audio"]
    finally:
        model.eval()
    assert (y - ref).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- full-size keys, loading


def _official_key_counts(sd):
    return {m: sum(1 for k in sd if k.split(".")[1] == m) for m in ("vision", "audio", "text")}


def test_huge_has_the_official_keys():
    with torch.device("meta"):
        model = ImageBind(ImageBindConfig.huge())
    sd = model.state_dict()
    assert _official_key_counts(sd) == {"vision": 392, "audio": 177, "text": 295}
    shapes = {
        "modality_preprocessors.vision.cls_token": (1, 1, 1280),
        "modality_preprocessors.vision.rgbt_stem.proj.1.weight": (1280, 3, 2, 14, 14),
        "modality_preprocessors.vision.pos_embedding_helper.pos_embed": (1, 257, 1280),
        "modality_trunks.vision.pre_transformer_layer.0.weight": (1280,),
        "modality_trunks.vision.blocks.31.attn.in_proj_weight": (3840, 1280),
        "modality_trunks.vision.blocks.0.mlp.fc1.weight": (5120, 1280),
        "modality_heads.vision.2.weight": (1024, 1280),
        "modality_preprocessors.audio.rgbt_stem.proj.weight": (768, 1, 16, 16),
        "modality_preprocessors.audio.rgbt_stem.norm_layer.weight": (768,),
        "modality_preprocessors.audio.pos_embedding_helper.pos_embed": (1, 229, 768),
        "modality_trunks.audio.blocks.11.attn.bias_k": (1, 1, 768),
        "modality_trunks.audio.blocks.0.attn.bias_v": (1, 1, 768),
        "modality_heads.audio.2.weight": (1024, 768),
        "modality_postprocessors.audio.1.log_logit_scale": (),
        "modality_preprocessors.text.token_embedding.weight": (49408, 1024),
        "modality_preprocessors.text.pos_embed": (1, 77, 1024),
        "modality_preprocessors.text.mask": (77, 77),
        "modality_trunks.text.blocks.23.attn.out_proj.weight": (1024, 1024),
        "modality_heads.text.proj.0.weight": (1024,),
        "modality_heads.text.proj.1.weight": (1024, 1024),
        "modality_postprocessors.text.1.log_logit_scale": (),
    }
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - 1.073) < 1e-3


def test_only_the_chosen_modalities_exist(tiny):
    model = ImageBind(ImageBindConfig.tiny(), modalities=("audio",))
    assert list(model.modality_preprocessors) == ["audio"] and model.modalities == ("audio",)
    with pytest.raises(ValueError, match="vision"):
        model.embed("vision", fx.image_batch())
    with pytest.raises(ValueError, match="depth"):
        ImageBind(ImageBindConfig.tiny(), modalities=("vision", "depth"))
    with pytest.raises(ValueError, match="vision and audio"):
        tiny[0].patch_features("text", tiny[1])


def test_presets():
    assert ImageBindConfig.preset("huge") == ImageBindConfig.huge()
    assert ImageBindConfig.preset("tiny") == ImageBindConfig.tiny()
    assert ImageBindConfig.huge().audio_drop_path == 0.1
    with pytest.raises(ValueError):
        ImageBindConfig.preset("giant")


def _write_checkpoint(path, edit=None):
    st, _ = _tiny_state()
    for m in ("depth", "thermal", "imu"):  # the real file holds these too: they must be dropped silently
        st[f"modality_trunks.{m}.blocks.0.norm_1.weight"] = torch.ones(4)
        st[f"modality_heads.{m}.0.weight"] = torch.ones(4)
    if edit:
        edit(st)
    torch.save(st, path)
    return str(path)


def test_from_pretrained_strict_and_lean(tmp_path, tiny):
    path = _write_checkpoint(tmp_path / "imagebind_huge.pth")
    model = ImageBind.from_pretrained(path, config=ImageBindConfig.tiny())
    assert not model.training and weights.still_on_meta(model) == []
    ref, text = tiny
    with torch.no_grad():
        assert torch.equal(model({"text": text})["text"], ref({"text": text})["text"])

    half = ImageBind.from_pretrained(path, config=ImageBindConfig.tiny(), modalities=("vision",), dtype=torch.float16)
    assert list(half.modality_trunks) == ["vision"] and list(half.modality_postprocessors) == ["vision"]
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert all(k.split(".")[1] == "vision" for k in half.state_dict())


@pytest.mark.parametrize("edit, named", [
    (lambda st: st.pop("modality_trunks.audio.blocks.1.attn.bias_k"), "modality_trunks.audio.blocks.1.attn.bias_k"),
    (lambda st: st.__setitem__("modality_trunks.vision.blocks.9.norm_1.weight", torch.ones(32)),
     "modality_trunks.vision.blocks.9.norm_1.weight"),
    (lambda st: st.__setitem__("modality_heads.text.proj.1.weight", torch.ones(16, 31)),
     "modality_heads.text.proj.1.weight"),
    (lambda st: st.__setitem__("logit_scale", torch.ones(())), "logit_scale"),
])
def test_from_pretrained_names_what_does_not_fit(tmp_path, edit, named):
    path = _write_checkpoint(tmp_path / "bad.pth", edit)
    with pytest.raises(weights.CheckpointError, match=named.replace(".", r"\.")):
        ImageBind.from_pretrained(path, config=ImageBindConfig.tiny())


def test_from_pretrained_missing_file_says_where_it_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"):
        ImageBind.from_pretrained(str(tmp_path / "nope.pth"))


# ----------------------------------------------------------------------------- tokenizer


TEXTS = [
    "a photo of a cat", "Hello, World!!! It's 2024; don't you think? I'll we've they're she'd I'm",
    "naïve café — résumé “quotes” ‘single’ ﬁnancial ＦＵＬＬ　ｗｉｄｔｈ ½ ² Ⅻ ①",
    "日本語のテキスト 中文 한국어 Ελληνικά русский",
    "emoji 😀👍🏽 and symbols ©®™ §", "&amp; &lt;tag&gt; &quot;x&quot; &#39;", "   lots   of\t\nwhitespace\r\n here ",
    "numbers 3.14159 1,000,000 0x1F 42nd", "under_score hyphen-ated a/b\\c (parens) [brackets]", "word " * 100,
    "", "ÀÉÎÕÜ ß ǅ Ĳ", "zero\u200bwidth and\u00a0nbsp", "Mixed CASE Text WITH Caps", "''s ''t 'S 'LL",
    "supercalifragilisticexpialidocious antidisestablishmentarianism", "a" * 300,
]


def test_tokenizer_matches_open_clip(bpe_path):
    import open_clip
    tok = bpe.CLIPTokenizer.from_bpe_gz(bpe_path)
    assert torch.equal(tok(TEXTS), open_clip.tokenize(TEXTS))
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tok.decode(tok.encode("Hello, World!")) == "hello , world ! "


def test_tokenizer_matches_official_fixture_ids(tiny, bpe_path):
    _, text = tiny  # made by ImageBind's own SimpleTokenizer
    assert torch.equal(encoder.tokenize(fx.TEXTS, bpe_path=bpe_path), text)


def test_tokenizer_format(bpe_path):
    tok = bpe.CLIPTokenizer.from_bpe_gz(bpe_path)
    ids = tok(["a cat", "word " * 100])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407] and ids[0, 4:].eq(0).all()
    assert ids[1, 0] == 49406 and ids[1, 76] == 49407 and ids[1, 1:76].eq(2653).all()  # tokens[:76] + [EOT]
    # ImageBind's tokenizer (unlike open_clip >= 2.24) keeps special tokens typed in the text
    assert tok.encode("<|startoftext|> x <|endoftext|>") == [49406, 343, 49407]
    assert tok("a", context_length=5).tolist() == [[49406, 320, 49407, 0, 0]]
    assert torch.equal(encoder.tokenize("a cat", bpe_path=bpe_path), ids[:1])  # always batched


def _hf_folder(folder, bpe_path, pad):
    """A transformers-style tokenizer folder (vocab.json + merges.txt) holding the same BPE, as SD ships it."""
    tok = bpe.CLIPTokenizer.from_bpe_gz(bpe_path)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(tok.encoder, f, ensure_ascii=False)
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad,
                   "unk_token": "<|endoftext|>"}, f)
    return folder


def test_tokenizer_from_folder(tmp_path, bpe_path):
    gz = bpe.CLIPTokenizer.from_bpe_gz(bpe_path)
    sd15_dir = _hf_folder(str(tmp_path / "sd15"), bpe_path, "<|endoftext|>")
    sd15 = bpe.CLIPTokenizer.from_folder(sd15_dir, clean="clip")
    assert sd15.pad_id == 49407  # Stable Diffusion 1.x pads with EOT
    ids = sd15(TEXTS)
    ref = gz(TEXTS)
    assert torch.equal(ids.where(ref != 0, torch.zeros_like(ids)), ref)  # same ids, other padding
    assert torch.equal(ids[ref == 0], torch.full_like(ids[ref == 0], 49407))
    sd2 = bpe.CLIPTokenizer.from_folder(_hf_folder(str(tmp_path / "sd2"), bpe_path, "!"), clean="clip")
    assert sd2.pad_id == 0 and torch.equal(sd2(TEXTS), ref)

    transformers = pytest.importorskip("transformers")
    # from_folder's default cleaning is transformers' own (what diffusers pipelines run): the fast tokenizer's
    # normalizer (NFC, whitespace, lower case); in transformers 5 CLIPTokenizer is that fast tokenizer
    hf = transformers.CLIPTokenizerFast.from_pretrained(str(tmp_path / "sd15"))
    hf_ids = hf(TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(bpe.CLIPTokenizer.from_folder(str(tmp_path / "sd15"))(TEXTS), hf_ids)


def test_tokenize_missing_vocabulary_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6.txt.gz"):
        encoder.tokenize("a cat", bpe_path=str(tmp_path / "bpe_simple_vocab_16e6.txt.gz"))


# ----------------------------------------------------------------------------- preprocessing parity


@pytest.fixture(scope="module")
def official_media():
    return _fixture("media_official.safetensors")


def test_load_image_matches_official(tmp_path, official_media):
    fx.pattern_png(str(tmp_path / "pattern.png"))
    x = encoder.load_image(str(tmp_path / "pattern.png"))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert (x - official_media["image.pattern"]).abs().max() <= 1e-6
    from PIL import Image
    pil = Image.open(str(tmp_path / "pattern.png"))
    batch = encoder.load_image([pil, str(tmp_path / "pattern.png")])
    assert batch.shape == (2, 3, 224, 224) and torch.equal(batch[0], x) and torch.equal(batch[1], x)


def test_load_audio_matches_official(tmp_path, official_media):
    fx.sine_wav(str(tmp_path / "tone.wav"))  # 3.5 s, 44.1 kHz stereo: resampled, 3 overlapping clips
    x = encoder.load_audio(str(tmp_path / "tone.wav"))
    assert x.shape == (3, 1, 128, 204)
    ref = official_media["audio.tone"]
    # log-mel energies (fbank = x * std + mean): where the tone's energy is near silence (below e^-10: most bins of a
    # pure tone), the FFT's rounding differs from one CPU to another and the log magnifies it (2e-4 seen on one
    # machine); those bins are compared in the power domain, against the clip's peak power
    raw, raw_ref = (t * encoder.AUDIO_STD + encoder.AUDIO_MEAN for t in (x, ref))
    loud = raw_ref > -10
    assert loud.float().mean() > 0.1 and (x - ref)[loud].abs().max() <= 1e-5
    assert (raw.exp() - raw_ref.exp()).abs().max() <= 1e-5 * raw_ref.exp().max()
    import numpy as np
    import soundfile
    soundfile.write(str(tmp_path / "silence.wav"), np.zeros(19200, dtype=np.int16), 16000, subtype="PCM_16")
    x = encoder.load_audio(str(tmp_path / "silence.wav"))  # 1.2 s of silence: 3 identical clips, still works
    assert (x - official_media["audio.silence"]).abs().max() <= 1e-5


@pytest.mark.parametrize("name, file", [
    ("video.mp4", "clip.mp4"),  # 3 s, 12 fps, 128 x 96: overlapping clips, left / centre / right crops
    ("video.portrait", "portrait_short.mp4"),  # 1.5 s, 96 x 128: 5 identical clips, top / centre / bottom crops
    ("video.webm", "clip.webm"),  # VP8 in webm: no stored frame count
])
def test_load_video_matches_official(official_media, name, file):
    v = encoder.load_video(os.path.join(FIXTURES, file))
    assert v.shape == (15, 3, 2, 224, 224) and v.dtype == torch.float32
    assert (v[:, :, :, ::8, ::8] - official_media[name + ".sub"]).abs().max() <= 1e-5
    stats = torch.stack([v.double().sum(), v.double().pow(2).sum(), v.double().abs().max()])
    assert torch.allclose(stats, official_media[name + ".stats"], rtol=1e-6)


def test_load_video_gif_shorter_than_a_clip(tmp_path):
    fx.pattern_gif(str(tmp_path / "p.gif"))  # 1.2 s: every clip covers all 12 frames (first and last)
    v = encoder.load_video(str(tmp_path / "p.gif"))
    assert v.shape == (15, 3, 2, 224, 224)
    assert torch.equal(v[0], v[12]) and not torch.equal(v[0, :, 0], v[0, :, 1])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("loader", [encoder.load_image, encoder.load_audio, encoder.load_video])
def test_bad_media_names_the_file(tmp_path, loader):
    missing = str(tmp_path / "missing.xyz")
    with pytest.raises(FileNotFoundError, match="missing.xyz"):
        loader(missing)
    empty = tmp_path / "empty.dat"
    empty.write_bytes(b"")
    with pytest.raises(encoder.MediaError, match="empty.dat"):
        loader(str(empty))
    junk = tmp_path / "junk.png"
    junk.write_text("this is not media at all\n" * 10)
    with pytest.raises(encoder.MediaError, match="junk.png"):
        loader(str(junk))


def test_zero_length_audio(tmp_path):
    import numpy as np
    import soundfile
    soundfile.write(str(tmp_path / "zero.wav"), np.zeros(0, dtype=np.int16), 16000, subtype="PCM_16")
    with pytest.raises(encoder.MediaError, match="zero.wav"):
        encoder.load_audio(str(tmp_path / "zero.wav"))
