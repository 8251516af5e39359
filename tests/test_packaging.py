"""The wheel a user installs: every subpackage, the type hints' marker, the licence, the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """A wheel built from a copy of the sources (a build writes into its source tree), with the
    environment's setuptools: Python 3.12's venv has none, and the test then does not run."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "lightning_lossagg",
        source / "lightning_lossagg",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "-q", "-w", str(out), str(source)], check=True)
    (built,) = out.glob("lightning_lossagg-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_has_every_subpackage_and_module(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    sources = {
        path.relative_to(ROOT).as_posix() for path in (ROOT / "lightning_lossagg").rglob("*.py")
    }
    assert sources <= names, sorted(sources - names)


def test_wheel_marks_the_package_as_typed(wheel: zipfile.ZipFile) -> None:
    assert "lightning_lossagg/py.typed" in wheel.namelist()


def test_wheel_carries_the_licence_and_the_console_script(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), names
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    assert "lossagg = lightning_lossagg.cli:main" in wheel.read(entry_points).decode()
