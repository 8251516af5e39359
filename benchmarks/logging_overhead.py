"""Step-time overhead of LossLogger with an offline W&B run, against the same run without it.

Both variants train the demo MLP (trunk 64→256→256, one MSE head per task, batch 256) for one
epoch with the same ``WandbLogger(offline=True)`` setup and ``log_every_n_steps=50``; the only
difference is ``LossLogger()`` in the callbacks. A step is timed from one ``on_train_batch_start``
to the next, so every hook and the loggers' writes at the logging steps are inside it. The mean
step time carries the logging steps' cost spread over all steps; the median shows the typical
step. Ratios are medians over interleaved rounds, measured in this run. Target: at most 1.05. The
one-off end-of-fit work (the plot, the W&B chart and table) is reported separately.

    python -m benchmarks.logging_overhead [--rounds 5] [--tasks 3 8] [--steps 400]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from benchmarks._timing import synthetic_loader
from lightning_lossagg.callbacks import LossLogger
from lightning_lossagg.demos import MultiTaskMLP

LOG_EVERY_N_STEPS = 50
WARMUP = 10


class StepClock(L.Callback):
    """Wall time between consecutive training batch starts: the whole step, hooks included."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.starts.append(time.perf_counter())

    def step_times(self) -> list[float]:
        starts = self.starts[WARMUP:]
        return [later - earlier for earlier, later in itertools.pairwise(starts)]


class TimedLossLogger(LossLogger):
    """LossLogger that also times its end-of-fit work."""

    fit_end_seconds = 0.0

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = time.perf_counter()
        super().on_fit_end(trainer, pl_module)
        self.fit_end_seconds = time.perf_counter() - start


def timed_fit(num_tasks: int, loader, with_loss_logger: bool, root: str) -> dict[str, float]:
    """Mean and median step time of one epoch, and the LossLogger's end-of-fit seconds."""
    torch.manual_seed(0)
    clock, loss_logger = StepClock(), TimedLossLogger()
    logger = WandbLogger(save_dir=root, project="lossagg-benchmark", offline=True)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        log_every_n_steps=LOG_EVERY_N_STEPS,
        logger=logger,
        callbacks=[clock, loss_logger] if with_loss_logger else [clock],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MultiTaskMLP(num_tasks), train_dataloaders=loader)
    logger.experiment.finish()
    times = clock.step_times()
    return {
        "mean": statistics.fmean(times),
        "median": statistics.median(times),
        "fit_end": loss_logger.fit_end_seconds,
    }


def interleaved(runs: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict:
    """Each variant once per round, in turn; per-round ratios to the first variant."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_SILENT", "true")
    print(f"log_every_n_steps={LOG_EVERY_N_STEPS}, {args.steps} steps, {args.rounds} rounds")
    header = f"{'K':>3} {'stat':>6} {'W&B ms':>8} {'+LossLogger ms':>15} {'ratio':>6}"
    print(header + f" {'fit end s':>9}")
    with tempfile.TemporaryDirectory() as root:
        for num_tasks in args.tasks:
            loader = synthetic_loader(num_tasks, steps=args.steps)
            results = interleaved(
                {
                    "wandb": partial(timed_fit, num_tasks, loader, False, root),
                    "loss_logger": partial(timed_fit, num_tasks, loader, True, root),
                },
                args.rounds,
            )
            fit_end = statistics.median(r["fit_end"] for r in results["loss_logger"])
            for stat in ("mean", "median"):
                base = [r[stat] for r in results["wandb"]]
                with_logger = [r[stat] for r in results["loss_logger"]]
                ratio = statistics.median(b / a for a, b in zip(base, with_logger, strict=True))
                print(
                    f"{num_tasks:>3} {stat:>6} {1e3 * statistics.median(base):>8.3f} "
                    f"{1e3 * statistics.median(with_logger):>15.3f} {ratio:>6.3f} "
                    f"{fit_end:>9.2f}"
                )


if __name__ == "__main__":
    main()
