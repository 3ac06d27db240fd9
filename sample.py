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

import dataclasses
import json
import os
import re
import sys
import time

import torch

import cli
import media
import nextgpt

TOY_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")
# the options that set a nextgpt.GenerationConfig field (--height / --width: images and videos alike)
SETTINGS = ("max_new_tokens", "temperature", "top_p", "seed", "steps", "guidance", "height", "width", "frames",
            "seconds")


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
    p.add_argument("--official-inference", action="store_true",
                   help="the official inference: the prompt ends at 'Assistant:' and the projector reads "
                        "its hidden states one position early")
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
        args.device = pick_device(args.device)
    except ValueError as e:
        p.error(str(e))
    return args


def pick_device(name):
    """A device this machine has: the name given, or the first of cuda, mps, cpu."""
    mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    if name is None:
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        kind = torch.device(name).type
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device name; use cuda, cuda:N, mps or cpu") from None
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not mps):
        raise ValueError(f"--device {name}: this machine has no {kind.upper()} device that torch can use; use "
                         f"--device cpu, or leave --device out to take the first there is")
    if kind not in ("cuda", "mps", "cpu"):
        raise ValueError(f"--device {name}: only cuda, mps and cpu are supported")
    return name


def load(args):
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float16 if device.startswith("cuda") else torch.float32
    if args.tiny_random:
        return nextgpt.tiny_random(args.seed or 0).to(device)
    # on a GPU the backbones wait on the CPU and visit the GPU one at a time (README.md, 'Memory')
    model = nextgpt.NextGPT.from_pretrained(args.ckpt, dtype=dtype, device=device, offload=device != "cpu")
    nextgpt.llm.merge_lora(model.llm)  # inference only: fold LoRA into the base weights, no extra matmuls
    return model


def run(model, args, prompt, images=(), audios=(), videos=(), want=(), tag=""):
    """Generate one reply and write its files (each written whole: to a temporary name, then renamed)."""
    settings = {k: getattr(args, k) for k in SETTINGS}  # None: the model's own (its nextgpt.json, or official)
    out = model.generate(prompt, images=images, audios=audios, videos=videos, want=want,
                         official_inference=args.official_inference or None, **settings)
    given = [os.path.basename(p) for p in (*images, *audios, *videos)]
    print(f"> {prompt}" + (f"  [{', '.join(given)}]" if given else "") + f"\n{out['text']}")
    for w in write_outputs(out, args.out, tag):
        print(f"  wrote {w}")
    return out


def write_outputs(out, folder, tag=""):
    """The reply's text and media as files in folder, each written whole. -> their paths."""
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, tag)
    written = [media.save_text(stem + "reply.txt", out["text"] + "\n")]
    for k, x in enumerate(out["image"]):
        written.append(media.save_image(f"{stem}image_{k}.png", media.to_uint8(x)))
    for k, x in enumerate(out["video"]):
        written.append(media.save_gif(f"{stem}video_{k}.gif", media.to_uint8(x)))
        try:
            written.append(media.save_mp4(f"{stem}video_{k}.mp4", media.to_uint8(x)))
        except Exception as e:  # a PyAV build without an MPEG-4 encoder: the GIF is there
            print(f"  (no mp4: {e})")
    for k, x in enumerate(out["audio"]):
        written.append(media.save_wav(f"{stem}audio_{k}.wav", x.numpy()))
    return written


def showcase(model, args):
    """The checkpoint's example turns (its nextgpt.json's "showcase"), one reply each."""
    t = time.time()
    for k, turn in enumerate(model.showcase):
        run(model, args, turn["prompt"], turn.get("images", ()), turn.get("audios", ()), turn.get("videos", ()),
            turn.get("want", ()), tag=f"{k + 1}_")
    print(f"showcase done in {time.time() - t:.1f} s; files in {args.out}/")


def main(argv):
    args = parse(argv)
    try:
        generate(args)
    except (OSError, ValueError) as e:  # a missing or damaged file, unreadable media: say which, write nothing
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
        return Chat(model, args).loop(sys.stdin)
    if args.prompt is None:
        if model.showcase:
            return showcase(model, args)
        args.prompt, args.want = "Draw a picture, show a video and play a sound.", args.want or list(nextgpt.MODALITIES)
    run(model, args, args.prompt, args.image, args.audio, args.video, args.want)




# ----------------------------------------------------------------------------------------------------------------------
# The chat: several turns, inputs and outputs in any modality

CHAT_HELP = """Type a message and press Enter; its reply streams, then its outputs are drawn and written to --out.
  /image PATH, /video PATH, /audio PATH   attach a file to the next message (or inline: <image:PATH> in the text)
  /want image|video|audio                 the next reply must have that output (forced if the LLM gives none)
  /reset                                  forget the conversation
  /save FILE                              the transcript as JSON: turns, attachments, outputs, settings, seed
  /help                                   this
  /quit (or Ctrl-D)                       end"""


class Chat:
    """
    A conversation with NextGPT in the legacy template (`### Human: ... ### Assistant: ...`, then `Human: ...`). Each
    turn is kept as its text with <image> / <video> / <audio> markers, its reply with its signal tokens and its inputs
    as the LLM tokens they were projected to (never encoded twice). When the next prompt would not fit the LLM's
    context, the oldest turns go, with a notice.
    """

    def __init__(self, model, args, say=print):
        self.model, self.args, self.say = model, args, say
        self.settings = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
        self.history, self.attached, self.want, self.transcript = [], [], [], []

    def loop(self, lines):
        """Read turns and commands until /quit or the end of input (a terminal gets a prompt, a pipe an echo)."""
        tty = lines.isatty()
        self.say("NExT-GPT chat: /help lists the commands" if tty else f"chat on {self.args.ckpt or 'tiny random'}")
        while True:
            try:
                line = input("you> ") if tty else next(lines)
            except (EOFError, StopIteration):
                break
            line = line.strip()
            if not tty and line:
                self.say(f"you> {line}")
            if line and not self.handle(line):
                break
        self.say("bye")

    def handle(self, line):
        """One typed line: a command or a message. False ends the chat. Mistakes are one line each; nothing is lost."""
        if not line.startswith("/"):
            return self.ask(line) or True
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        if command in ("/image", "/video", "/audio"):
            self.attach(command[1:], arg)
        elif command == "/want":
            if arg not in nextgpt.MODALITIES:
                self.say(f"/want takes image, video or audio (got {arg!r})")
            else:
                self.want.append(arg)
        elif command == "/reset":
            self.history, self.attached, self.want = [], [], []
            self.say("(the conversation is forgotten)")
        elif command == "/save":
            self.save(arg)
        elif command == "/help":
            self.say(CHAT_HELP)
        elif command == "/quit":
            return False
        else:
            self.say(f"unknown command {command}; /help lists them")
        return True

    def attach(self, modality, path):
        if not path or not os.path.isfile(path):
            return self.say(f"/{modality} {path}: no such file (nothing attached)")
        try:  # encoded now, so that a bad file is named before the message is typed
            tokens = self.model.encode(modality, nextgpt.LOADERS[modality](path)[None])[0]
        except (OSError, ValueError) as e:
            return self.say(f"/{modality} {path}: {e} (nothing attached)")
        self.attached.append((modality, path, tokens))
        self.say(f"({modality} {os.path.basename(path)} attached to the next message)")

    def ask(self, text):
        for modality, path in re.findall(r"<(image|video|audio):([^>]+)>", text):  # inline attachments
            before = len(self.attached)
            self.attach(modality, path.strip())
            if len(self.attached) == before:
                return
        text = re.sub(r"<(image|video|audio):[^>]+>", r"<\1>", text)
        for m in nextgpt.MODALITIES:  # an attachment without a marker goes before the text
            missing = sum(a[0] == m for a in self.attached) - text.count(f"<{m}>")
            text = f"<{m}> " * max(missing, 0) + text
        inputs = [(m, tokens) for m, _, tokens in self.attached]
        self.fit(text, inputs)
        shown = []

        def stream(reply):
            new = reply[len(shown[0]):] if shown and reply.startswith(shown[0]) else reply if not shown else ""
            print(("nextgpt> " if not shown else "") + new, end="", flush=True)
            shown[:] = [reply]

        g = self.model.generation.override(**self.settings)
        try:
            out = self.model.generate(text, inputs=inputs, history=self.history, want=self.want, config=g,
                                      stream=stream, official_inference=self.args.official_inference or None)
        except ValueError as e:
            return self.say(f"\n({e}; the message is not sent)")
        made = [m for m in nextgpt.MODALITIES if out[m]]
        text_ = "" if shown and shown[0] else f"nextgpt> {out['text'] or '(' + ', '.join(made or ['no reply']) + ')'}"
        print(text_ + "\n", end="", flush=True)
        n = len(self.transcript) + 1
        files = write_outputs(out, self.args.out, f"turn_{n}_")
        for f in files[1:]:
            self.say(f"  wrote {f}")
        self.history.append((text, out["reply"], out["media"]))
        self.transcript.append({"turn": n, "user": text, "attachments": [[m, p] for m, p, _ in self.attached],
                                "want": self.want, "reply": out["text"], "outputs": files[1:]})
        self.attached, self.want = [], []

    def fit(self, text, inputs):
        """Drop the oldest turns while the prompt leaves less room for the reply than it needs."""
        c, g = self.model.config, self.model.generation.override(**self.settings)
        room = sum(c.signal_tokens.values()) + 1 + min(g.max_new_tokens, c.llm.max_seq_len // 4)
        while self.history:
            turns = [(u, r) for u, r, _ in self.history] + [(text, None)]
            past = [x for _, _, media_ in self.history for x in media_] + inputs
            if self.model.prompt_embeds(turns, past).shape[1] + room <= c.llm.max_seq_len:
                return
            self.history.pop(0)
            self.say(f"(the oldest turn is dropped: the conversation no longer fits the LLM's {c.llm.max_seq_len} "
                     "tokens)")

    def save(self, path):
        if not path:
            return self.say("/save takes a file name")
        g = self.model.generation.override(**self.settings)
        record = {"ckpt": self.args.ckpt, "settings": dataclasses.asdict(g), "seed": g.seed, "turns": self.transcript}
        try:
            media.save_text(path, json.dumps(record, indent=1) + "\n")
        except OSError as e:
            return self.say(f"/save {path}: {e.strerror} (not saved)")
        self.say(f"(transcript saved to {path})")


if __name__ == "__main__":
    main(sys.argv[1:])
