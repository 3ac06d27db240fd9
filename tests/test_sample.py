"""sample.py end to end: on random tiny weights every input modality in and every output modality out, files checked;
and the built-in showcase on the shipped toy checkpoint."""

import math
import wave

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import nextgpt
import sample


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    Image.new("RGB", (40, 30), (200, 20, 20)).save(d / "in.png")
    frames = [Image.new("RGB", (32, 32), (20, 20, 200 - 40 * i)) for i in range(5)]
    frames[0].save(d / "in.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    t = np.arange(8000) / 16000
    with wave.open(str(d / "in.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * math.pi * 440 * t) * 32767).astype(np.int16).tobytes())
    return d


def test_any_to_any_files(media, tmp_path, capsys):
    out = tmp_path / "out"
    sample.main(["--tiny-random", "--prompt", "what is in <image> and <audio>?", "--image", str(media / "in.png"),
                 "--audio", str(media / "in.wav"), "--video", str(media / "in.gif"), "--want", "image,video,audio",
                 "--out", str(out), "--steps", "2", "--frames", "3", "--seconds", "0.25"])
    printed = capsys.readouterr().out
    reply = (out / "reply.txt").read_text()
    assert reply.strip() and reply.strip() in printed
    with Image.open(out / "image_0.png") as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    with Image.open(out / "video_0.gif") as im:
        assert im.n_frames == 3 and im.size == (32, 32)
    assert (out / "video_0.mp4").stat().st_size > 0
    audio, sr = soundfile.read(out / "audio_0.wav")
    assert sr == 16000 and audio.shape == (4000,)
    assert not list(out.glob("*.part*"))  # every file written whole (media.write_whole's temporary names)


def test_bad_input_names_the_problem_and_writes_nothing(media, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sample.main(["--tiny-random", "--prompt", "hi", "--image", str(tmp_path / "nope.png"), "--out", str(out)])
    assert "nope.png" in str(e.value.code) or e.value.code == 2
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(SystemExit) as e:
        sample.main(["--tiny-random", "--prompt", "hi", "--image", str(tmp_path / "broken.png"), "--out", str(out)])
    assert "broken.png" in str(e.value.code)
    with pytest.raises(SystemExit):
        sample.main(["--tiny-random", "--prompt", "hi", "--want", "smell"])
    assert not out.exists()


def test_missing_checkpoint_says_where_to_get_it(tmp_path):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path), "--prompt", "hi"])
    assert "imagebind_huge.pth" in str(e.value.code) and "dl.fbaipublicfiles.com" in str(e.value.code)


def test_default_showcase_on_the_shipped_toy(tmp_path, monkeypatch, capsys):
    """`python sample.py` with no arguments: the shipped toy checkpoint, at the settings its nextgpt.json gives (32 px,
    8 frames, 1 s), every modality out, a reply with two outputs and a two-turn dialogue; the replies name what the
    prompts ask for."""
    import toy
    monkeypatch.chdir(tmp_path)
    sample.main([])
    out = tmp_path / "out"
    assert (out / "1_reply.txt").read_text().strip() == "a green triangle"  # the bundled example.png
    assert (out / "2_reply.txt").read_text().strip() == "a red circle"
    with Image.open(out / "2_image_0.png") as im:
        assert im.size == (32, 32)
        assert toy.measure_color(np.asarray(im.convert("RGB"))) == "red"
    with Image.open(out / "3_video_0.gif") as im:
        assert im.n_frames == 8 and im.size == (32, 32)
    wave_, sr = soundfile.read(out / "4_audio_0.wav")
    assert sr == 16000 and wave_.shape == (16000,)
    assert toy.measure_audio(wave_) == ("high", 2)
    # one reply, two outputs: the image and its sound by the world's rule (blue: three beeps, square: mid)
    assert (out / "5_reply.txt").read_text().strip() == "a blue square three mid beeps"
    with Image.open(out / "5_image_0.png") as im:
        assert toy.measure_image(np.asarray(im.convert("RGB"))) == ("blue", "square")
    assert toy.measure_audio(soundfile.read(out / "5_audio_0.wav")[0]) == ("mid", 3)
    # a dialogue: the second turn's "it" is the first turn's image
    assert (out / "6a_reply.txt").read_text().strip() == "a green triangle"
    assert (out / "6b_reply.txt").read_text().strip() == "a green triangle moving up"
    with Image.open(out / "6b_video_0.gif") as im:
        assert im.n_frames == 8
    assert "showcase done" in capsys.readouterr().out


def test_settings_come_from_the_checkpoint_then_the_command_line(tmp_path, monkeypatch):
    """The toy's nextgpt.json sets 20 steps, 32 px, 8 frames, 1 s; --steps 2 changes the steps alone."""
    seen = []
    original = nextgpt.NextGPT.generate

    def spy(self, prompt, **kw):
        settings = {k: v for k, v in kw.items() if k in sample.SETTINGS}
        seen.append(self.generation.override(**settings))
        return original(self, prompt, **kw)

    monkeypatch.setattr(nextgpt.NextGPT, "generate", spy)
    sample.main(["--prompt", "Draw a red circle.", "--want", "image", "--steps", "2", "--out", str(tmp_path)])
    g = seen[0]
    assert g.steps == 2 and g.height == {"image": 32, "video": 32} and (g.frames, g.seconds) == (8, 1.0)
    assert g.guidance == {"image": 3.0, "video": 1.5, "audio": 3.0} and g.max_new_tokens == 24
    with Image.open(tmp_path / "image_0.png") as im:
        assert im.size == (32, 32)


def test_int8_llm_keeps_the_toy_reply(tmp_path, monkeypatch):
    """--quantize int8: the toy's LLM in int8 (llm.quantize_int8) still describes the bundled example.png."""
    loaded, load = [], sample.load
    monkeypatch.setattr(sample, "load", lambda args: loaded.append(load(args)) or loaded[0])
    sample.main(["--quantize", "int8", "--prompt", "Describe this image.", "--image",
                 f"{sample.TOY_CKPT}/example.png", "--out", str(tmp_path)])
    assert (tmp_path / "reply.txt").read_text().strip() == "a green triangle"
    assert loaded[0].llm.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    lm = loaded[0].llm
    assert lm.lm_head.weight.dtype == torch.int8 and lm.model.embed_tokens.weight.is_floating_point()
