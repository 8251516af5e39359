"""One training run for tests/test_crash_resume.py, in its own process.

    python -m tests.crash_resume_run MODE OUT_DIR METHOD [METHOD ...]

MODE: ``full`` (uninterrupted), ``crash`` (SIGKILL itself in the middle of epoch 2: one method),
``resume`` (continue from the crashed run's last checkpoint). Each run saves the final weights,
the method's state and the parameters to OUT_DIR/METHOD-MODE.pt.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_lossagg import callbacks
from tests.models import ThreeTaskNet, make_batch

EPOCHS, BATCHES, CRASH_AT = 3, 4, 6  # the crash falls in the middle of epoch 2 (0-based: 1)
METHODS = {
    "uncertainty": lambda: callbacks.UncertaintyWeighting(),
    "dwa": lambda: callbacks.DWA(),
    "famo": lambda: callbacks.FAMO(),
    "gradnorm": lambda: callbacks.GradNorm(),
    "nash_mtl": lambda: callbacks.NashMTL(),
}


class Crash(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == CRASH_AT:
            os.kill(os.getpid(), signal.SIGKILL)


def main(method: str, mode: str, out_dir: Path) -> None:
    torch.manual_seed(0)
    weighting = METHODS[method]()
    # The resumed run continues the crashed run's checkpoints; the full run keeps its own.
    run_dir = out_dir / f"{method}-{'full' if mode == 'full' else 'crash'}"
    checkpoints = ModelCheckpoint(dirpath=run_dir, save_last=True, every_n_epochs=1)
    extra = [Crash()] if mode == "crash" else []
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        precision="64-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[weighting, checkpoints, *extra],
        default_root_dir=out_dir,
    )
    batches = [make_batch(6, seed=step) for step in range(BATCHES)]
    ckpt_path = run_dir / "last.ckpt" if mode == "resume" else None
    # Built in float64: Lightning loads a checkpoint before converting the model to the
    # precision, so a float32-built model would round the float64 checkpoint on resume.
    model = ThreeTaskNet(lr=0.05).double()
    trainer.fit(model, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    torch.save(
        {
            "weights": model.loss_record.weights,
            "state": weighting.state_dict(),
            "params": {n: p.detach() for n, p in model.named_parameters()},
            "global_step": trainer.global_step,
        },
        out_dir / f"{method}-{mode}.pt",
    )


if __name__ == "__main__":
    for name in sys.argv[3:]:
        main(name, sys.argv[1], Path(sys.argv[2]))
