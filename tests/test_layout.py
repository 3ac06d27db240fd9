"""The house: layers that point down only, and command lines that behave (--help runs nothing, a bad option is an
error that runs nothing)."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# who may import whom: a file imports only project modules of a lower layer
LAYERS = {"weights": 0, "cli": 0, "bpe": 1, "media": 1, "samplers": 1, "vicuna": 2, "llm": 3, "encoder": 3,
          "decoders": 3, "grouping": 4, "nextgpt": 5, "train": 6, "chat": 6, "sample": 7, "toy": 8, "bench": 8}
ABOVE_ALL = {"tests", "experiments", "conftest", "reference", "grouping_data"}  # nothing in the library imports these


def imported_modules(path):
    """Every module name an `import` or `from ... import` in the file names, at any depth (function-level too)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_imports_point_down(module):
    project = set(LAYERS) | ABOVE_ALL
    found = imported_modules(os.path.join(ROOT, module + ".py")) & project
    upward = sorted(m for m in found if m in ABOVE_ALL or LAYERS[m] >= LAYERS[module])
    if module == "bench":  # its reference side is the tests' (transformers, diffusers, open_clip): never the library's
        upward = [m for m in upward if m != "reference"]
    assert not upward, f"{module}.py imports {upward}: layers point down only (tests/test_layout.py, LAYERS)"


def test_every_python_file_has_a_layer():
    files = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert files == set(LAYERS), f"give {sorted(files ^ set(LAYERS))} a layer in tests/test_layout.py"


def cli(tool, *args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, os.path.join(ROOT, tool), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("tool, options", [("sample.py", ["--prompt", "--want", "--steps", "--tiny-random"]),
                                           ("train.py", ["--stage", "--max-steps", "--tiny-random", "--config"]),
                                           ("bench.py", ["--only", "--repeats", "--threads"])])
def test_help_lists_the_options_and_runs_nothing(tool, options, tmp_path):
    r = cli(tool, "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert all(o in r.stdout for o in options), r.stdout
    assert "(default:" in r.stdout or tool == "sample.py"  # the generated options say their defaults
    assert not os.listdir(tmp_path), "--help wrote files"


@pytest.mark.parametrize("tool, args", [("sample.py", ["--no-such-option"]), ("sample.py", ["--steps", "many"]),
                                        ("sample.py", ["--want", "smell"]), ("train.py", ["--no-such-option"]),
                                        ("train.py", ["--lr=fast"]), ("train.py", ["stage=1"]),
                                        ("bench.py", ["--no-such-option"]), ("bench.py", ["--repeats", "0"])])
def test_bad_option_is_a_one_line_error_that_runs_nothing(tool, args, tmp_path):
    r = cli(tool, *args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and f"{tool}: error:" in r.stderr.strip().splitlines()[-1], r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2  # the short usage line and the reason
    assert not os.listdir(tmp_path) and not r.stdout
