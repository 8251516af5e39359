import importlib
import os

import pytest
import torch

from tests.process_group import run_rank_then_exit

# W&B runs in offline mode in every test: a real run written to disk, nothing sent.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

# Every process spawned through torch (Lightning's ddp_spawn and tests/process_group.py) runs
# this in place of torch's own wrapper: a rank that finished exits without interpreter
# finalization, where a gloo thread can abort it (see run_rank_then_exit).
# (``torch.multiprocessing.spawn`` is also the name of a function: look the module up.)
importlib.import_module("torch.multiprocessing.spawn")._wrap = run_rank_then_exit


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
