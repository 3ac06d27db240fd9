"""
Generate with NExT-GPT from the command line: any mix of text, images, video and audio in; text, images, video and
audio out.

    python sample.py                                        # the toy checkpoint's showcase (see README.md)
    python sample.py --prompt "What is in it?" --image cat.png --audio rain.wav
    python sample.py --prompt "Show me a dog running" --want video --ckpt checkpoints --device cuda
    python sample.py --tiny-random --prompt "draw" --want image,video,audio    # every path, random tiny weights

Writes reply.txt, image_N.png, video_N.gif (and .mp4), audio_N.wav into --out. The generation settings are the
official ones (nextgpt.GenerationConfig), then what the checkpoint's nextgpt.json names, then the options given here.
"""

import os
import sys
import time

import torch

import chat
import cli
import decoders
import media
import nextgpt

TOY_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")
SETTINGS = chat.SETTINGS  # the options that set a nextgpt.GenerationConfig field (--height / --width: both sizes)


def parse(argv):
    p = cli.parser("sample.py", __doc__)
    p.add_argument("--prompt", help="the user's message; <image> / <video> / <audio> mark where inputs sit "
                   "(default: the checkpoint's showcase)")
    p.add_argument("--chat", action="store_true", help="a conversation: each line a turn (/help lists the commands); "
                   "reads standard input when it is not a terminal")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an input image (repeatable)")
    p.add_argument("--audio", action="append", default=[], metavar="PATH",
                   help="an input audio file: wav, flac, ogg (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="PATH",
                   help="an input video: mp4, webm, mov, gif (repeatable)")
    p.add_argument("--want", default="", metavar="LIST",
                   help="outputs to force if the reply has none: image,video,audio")
    p.add_argument("--ckpt", default=None, help="a folder with the official files or a nextgpt.json (default: the toy, "
                   "assets/toy)")
    p.add_argument("--out", default="out", help="output folder (default: out)")
    g = p.add_argument_group("generation (default: the official settings, or what the checkpoint's nextgpt.json names)")
    g.add_argument("--max-new-tokens", type=int, help="reply length limit (official: 246)")
    g.add_argument("--temperature", type=float, help="0: greedy (official)")
    g.add_argument("--top-p", type=float, help="nucleus sampling (official: 1.0)")
    g.add_argument("--seed", type=int, help="the LLM's sampling and decoder k's noise (seed + k) (default: 0)")
    g.add_argument("--steps", type=int, help="denoising steps of every decoder (official: 50)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale of every decoder (official: 7.5)")
    g.add_argument("--height", type=int, help="image and video height (official: 512 image, 320 video)")
    g.add_argument("--width", type=int, help="image and video width (official: 512 image, 576 video)")
    g.add_argument("--frames", type=int, help="video frames (official: 24)")
    g.add_argument("--seconds", type=float, help="audio length (official: 9)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first there is)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on cuda, float32 elsewhere")
    p.add_argument("--quantize", default="none", choices=["none", "int8"], help="int8: the LLM's linear layers in "
                   "int8, a scale per output row (llm.quantize_int8); the embedding stays (default: none)")
    p.add_argument("--diagnose", action="store_true", help="after each reply, a table per output: whether the LLM "
                   "emitted its signal tokens, the projector's output against the decoder's own caption embeddings")
    p.add_argument("--caption-bypass", action="store_true", help="also draw each output from the decoder's own text "
                   "embedding of the reply's caption (image_0.bypass.png beside image_0.png)")
    p.add_argument("--official-inference", action="store_true",
                   help="the official inference: the prompt ends at 'Assistant:' and the projector reads "
                        "its hidden states one position early")
    p.add_argument("--keep-decoders", action="store_true", help="keep each decoder in memory after its first use "
                   "(faster for many replies; by default one decoder at a time holds memory)")
    p.add_argument("--tiny-random", action="store_true", help="random tiny weights: a smoke test of every path")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: NEXTGPT_DEBUG=1)")
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
    try:  # the settings' rules, before anything loads (the checkpoint's own settings are checked when it loads)
        nextgpt.GenerationConfig().override(**{k: getattr(args, k) for k in SETTINGS})
    except ValueError as e:
        name, _, rest = str(e).partition(" ")
        rest = rest.split(") ", 1)[1] if rest.startswith("(") else rest  # --height / --guidance: every modality's
        p.error(f"--{name.replace('_', '-')} {rest}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; give a folder (it is made if missing)")
    parent = args.out if os.path.isdir(args.out) else os.path.dirname(os.path.abspath(args.out))
    while not os.path.isdir(parent):  # the nearest folder that exists: the rest is made
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        p.error(f"--out {args.out}: {parent} is not writable; give a folder you can write to")
    try:
        args.device = cli.device(args.device)
    except ValueError as e:
        p.error(str(e))
    return args


def load(args):
    device = args.device
    if args.tiny_random:
        model = nextgpt.tiny_random(args.seed or 0).to(device)
    else:
        dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(args.ckpt, device)
        # on a GPU the backbones wait on the CPU and visit the GPU one at a time (README.md, 'Memory')
        model = nextgpt.NextGPT.from_pretrained(args.ckpt, dtype=dtype, device=device, offload=device != "cpu",
                                                keep_decoders=args.keep_decoders)
        nextgpt.llm.merge_lora(model.llm)  # inference only: fold LoRA into the base weights, no extra matmuls
    if args.quantize == "int8":  # of the merged weights
        nextgpt.llm.quantize_int8(model.llm)
    return model


def default_dtype(ckpt, device):
    """float16 on a GPU; on the CPU float32 where it fits in the memory free now, else bfloat16 (said in one line).
    The estimate: the checkpoint's weight files at 4 bytes a number (they hold 2 or 4), the decoders but the largest
    left out (one at a time holds memory)."""
    if device.startswith("cuda"):
        return torch.float16
    free = decoders.free_memory(device) if device == "cpu" else None
    if free is None:
        return torch.float32
    sizes = {}
    for root, _, names in os.walk(ckpt, followlinks=True):
        part = os.path.relpath(root, ckpt).split(os.sep)[0]
        sizes[part] = sizes.get(part, 0) + sum(os.path.getsize(os.path.join(root, n)) for n in names
                                               if n.endswith((".safetensors", ".bin", ".pt", ".pth")))
    decoder_parts = [v for k, v in sizes.items() if k in ("stable-diffusion-v1-5", "zeroscope_v2_576w",
                                                          "audioldm-l-full", "image", "video", "audio")]
    need = 2 * (sum(sizes.values()) - sum(decoder_parts) + max(decoder_parts, default=0))
    if need < 0.8 * free:
        return torch.float32
    print(f"sample.py: in float32 the model needs about {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are free: "
          "loading in bfloat16 (--dtype float32 insists)")
    return torch.bfloat16


def run(model, args, prompt, images=(), audios=(), videos=(), want=(), tag="", history=()):
    """Generate one reply and write its files (each written whole: to a temporary name, then renamed)."""
    settings = {k: getattr(args, k) for k in SETTINGS}  # None: the model's own (its nextgpt.json, or official)
    out = model.generate(prompt, images=images, audios=audios, videos=videos, want=want, history=history,
                         official_inference=args.official_inference or None, caption_bypass=args.caption_bypass,
                         **settings)
    given = [os.path.basename(p) for p in (*images, *audios, *videos)]
    print(f"> {prompt}" + (f"  [{', '.join(given)}]" if given else "") + f"\n{out['text']}")
    for w in media.save_reply(out, args.out, tag):
        print(f"  wrote {w}")
    if args.diagnose:
        print(chat.diagnosis(model.diagnose(out)))
    return out


def showcase(model, args):
    """The checkpoint's example turns (its nextgpt.json's "showcase"), one reply each; a dialogue's turns each see
    the turns before them, as in --chat."""
    t = time.time()
    for k, entry in enumerate(model.showcase):
        history = []
        for j, turn in enumerate(entry.get("turns", [entry])):
            tag = f"{k + 1}{chr(ord('a') + j) if 'turns' in entry else ''}_"  # 1_image_0.png; a dialogue's 6a_, 6b_
            out = run(model, args, turn["prompt"], turn.get("images", ()), turn.get("audios", ()),
                      turn.get("videos", ()), turn.get("want", ()), tag=tag, history=history)
            history.append((turn["prompt"], out["reply"], out["media"]))
    print(f"showcase done in {time.time() - t:.1f} s; files in {args.out}/")


def main(argv):
    args = parse(argv)
    try:
        generate(args)
    except (OSError, ValueError, MemoryError) as e:  # a missing or damaged file, unreadable media, too big a request
        if args.debug or os.environ.get("NEXTGPT_DEBUG"):
            raise
        sys.exit(f"sample.py: {e}")
    except KeyboardInterrupt:
        sys.exit("sample.py: interrupted (the files written so far are whole)")


def generate(args):
    if args.ckpt is None and not args.tiny_random:
        if os.path.isfile(os.path.join(TOY_CKPT, nextgpt.MANIFEST)):
            args.ckpt = TOY_CKPT
        else:
            print("sample.py: no --ckpt given and the toy checkpoint (assets/toy) is not there, so this runs on "
                  "random tiny weights (--tiny-random): every path works, the outputs are noise. For real outputs "
                  "pass --ckpt with the official files (README.md, 'Weights').")
            args.tiny_random = True
    model = load(args)
    if args.chat:
        return chat.Chat(model, args).loop(sys.stdin)
    if args.prompt is None:
        if model.showcase:
            return showcase(model, args)
        args.prompt, args.want = "Draw a picture, show a video and play a sound.", args.want or list(nextgpt.MODALITIES)
    run(model, args, args.prompt, args.image, args.audio, args.video, args.want)


if __name__ == "__main__":
    main(sys.argv[1:])
