"""The code is ruff clean and the package type-checks, with pyproject.toml's settings (the test
extra pins both tools to a minor version: a new release's rules arrive by a change here)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", str(ROOT)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing_in_the_package(tmp_path):
    api = pytest.importorskip("mypy.api")
    config = str(ROOT / "pyproject.toml")
    arguments = [
        "--config-file",
        config,
        "--cache-dir",
        str(tmp_path),
        str(ROOT / "lightning_lossagg"),
    ]
    stdout, stderr, status = api.run(arguments)
    assert status == 0, stdout + stderr
