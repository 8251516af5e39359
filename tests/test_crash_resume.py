"""A training process killed with SIGKILL mid-epoch and restarted from its last checkpoint ends
with the same weights, method state and parameters as an uninterrupted run.

Checkpoints are taken at every epoch end (``ModelCheckpoint(every_n_epochs=1, save_last=True)``);
the resumed run replays the interrupted epoch from its start, exactly.
"""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.crash_resume_run import METHODS

ROOT = Path(__file__).parents[1]


def _run(mode: str, out_dir: Path, *methods: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.crash_resume_run", mode, str(out_dir), *methods],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Uninterrupted runs, then for each method a run killed mid-epoch and its resumption."""
    out_dir = tmp_path_factory.mktemp("crash_resume")
    full = _run("full", out_dir, *METHODS)
    assert full.returncode == 0, full.stderr[-3000:]
    for method in METHODS:
        crashed = _run("crash", out_dir, method)
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
        assert not (out_dir / f"{method}-crash.pt").exists()
    resumed = _run("resume", out_dir, *METHODS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out_dir


def _assert_equal_state(actual, expected, where=""):
    if isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, atol=1e-12, rtol=0, msg=where)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys(), where
        for key in expected:
            _assert_equal_state(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_equal_state(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(method, runs):
    expected = torch.load(runs / f"{method}-full.pt", weights_only=False)
    actual = torch.load(runs / f"{method}-resume.pt", weights_only=False)
    _assert_equal_state(actual, expected)
