import os
import sys

import pytest

# the project is a flat folder of modules: make them importable from tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def tiny_sp_model(tmp_path_factory):
    """A sentencepiece model of exactly 256 pieces (LLaMAConfig.preset('tiny').vocab_size), trained here."""
    import random

    import sentencepiece as spm
    rng = random.Random(0)
    words = ["a", "red", "green", "blue", "yellow", "circle", "square", "triangle", "moving", "left", "right", "up",
             "down", "beep", "beeps", "high", "low", "two", "three", "one", "draw", "show", "play", "describe",
             "this", "image", "video", "audio", "the", "of", "and", "sound", "picture", "Human", "Assistant", "###"]
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(400)]
    d = tmp_path_factory.mktemp("tiny_sp")
    (d / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tok"), vocab_size=256,
                                   model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, user_defined_symbols=["###", "\n"], normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    return str(d / "tok.model")


@pytest.fixture(scope="session")
def small_recipe(tmp_path_factory):
    """The whole toy recipe at CI size (toy.py --small --recipe: world, backbones, stages 1-3, eval), run once: its
    test (tests/test_toy.py) reads the outputs, and experiments/ run on its world (data/ and backbones/). In its own
    process, so that toy.py's settings (one torch thread, its seed, its SIGTERM handler) stay out of the other tests."""
    import subprocess
    out = tmp_path_factory.mktemp("small_recipe")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "toy.py"), f"--out={out}", "--small", "--recipe"], cwd=root,
                   check=True)
    return str(out)
