"""Every weighting method on the penguins demo: each task's validation loss, and a step's time.

Trains the penguins demo (species, sex with real missing labels, body mass: three tasks on one
shared trunk) once per method, each from the same initial parameters and the same batches, and
prints each task's validation loss, their statically weighted sum (``val/static_loss``, which no
method's weights move) and the median wall-clock time of a training step. A starting point for
choosing a method on your own data: which one wins depends on the tasks, and on three small
penguin tasks the differences are small. (UncertaintyWeighting and IMTLL print the same figures:
under the demo's Adam, which a constant factor on the loss does not move, UW's log-variances
mirror IMTL-L's log-scales and its weights are half of IMTL-L's at every step.)

    python examples/compare_methods.py [--epochs 15] [--methods static UncertaintyWeighting MGDA]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import lightning as L

from lightning_lossagg import WeightingCallback, callbacks
from lightning_lossagg.demos import PenguinsDataModule, PenguinsNet

TASKS = ("species", "sex", "body_mass")

# Every method with its defaults, by the callback's name ("static": Task.weight alone).
METHODS: dict[str, Callable[[], WeightingCallback | None]] = {
    "static": lambda: None,
    **{
        name: getattr(callbacks, name)
        for name in (
            "UncertaintyWeighting",
            "DWA",
            "LossScaling",
            "RLW",
            "GLS",
            "IMTLL",
            "FAMO",
            "GradNorm",
            "MGDA",
            "PCGrad",
            "CAGrad",
            "IMTLG",
            "NashMTL",
            "AlignedMTL",
            "UPGrad",
            "GradVac",
            "DBMTL",
        )
    },
}


class StepClock(L.Callback):
    """Wall-clock seconds of every training batch (forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: object) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def evaluate(method: str, epochs: int) -> dict[str, float]:
    """Fit the demo with ``method`` and return its validation figures and median step time."""
    L.seed_everything(0, verbose=False)
    weighting, clock = METHODS[method](), StepClock()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # The clock last: it times the weighting callback's batch hooks too (FAMO's re-evaluation).
        callbacks=[callbacks.LossLogger(), *([weighting] if weighting else []), clock],
    )
    model, data = PenguinsNet(), PenguinsDataModule()
    trainer.fit(model, data)
    (metrics,) = trainer.validate(model, data, verbose=False)
    figures = {task: metrics[f"val/loss/{task}"] for task in TASKS}
    figures["static_loss"] = metrics["val/static_loss"]
    figures["ms/step"] = 1e3 * statistics.median(clock.seconds)
    return figures


def main(methods: list[str], epochs: int) -> dict[str, dict[str, float]]:
    """The figures of each method, printed as a table as they come."""
    columns = (*TASKS, "static_loss", "ms/step")
    print(f"{'method':22s}" + "".join(f"{column:>13s}" for column in columns))
    results = {}
    for method in methods:
        results[method] = evaluate(method, epochs)
        print(f"{method:22s}" + "".join(f"{results[method][c]:13.4f}" for c in columns))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    arguments = parser.parse_args()
    warnings.filterwarnings("ignore", module="lightning")  # Lightning's notes, per fit
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    main(arguments.methods, arguments.epochs)
