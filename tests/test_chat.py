"""sample.py --chat: turns with history (earlier inputs kept as their tokens), attachments, commands, truncation of the
oldest turns, the transcript; scripted through standard input as a user would pipe it."""

import io
import json
import os
import random
import subprocess
import sys
from dataclasses import replace

import numpy as np
from PIL import Image

import chat
import nextgpt
import sample
import toy

TOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy")


def session(model, lines, out, *flags):
    args = sample.parse(["--chat", "--out", str(out), *flags])
    said = []
    c = chat.Chat(model, args, say=said.append)
    c.loop(io.StringIO("".join(line + "\n" for line in lines)))
    return c, said


def test_three_turns_on_the_toy(tmp_path, capsys, monkeypatch):
    """Describe an image, then two generations in the same conversation: each reply streams, each output is written
    as turn_N_*, and every later prompt carries the earlier turns (with the image as its tokens, encoded once)."""
    model = nextgpt.NextGPT.from_pretrained(TOY)
    encoded, prompts = [], []
    real_encode, real_embeds = model.encode, model.prompt_embeds
    monkeypatch.setattr(model, "encode", lambda *a: encoded.append(a[0]) or real_encode(*a))
    monkeypatch.setattr(model, "prompt_embeds", lambda turns, *a, **k: prompts.append(turns) or real_embeds(turns, *a,
                                                                                                            **k))
    c, said = session(model, [f"/image {TOY}/example.png", "Describe this image.", "/want image", "Now draw it.",
                           "/want audio", "Now play its sound."], tmp_path)
    printed = capsys.readouterr().out
    assert "nextgpt> a green triangle" in printed  # the streamed reply of turn 1
    assert encoded == ["image"]  # the attachment, once; later turns reuse its tokens
    # each prompt holds the turns before it (measured once by the chat's fit, once by generate, from turn 2 on)
    assert [len(p) for p in prompts] == [1, 2, 2, 3, 3]
    assert prompts[-1][0][0] == "<image> Describe this image." and prompts[-1][1][0] == "Now draw it."
    assert os.path.isfile(tmp_path / "turn_2_image_0.png") and os.path.isfile(tmp_path / "turn_3_audio_0.wav")
    assert any("turn_2_image_0.png" in s for s in said) and said[-1] == "bye"
    with Image.open(tmp_path / "turn_2_image_0.png") as im:
        assert im.size == (32, 32)
    assert [t["reply"] for t in c.transcript][0] == "a green triangle"


def test_commands_mistakes_reset_save_and_end_of_input(tmp_path):
    """A bad attachment or command is one line and the session goes on; /reset forgets; /save writes the transcript;
    the end of standard input ends the chat."""
    model = nextgpt.tiny_random(0)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    good = tmp_path / "red.png"
    Image.fromarray(toy.make_image(random.Random(0), "red", "circle")).save(good)
    saved = tmp_path / "chat.json"
    c, said = session(model, ["hello", f"/image {tmp_path}/nope.png", f"/image {broken}", "/want smell", "/frobnicate",
                           f"what is in <image:{good}>?", f"/save {saved}", "/reset", "again", "/help"], tmp_path / "o")
    assert any("nope.png: no such file" in s for s in said)
    assert any("broken.png: cannot read image" in s for s in said)
    assert any("/want takes image, video or audio" in s for s in said)
    assert any("unknown command /frobnicate" in s for s in said)
    assert any("(the conversation is forgotten)" in s for s in said) and any("/image PATH" in s for s in said)
    assert len(c.history) == 1 and c.history[0][0] == "again"  # after /reset only the last turn
    record = json.loads(saved.read_text())  # written before /reset: the two turns then
    assert [t["user"] for t in record["turns"]] == ["hello", "what is in <image>?"]
    assert record["turns"][1]["attachments"] == [["image", str(good)]]
    assert record["seed"] == 0 and record["settings"]["steps"] == model.generation.steps
    assert said[-1] == "bye"  # the input ended without /quit


def test_the_oldest_turns_go_when_the_context_is_full(tmp_path):
    model = nextgpt.tiny_random(0)
    model.config.llm = replace(model.config.llm, max_seq_len=120)  # a short context: two turns of ~30 tokens fit
    c, said = session(model, [f"turn {k} " + "word " * 6 for k in range(6)], tmp_path, "--max-new-tokens", "8")
    assert any("the oldest turn is dropped" in s for s in said)
    assert 1 <= len(c.history) < 6 and c.history[-1][0].startswith("turn 5")
    assert len(c.transcript) == 6  # every reply was made: none failed for want of room


def test_chat_reads_a_pipe_from_the_command_line(tmp_path):
    """`sample.py --chat < session.txt` as a subprocess: the transcript is printed, files are written."""
    session = "Draw a red circle.\n/quit\nnever read\n"
    root = os.path.dirname(os.path.dirname(TOY))
    r = subprocess.run([sys.executable, os.path.join(root, "sample.py"), "--chat", "--out", str(tmp_path)],
                       input=session, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "you> Draw a red circle." in r.stdout and "nextgpt> a red circle" in r.stdout
    assert "never read" not in r.stdout and r.stdout.strip().endswith("bye")
    img = np.asarray(Image.open(tmp_path / "turn_1_image_0.png").convert("RGB"))
    assert toy.measure_color(img) == "red"
