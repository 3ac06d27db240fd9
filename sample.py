"""
Generate with NExT-GPT from the command line: any mix of text, images, video and audio in; text, images, video and
audio out.

    python sample.py                                        # the built-in showcase (see README.md)
    python sample.py --prompt "What is in it?" --image cat.png --audio rain.wav
    python sample.py --prompt "Show me a dog running" --want video --ckpt checkpoints --device cuda
    python sample.py --tiny-random --prompt "draw" --want image,video,audio    # every path, random tiny weights

Writes reply.txt, image_N.png, video_N.gif (and .mp4 when PyAV can encode), audio_N.wav into --out.
"""

import argparse
import os
import sys
import time

import torch

import nextgpt

TOY_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", help="the user's message; <image> / <video> / <audio> mark where inputs sit")
    p.add_argument("--image", action="append", default=[], help="an input image (repeatable)")
    p.add_argument("--audio", action="append", default=[], help="an input audio file: wav, flac (repeatable)")
    p.add_argument("--video", action="append", default=[], help="an input video: mp4, webm, mov, gif (repeatable)")
    p.add_argument("--ckpt", default=None, help="a folder with the official files or a nextgpt.json (default: the toy)")
    p.add_argument("--out", default="out", help="output folder")
    p.add_argument("--want", default="", help="outputs to force if the reply has none: image,video,audio")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (official: 50)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (official: 7.5)")
    p.add_argument("--frames", type=int, default=None, help="video frames (official: 24)")
    p.add_argument("--seconds", type=float, default=None, help="audio length in seconds (official: 9)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 246 (the demo's), 24 with --tiny-random")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first there is)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on cuda, float32 elsewhere")
    p.add_argument("--official-inference", action="store_true",
                   help="the official inference: the prompt ends at 'Assistant:' and the projector reads "
                        "its hidden states one position early")
    p.add_argument("--tiny-random", action="store_true", help="random tiny weights: a smoke test of every path")
    args = p.parse_args(argv)
    want = [w.strip() for w in args.want.split(",") if w.strip()]
    bad = [w for w in want if w not in nextgpt.MODALITIES]
    if bad:
        p.error(f"--want takes image, video, audio; not {', '.join(bad)}")
    args.want = want
    for kind in ("image", "audio", "video"):
        for path in getattr(args, kind):
            if not os.path.isfile(path):
                p.error(f"--{kind} {path}: no such file")
    return args


def pick_device(name):
    if name:
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load(args):
    device = pick_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device == "cuda" else torch.float32)
    if args.tiny_random:
        import toy  # the random tiny model lives with the toy world
        return toy.tiny_random(args.seed).to(device), dict(steps=4, guidance=7.5, frames=4, seconds=0.2,
                                                           height=32, width=32, max_new_tokens=24)
    # on a GPU the backbones wait on the CPU and visit the GPU one at a time (README.md, 'Memory')
    model = nextgpt.NextGPT.from_pretrained(args.ckpt, dtype=dtype, device=device, offload=device != "cpu")
    nextgpt.llm.merge_lora(model.llm)  # inference only: fold LoRA into the base weights, no extra matmuls
    # the official settings, unless the checkpoint's nextgpt.json says what it was made for (the toy: 32 px, 8 frames)
    return model, dict(dict(steps=50, guidance=7.5, frames=24, seconds=9.0, max_new_tokens=246),
                       **model.sample_defaults)


def run(model, defaults, args, prompt, images=(), audios=(), videos=(), want=(), tag=""):
    """Generate one reply and write its files (each written whole: to a temporary name, then renamed)."""
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults.get(name)  # noqa: E731
    out = model.generate(prompt, images=images, audios=audios, videos=videos, want=want,
                         max_new_tokens=pick("max_new_tokens"), temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, steps=pick("steps"), guidance=pick("guidance"), height=pick("height"),
                         width=pick("width"), frames=pick("frames"), seconds=pick("seconds"),
                         official_inference=args.official_inference or None)
    print(f"{tag}{out['text']}")
    os.makedirs(args.out, exist_ok=True)
    written = [write(os.path.join(args.out, f"{tag}reply.txt"), "text", out["text"] + "\n")]
    for kind in nextgpt.MODALITIES:
        for k, x in enumerate(out[kind]):
            written += write_media(os.path.join(args.out, f"{tag}{kind}_{k}"), kind, x)
    for w in written:
        print(f"  wrote {w}")
    return out


def write(path, kind, data):
    tmp = path + ".part"
    if kind == "text":
        with open(tmp, "w") as f:
            f.write(data)
    else:
        data(tmp)
    os.replace(tmp, path)
    return path


def write_media(stem, kind, x):
    """x: image (3, H, W) / video (F, 3, H, W) in [0, 1]; audio (samples,) at 16 kHz."""
    import numpy as np
    from PIL import Image
    if kind == "image":
        img = Image.fromarray((x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        return [write(stem + ".png", "png", lambda p: img.save(p, format="PNG"))]
    if kind == "video":
        frames = (x.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (F, H, W, 3)
        pil = [Image.fromarray(f) for f in frames]
        paths = [write(stem + ".gif", "gif", lambda p: pil[0].save(p, format="GIF", save_all=True,
                                                                   append_images=pil[1:], duration=125, loop=0))]
        try:
            paths.append(write(stem + ".mp4", "mp4", lambda p: write_mp4(p, frames)))
        except Exception as e:  # PyAV missing or without an encoder: the GIF is there
            print(f"  (no mp4: {e})")
        return paths
    import soundfile
    wave = x.clamp(-1, 1).numpy()
    return [write(stem + ".wav", "wav", lambda p: soundfile.write(p, wave, 16000, subtype="PCM_16", format="WAV"))]


def write_mp4(path, frames, fps=8):
    import av
    H, W = frames.shape[1:3]
    with av.open(path, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)  # mpeg4 is in every ffmpeg build; h264 is not
        stream.width, stream.height = W - W % 2, H - H % 2
        stream.pix_fmt = "yuv420p"
        for f in frames:
            frame = av.VideoFrame.from_ndarray(f[:H - H % 2, :W - W % 2], format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def showcase(model, defaults, args):
    """The built-in default: a short tour of every modality."""
    t = time.time()
    run(model, defaults, args, "Describe this image.", images=[os.path.join(TOY_CKPT, "example.png")], tag="1_")
    run(model, defaults, args, "Draw a red circle.", want=["image"], tag="2_")
    run(model, defaults, args, "Show a blue square moving left.", want=["video"], tag="3_")
    run(model, defaults, args, "Play two high beeps.", want=["audio"], tag="4_")
    print(f"showcase done in {time.time() - t:.1f} s; files in {args.out}/")


def main(argv):
    args = parse(argv)
    if args.ckpt is None and not args.tiny_random:
        if os.path.isfile(os.path.join(TOY_CKPT, nextgpt.MANIFEST)):
            args.ckpt = TOY_CKPT
        else:
            print("sample.py: no --ckpt given and the toy checkpoint (assets/toy) is not built yet, so this runs on "
                  "random tiny weights (--tiny-random): every path works, the outputs are noise. For real outputs "
                  "pass --ckpt with the official files (README.md, 'Weights').")
            args.tiny_random = True
    try:
        model, defaults = load(args)
    except FileNotFoundError as e:
        sys.exit(f"sample.py: {e}")
    if args.prompt is None:
        if args.ckpt == TOY_CKPT:
            return showcase(model, defaults, args)
        args.prompt, args.want = "Draw a picture, show a video and play a sound.", args.want or list(nextgpt.MODALITIES)
    try:
        run(model, defaults, args, args.prompt, args.image, args.audio, args.video, args.want)
    except (ValueError, OSError) as e:  # unreadable media, bad markers: name the problem, write nothing
        sys.exit(f"sample.py: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
