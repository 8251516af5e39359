import os

import pytest
import torch

# W&B runs in offline mode in every test: a real run written to disk, nothing sent.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")


@pytest.fixture(autouse=True)
def _seed_and_workdir(tmp_path, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


@pytest.fixture(autouse=True)
def _finish_wandb_runs():
    """A W&B run left open would be picked up by the next test's WandbLogger: close it."""
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()
