"""Every benchmark runs end to end on the smallest settings and prints its table (their figures
are measured by hand: a timed test would fail on a busy machine, not on a slow library)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

RUNS = {
    "overhead": (["--rounds", "1", "--tasks", "2", "--paired-steps", "40"], "paired"),
    "loss_methods": (["--rounds", "1", "--paired-steps", "40"], "FAMO"),
    "gradient_methods": (["--rounds", "1", "--tasks", "2", "--methods", "mgda"], "mgda"),
    "step_sections": (["--fits", "1"], "host weights"),
    "logging_overhead": (["--rounds", "1", "--tasks", "2", "--steps", "40"], "median"),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_the_benchmark_runs_and_prints_its_table(name, tmp_path):
    arguments, expected = RUNS[name]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *arguments],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout, done.stdout
