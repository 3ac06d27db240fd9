"""
Talk to NExT-GPT over several turns: `python sample.py --chat` (any option of sample.py applies). Each line is a turn;
attachments by command (/image PATH) or inline (<image:PATH>); the reply streams, then its outputs are drawn and
written as turn_N_*. Reads standard input when it is not a terminal, so a session can be scripted:

    python sample.py --chat < session.txt
"""

import dataclasses
import json
import os
import re

import media
import nextgpt

SETTINGS = ("max_new_tokens", "temperature", "top_p", "seed", "steps", "guidance", "height", "width", "frames",
            "seconds")  # the sample.py options that set a nextgpt.GenerationConfig field


CHAT_HELP = """Type a message and press Enter; its reply streams, then its outputs are drawn and written to --out.
  /image PATH, /video PATH, /audio PATH   attach a file to the next message (or inline: <image:PATH> in the text)
  /want image|video|audio                 the next reply must have that output (forced if the LLM gives none)
  /reset                                  forget the conversation
  /save FILE                              the transcript as JSON: turns, attachments, outputs, settings, seed
  /diagnose on|off                        after each reply, a table per output: which stage may have failed
  /bypass on|off                          also draw each output from the decoder's own embedding of the caption
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
        settings = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
        self.generation = model.generation.override(**settings)  # the checkpoint's, then the options given
        self.history, self.attached, self.want, self.transcript = [], [], [], []

    def loop(self, lines):
        """Read turns and commands until /quit or the end of input (a terminal gets a prompt, a pipe an echo)."""
        tty = lines.isatty()
        ckpt = self.args.ckpt and os.path.relpath(self.args.ckpt)
        if ckpt and ckpt.startswith(".."):  # outside the working folder: as given (inside: assets/toy, not a full path)
            ckpt = self.args.ckpt
        self.say("NExT-GPT chat: /help lists the commands" if tty else f"chat on {ckpt or 'tiny random'}")
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
        elif command in ("/diagnose", "/bypass") and arg in ("on", "off"):
            setattr(self.args, "diagnose" if command == "/diagnose" else "caption_bypass", arg == "on")
            self.say(f"({command[1:]} {arg})")
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
        attached = len(self.attached)
        for modality, path in re.findall(r"<(image|video|audio):([^>]+)>", text):  # inline attachments
            before = len(self.attached)
            self.attach(modality, path.strip())
            if len(self.attached) == before:  # named by attach; the message's other inline files go too
                del self.attached[attached:]
                return
        text = re.sub(r"<(image|video|audio):[^>]+>", r"<\1>", text)
        for m in nextgpt.MODALITIES:  # an attachment without a marker goes before the text
            missing = sum(a[0] == m for a in self.attached) - text.count(f"<{m}>")
            text = f"<{m}> " * max(missing, 0) + text
        inputs = [(m, tokens) for m, _, tokens in self.attached]
        self.fit(text, inputs)
        shown = []  # the reply printed so far, once there is one

        def stream(reply):
            if reply is None:  # whole: end its line before the decoders' progress bars
                return print(flush=True) if shown else None
            if reply and not shown:
                print("nextgpt> ", end="")
                shown.append("")
            if shown:
                print(reply[len(shown[0]):] if reply.startswith(shown[0]) else "", end="", flush=True)
                shown[0] = reply

        try:
            out = self.model.generate(text, inputs=inputs, history=self.history, want=self.want, config=self.generation,
                                      stream=stream, official_inference=self.args.official_inference or None,
                                      caption_bypass=self.args.caption_bypass)
        except (ValueError, MemoryError) as e:
            return self.say(f"\n({e}; the message is not sent)")
        if not shown:  # a reply of signal tokens only
            self.say(f"nextgpt> ({', '.join(m for m in nextgpt.MODALITIES if out[m]) or 'no reply'})")
        n = len(self.transcript) + 1
        files = media.save_reply(out, self.args.out, f"turn_{n}_")
        for f in files[1:]:
            self.say(f"  wrote {f}")
        if self.args.diagnose:
            self.say(diagnosis(self.model.diagnose(out)))
        self.history.append((text, out["reply"], out["media"]))
        self.transcript.append({"turn": n, "user": text, "attachments": [[m, p] for m, p, _ in self.attached],
                                "want": self.want, "reply": out["text"], "outputs": files[1:]})
        self.attached, self.want = [], []

    def fit(self, text, inputs):
        """Drop the oldest turns while the prompt leaves less room for the reply than it needs."""
        c, g = self.model.config, self.generation
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
        g = self.generation
        record = {"ckpt": self.args.ckpt, "settings": dataclasses.asdict(g), "seed": g.seed, "turns": self.transcript}
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            media.save_text(path, json.dumps(record, indent=1) + "\n")
        except OSError as e:
            return self.say(f"/save {path}: {e.strerror} (not saved)")
        self.say(f"(transcript saved to {path})")


def diagnosis(rows):
    """NextGPT.diagnose's rows as a table: did the LLM emit the run (or was it forced), is the projector's output of
    the size the decoder's text encoder gives captions, how far is it from the decoder's own embedding of the caption
    (the training's caption alignment; the toy's trained projector is at about 0.2 to 2.5)."""
    if not rows:
        return "  (diagnose: no output to diagnose)"
    lines = ["  | output | signal run | projector norm | captions' norms (min / mean / max) | distance to the caption |"
             " cosine |", "  | --- | --- | --- | --- | --- | --- |"]
    count = {}
    for r in rows:
        k = count[r["modality"]] = count.get(r["modality"], -1) + 1
        run = f"token {r['position']}, " + ("forced by --want" if r["forced"] else "by the LLM")
        norms = " / ".join(f"{v:.2f}" for v in r["caption_norms"])
        dist = f"{r['distance']:.3f} ({r['caption']!r})" if "distance" in r else "(no caption)"
        cos = f"{r['cosine']:.4f}" if "cosine" in r else ""
        lines.append(f"  | {r['modality']}_{k} | {run} | {r['norm']:.2f} | {norms} | {dist} | {cos} |")
    return "\n".join(lines)
