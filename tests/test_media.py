"""media.py and the loaders on the formats people have: 8-, 16-, 24-bit and float WAV, mono and many channels,
16-bit grey, palette and alpha PNGs, a variable-frame-rate video; each read as the official code reads it, or refused
by name."""

import fractions

import av
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import encoder
import media

SR = 16000


def tone(channels=1, seconds=0.5):
    t = np.arange(int(seconds * SR)) / SR
    return np.stack([0.5 * np.sin(2 * np.pi * (440 + 110 * c) * t) for c in range(channels)], axis=1)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "FLOAT"])
def test_wav_of_every_depth_reads_as_the_same_tone(subtype, tmp_path):
    path = tmp_path / f"{subtype}.wav"
    soundfile.write(path, tone(), SR, subtype=subtype)
    wave, sr = media.read_audio(str(path))
    assert sr == SR and wave.shape == (1, SR // 2) and wave.dtype == torch.float32
    tolerance = {"PCM_U8": 1e-2, "PCM_16": 1e-4}.get(subtype, 1e-6)  # what the depth keeps of the tone
    assert np.abs(wave[0].numpy() - tone()[:, 0]).max() < tolerance
    assert encoder.load_audio(str(path)).shape == (3, 1, 128, 204)


def test_many_channels_and_non_finite_samples(tmp_path):
    soundfile.write(tmp_path / "six.wav", tone(6), SR, subtype="PCM_16")
    wave, _ = media.read_audio(str(tmp_path / "six.wav"))
    assert wave.shape[0] == 6 and encoder.load_audio(str(tmp_path / "six.wav")).shape == (3, 1, 128, 204)
    x = tone()
    x[100] = np.inf
    soundfile.write(tmp_path / "inf.wav", x, SR, subtype="FLOAT")
    with pytest.raises(media.MediaError, match="inf.wav has non-finite samples"):
        media.read_audio(str(tmp_path / "inf.wav"))


def test_grey_16_bit_palette_and_alpha_images(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode.startswith("I")  # Pillow keeps the 16 bits
    got = np.asarray(media.read_image(str(tmp_path / "grey16.png")))[..., 0].astype(int)
    assert abs(got - np.round(ramp / 257)).max() <= 1 and got.max() > 250  # scaled, not clipped to white
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[8:24, 8:24] = (200, 30, 30)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    rgba = np.dstack([rgb, np.full((32, 32), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    for name in ("palette.png", "alpha.png"):  # as the official convert("RGB"): the colors, alpha dropped
        assert (np.asarray(media.read_image(str(tmp_path / name))) == rgb).all(), name
        assert encoder.load_image(str(tmp_path / name)).shape == (3, 224, 224)


def test_variable_frame_rate_video(tmp_path):
    """Frames 40 ms and 120 ms apart in one stream: read with its average rate, every frame there."""
    path = str(tmp_path / "vfr.mp4")
    with av.open(path, "w") as out:
        s = out.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = fractions.Fraction(1, 1000)
        t = 0
        for k in range(30):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 8 * k, np.uint8), format="rgb24")
            f.pts, f.time_base = t, fractions.Fraction(1, 1000)
            t += 40 if k % 2 else 120
            out.mux(s.encode(f))
        out.mux(s.encode())
    fps, count, get = media.read_video(path)
    assert count == 30 and 5 < fps < 30
    frames = get(list(range(count)))
    assert frames.shape == (30, 48, 64, 3) and frames[-1].mean() > frames[0].mean() + 100
    assert encoder.load_video(path).shape == (15, 3, 2, 224, 224)
