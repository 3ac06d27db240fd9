"""
Media files in and out, the one place that knows file formats: images through Pillow, GIFs through Pillow, other
video (mp4, webm, mov, ...) through PyAV, audio (WAV, FLAC, OGG) through soundfile. No torchcodec, no decord.

Arrays, the layout every reader returns and every writer takes:
    image (H, W, 3) uint8 | video (F, H, W, 3) uint8 | audio (samples,) float32 in [-1, 1] (readers: (C, samples))
Every writer writes whole: to a temporary name in the same folder, then renamed, so no partial file ever sits under
the final name (a reader of the folder sees the old file or the new one).
"""

import os

import av
import numpy as np
import soundfile
import torch
from PIL import Image, ImageSequence

GIF_FPS = 8  # what the writers use: the toy world's 8-frame clips last one second
MAX_SECONDS = 3600  # longer audio and video is refused: every frame would be decoded to pick a few clips


class MediaError(ValueError):
    """A media file that cannot be read: the message names the file and the reason."""


def check_file(path, kind):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} file not found: {path}")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{kind} file is empty (0 bytes): {path}")


# ----------------------------------------------------------------------------------------------------------------------
# Readers

def read_image(path):
    """-> a PIL RGB image. Palette, grey and alpha images become RGB as the official code has them (convert("RGB"):
    alpha dropped); 16-bit and 32-bit grey ones are scaled to 8 bits first (convert would clip them to white)."""
    check_file(path, "image")
    try:
        with Image.open(path) as f:
            if f.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                a = np.asarray(f, dtype=np.float64)
                if not np.isfinite(a).all():
                    raise MediaError(f"image {path} has non-finite pixels (NaN or infinity)")
                top = 1.0 if f.mode == "F" and a.max() <= 1.0 else 65535.0 if f.mode != "F" else 255.0
                f = Image.fromarray((a.clip(0, top) / top * 255).round().astype(np.uint8))
            return f.convert("RGB")
    except MediaError:
        raise
    except Exception as e:  # PIL.UnidentifiedImageError, truncated files, decompression bombs, ...
        raise MediaError(f"cannot read image {path}: {e}") from e


def read_video(path):
    """-> (fps, frame count, get(indices) -> (T, H, W, 3) uint8 array). GIFs through Pillow, the rest through PyAV."""
    check_file(path, "video")
    if str(path).lower().endswith(".gif"):  # decord (official) cannot open GIFs; this is an extension
        try:
            with Image.open(path) as im:
                frames = [(np.asarray(f.convert("RGB")), f.info.get("duration") or 0)
                          for f in ImageSequence.Iterator(im)]
        except Exception as e:
            raise MediaError(f"cannot read GIF {path}: {e}") from e
        ms = sum(d for _, d in frames)
        fps = 1000.0 * len(frames) / ms if ms > 0 else 10.0  # no timing: 10 fps, ffmpeg's GIF default
        return fps, len(frames), lambda idx: np.stack([frames[i][0] for i in idx])

    def decode(keep):  # {index: (H, W, 3)} for the frames in keep, in one pass over the stream
        with av.open(path) as container:
            return {i: f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i in keep}

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"no video stream in {path}")
            stream = container.streams.video[0]
            rate, count = stream.average_rate or stream.guessed_rate, stream.frames
        if count <= 0:  # some containers (webm) do not store the frame count: count by decoding (no arrays kept)
            with av.open(path) as container:
                count = sum(1 for _ in container.decode(video=0))
    except av.FFmpegError as e:
        raise MediaError(f"cannot read video {path}: {e}") from e
    if not rate or count == 0:
        raise MediaError(f"video has no frames: {path}")
    if count / float(rate) > MAX_SECONDS:
        raise MediaError(f"video {path} lasts {count / float(rate):.0f} s: at most {MAX_SECONDS} s are read "
                         "(ImageBind looks at five 2 s clips); cut it first")

    def get(idx):
        try:
            frames = decode(set(idx))
        except av.FFmpegError as e:  # a damaged frame after a good header
            raise MediaError(f"cannot decode video {path}: {e}") from e
        if not frames:
            raise MediaError(f"video has no decodable frames: {path}")
        last = frames[max(frames)]  # the stored frame count may overstate: fall back on the last decoded frame
        return np.stack([frames.get(i, last) for i in idx])

    return float(rate), count, get


def read_audio(path):
    """-> (waveform (C, N) float32 in [-1, 1], sample rate), like torchaudio.load."""
    check_file(path, "audio")
    try:
        info = soundfile.info(path)
        if info.frames > MAX_SECONDS * info.samplerate:
            raise MediaError(f"audio {path} lasts {info.frames / info.samplerate:.0f} s: at most {MAX_SECONDS} s are "
                             "read (ImageBind looks at three 2 s clips); cut it first")
        data, sr = soundfile.read(path, dtype="float32", always_2d=True)  # (N, C), ints scaled as torchaudio does
    except MediaError:
        raise
    except Exception as e:  # soundfile.LibsndfileError and friends
        raise MediaError(f"cannot read audio {path}: {e}") from e
    if not np.isfinite(data).all():
        raise MediaError(f"audio {path} has non-finite samples (NaN or infinity)")
    return torch.from_numpy(data.T.copy()), sr


# ----------------------------------------------------------------------------------------------------------------------
# Writers

def to_uint8(x):
    """Pixels in [0, 1], image (3, H, W) or video (F, 3, H, W) -> (H, W, 3) / (F, H, W, 3) uint8."""
    return (x.clamp(0, 1).movedim(-3, -1).float().numpy() * 255).round().astype(np.uint8)


def write_whole(path, save):
    """save(tmp_path) writes the file; it appears under path only once complete."""
    root, ext = os.path.splitext(str(path))
    tmp = f"{root}.part{ext}"  # the extension kept: Pillow and PyAV choose the format by it
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return str(path)


def save_text(path, text):
    def save(p):
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
    return write_whole(path, save)


def save_image(path, image):
    """(H, W, 3) uint8 -> PNG (or whatever the extension names)."""
    return write_whole(path, lambda p: Image.fromarray(image).save(p))


def save_gif(path, frames, fps=GIF_FPS):
    """(F, H, W, 3) uint8 -> an endlessly looping GIF."""
    pil = [Image.fromarray(f) for f in frames]
    return write_whole(path, lambda p: pil[0].save(p, save_all=True, append_images=pil[1:],
                                                   duration=round(1000 / fps), loop=0))


def save_mp4(path, frames, fps=GIF_FPS):
    """(F, H, W, 3) uint8 -> MPEG-4 Part 2 in mp4 (in every ffmpeg build, h264 is not); odd sizes cropped to even."""
    H, W = frames.shape[1:3]

    def save(p):
        with av.open(p, "w", format="mp4") as out:
            stream = out.add_stream("mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = W - W % 2, H - H % 2, "yuv420p"  # yuv420p: even sizes
            for f in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(f[:H - H % 2, :W - W % 2], format="rgb24")))
            out.mux(stream.encode())

    return write_whole(path, save)


def save_wav(path, wave, sample_rate=16000):
    """(samples,) float in [-1, 1] -> 16-bit PCM WAV."""
    wave = np.clip(np.asarray(wave, dtype=np.float32), -1, 1)
    return write_whole(path, lambda p: soundfile.write(p, wave, sample_rate, subtype="PCM_16", format="WAV"))


def save_reply(out, folder, tag=""):
    """What NextGPT.generate returns as files in folder: tag + reply.txt, image_N.png, video_N.gif (and .mp4 where
    this PyAV can encode MPEG-4), audio_N.wav, and the caption-bypass outputs beside them (image_N.bypass.png, ...).
    -> their paths."""
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, tag)
    written = [save_text(stem + "reply.txt", out["text"] + "\n")]
    for k, x in enumerate(out["image"]):
        written.append(save_image(f"{stem}image_{k}.png", to_uint8(x)))
    for k, x in enumerate(out["video"]):
        written.append(save_gif(f"{stem}video_{k}.gif", to_uint8(x)))
        try:
            written.append(save_mp4(f"{stem}video_{k}.mp4", to_uint8(x)))
        except Exception as e:  # a PyAV build without an MPEG-4 encoder: the GIF is there
            print(f"  (no mp4: {e})")
    for k, x in enumerate(out["audio"]):
        written.append(save_wav(f"{stem}audio_{k}.wav", x.numpy()))
    bypass = out.get("bypass", {})  # drawn from the decoder's own embedding of the caption
    written += [save_image(f"{stem}image_{k}.bypass.png", to_uint8(x)) for k, x in enumerate(bypass.get("image", []))]
    written += [save_gif(f"{stem}video_{k}.bypass.gif", to_uint8(x)) for k, x in enumerate(bypass.get("video", []))]
    written += [save_wav(f"{stem}audio_{k}.bypass.wav", x.numpy()) for k, x in enumerate(bypass.get("audio", []))]
    return written
