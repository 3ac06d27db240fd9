"""NextGPT.diagnose and the caption bypass on the shipped toy checkpoint: which stage made an output, measured."""

import os

import pytest
import torch

import chat
import nextgpt
import toy
import train

TOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy")
FAST = dict(steps=10, progress=False)


@pytest.fixture(scope="module")
def model():
    return nextgpt.NextGPT.from_pretrained(TOY)


def test_a_run_the_llm_emits_is_not_forced_and_a_wanted_one_is(model):
    drawn = model.generate("Draw a red circle.", **FAST)
    described = model.generate("Describe this image.", images=[os.path.join(TOY, "example.png")], want=["image"],
                               **FAST)
    (a,), (b,) = model.diagnose(drawn), model.diagnose(described)
    assert (a["modality"], a["forced"], a["caption"]) == ("image", False, "a red circle")
    assert (b["modality"], b["forced"], b["caption"]) == ("image", True, "a green triangle")
    assert described["tokens"][b["position"]] == model.signal_ids("image")[0] and b["position"] >= 3  # after the text
    lo, _, hi = a["caption_norms"]  # the toy world's own captions, from its manifest
    assert 0.9 * lo < a["norm"] < 1.1 * hi and 0.99 < a["cosine"] <= 1.0
    table = chat.diagnosis([a, b])
    assert "by the LLM" in table and "forced by --want" in table and "'a red circle'" in table


def test_the_bypass_output_is_what_the_caption_says(model):
    """The decoder drawn from its own embedding of the reply's caption: the toy's measurers find the caption in it."""
    out = model.generate("Draw a blue square.", caption_bypass=True, **FAST)
    (img,) = out["bypass"]["image"]
    assert toy.measure_image(toy.media.to_uint8(img)) == ("blue", "square")
    assert len(out["image"]) == 1 and not torch.equal(out["image"][0], img)  # both outputs, side by side


def test_the_distance_is_the_training_alignment_term(model):
    """diagnose's distance equals train.py's caption-alignment loss on the same prompt, reply and caption."""
    out = model.generate("Draw a red circle.", **FAST)
    (row,) = model.diagnose(out)
    cfg, _ = train.parse_args(["--stage=2"])
    reply = "a red circle" + train.signal_text(model.config, "image")
    example = train.Example([("Draw a red circle.", reply)], outputs=[("image", "a red circle", None, None)])
    with torch.no_grad():
        align, n = train.compute_losses(model, [example], cfg, {})["align"]
    assert n == 1 and abs(float(align) - row["distance"]) < 1e-4, (float(align), row["distance"])


def test_a_decoder_is_freed_after_its_work_unless_kept():
    """from_pretrained's decoders load on first use and go after it (one at a time holds memory); keep_decoders keeps
    them, and both give the same output."""
    freed = nextgpt.NextGPT.from_pretrained(TOY)
    kept = nextgpt.NextGPT.from_pretrained(TOY, keep_decoders=True)
    a = freed.generate("Draw a red circle.", **FAST)
    b = kept.generate("Draw a red circle.", **FAST)
    assert not hasattr(freed.backbones["image"], "generate")  # the loader again
    assert hasattr(kept.backbones["image"], "generate")
    assert torch.equal(a["image"][0], b["image"][0])
    assert freed.generate("Draw a red circle.", **FAST)["image"][0].equal(a["image"][0])  # loads again, same result
