"""experiments/: each experiment at --small on the CI-size world (every variant's wiring, not its findings): it
prints its table and records every number, per seed, as a finite float beside the command that made it."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments"))
                     if f.endswith(".py") and f != "lab.py")


def run(name, *args, timeout=900):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_there_are_experiments():
    assert {"grouping", "decoding_losses", "instruction_tuning", "signal_tokens", "video_decoder", "encoder_steps",
            "output_projector"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_help_runs_nothing(name, tmp_path):
    r = run(name, "--help", f"--out={tmp_path}", timeout=120)
    assert r.returncode == 0 and "--small" in r.stdout, r.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_missing_world_is_one_line(name, tmp_path):
    r = run(name, f"--world={tmp_path / 'nowhere'}", f"--out={tmp_path / 'out'}", timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "python toy.py" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_small_run_reports_every_number(name, small_recipe, tmp_path):
    r = run(name, "--small", f"--world={small_recipe}", f"--out={tmp_path}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    record = json.load(open(tmp_path / f"{name}.json"))
    assert record["experiment"] == name and record["small"] is True
    assert record["date"] and record["commit"] and record["machine"] and record["seconds"] >= 0
    assert record["table"] in r.stdout and record["command"].startswith(f"python experiments/{name}.py")
    assert record["rows"], record
    for variant, cols in record["rows"].items():
        assert set(cols) == set(record["columns"]), (variant, cols)
        for col, values in cols.items():
            assert values and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), (variant, col)
