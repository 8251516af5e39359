"""Step-time overhead of LossLogger with an offline W&B run, against the same run without it.

Both variants train the demo MLP (trunk 64→256→256, one MSE head per task, batch 256, batches
prepared in advance so that data loading does not dilute the overhead) for one epoch with the same
``WandbLogger(offline=True)`` setup and ``log_every_n_steps=50``; the only difference is
``LossLogger()`` in the callbacks. A step is timed from one ``on_train_batch_start`` to the next,
so every hook and the loggers' writes at the logging steps are inside it. The mean step time
carries the logging steps' cost spread over all steps; the median shows the typical step. Ratios
are medians over interleaved rounds of the per-round ratio (with their range), measured in this
run. Target: at most 1.05. "own" is the time spent in LossLogger's per-batch hook itself, per
step: a figure that other processes on the machine disturb less than a ratio of two runs. The
one-off end-of-fit work (the plot, the W&B chart and table) is reported separately.

    python -m benchmarks.logging_overhead [--rounds 7] [--tasks 3 8] [--steps 400] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch.utils.data import DataLoader

from benchmarks._timing import quiet
from lightning_lossagg.callbacks import LossLogger
from lightning_lossagg.demos import MultiTaskMLP
from lightning_lossagg.demos.synthetic import make_regression_tasks

LOG_EVERY_N_STEPS = 50
WARMUP = 20
SETTLE_SECONDS = 2.0


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
    """LossLogger that also times its own work: per batch (the logging steps' writes included)
    and at the end of fit."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_end_seconds: list[float] = []
        self.fit_end_seconds = 0.0

    def on_train_batch_end(self, *args: Any) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args)
        self.batch_end_seconds.append(time.perf_counter() - start)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = time.perf_counter()
        super().on_fit_end(trainer, pl_module)
        self.fit_end_seconds = time.perf_counter() - start


def prepared_batches(num_tasks: int, steps: int, batch_size: int = 256) -> DataLoader:
    """``steps`` ready-made ``(inputs, {task: targets})`` batches of the demo's regression data."""
    inputs, targets = make_regression_tasks(batch_size * steps, num_tasks, seed=0)
    batches = [
        (inputs[i : i + batch_size], {k: t[i : i + batch_size] for k, t in targets.items()})
        for i in range(0, len(inputs), batch_size)
    ]
    return DataLoader(batches, batch_size=None)


def timed_fit(
    num_tasks: int, loader: DataLoader, with_loss_logger: bool, root: str
) -> dict[str, float]:
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
    time.sleep(SETTLE_SECONDS)  # W&B's service writes the run's files after finish()
    times = clock.step_times()
    own = loss_logger.batch_end_seconds[WARMUP:]
    return {
        "mean": statistics.fmean(times),
        "median": statistics.median(times),
        "own": statistics.fmean(own) if own else 0.0,
        "fit_end": loss_logger.fit_end_seconds,
    }


def interleaved(runs: dict[str, Callable[[], dict[str, float]]], rounds: int) -> dict:
    """Each variant once per round, the order reversed every other round: every round's
    results, per variant."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    for round_index in range(rounds):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for name in order:
            results[name].append(runs[name]())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    os.environ.setdefault("WANDB_SILENT", "true")
    print(
        f"log_every_n_steps={LOG_EVERY_N_STEPS}, {args.steps} steps, {args.rounds} rounds, "
        f"{torch.get_num_threads()} torch threads"
    )
    print(
        f"{'K':>3} {'stat':>6} {'W&B ms':>8} {'+LossLogger ms':>15} {'ratio':>6} "
        f"{'ratio range':>13} {'own ms/step':>11} {'fit end s':>9}"
    )
    with tempfile.TemporaryDirectory() as root:
        for num_tasks in args.tasks:
            loader = prepared_batches(num_tasks, args.steps)
            results = interleaved(
                {
                    "wandb": partial(timed_fit, num_tasks, loader, False, root),
                    "loss_logger": partial(timed_fit, num_tasks, loader, True, root),
                },
                args.rounds,
            )
            with_logger = results["loss_logger"]
            own = statistics.median(r["own"] for r in with_logger)
            fit_end = statistics.median(r["fit_end"] for r in with_logger)
            for stat in ("mean", "median"):
                base = [r[stat] for r in results["wandb"]]
                timed = [r[stat] for r in with_logger]
                ratios = [b / a for a, b in zip(base, timed, strict=True)]
                print(
                    f"{num_tasks:>3} {stat:>6} {1e3 * statistics.median(base):>8.3f} "
                    f"{1e3 * statistics.median(timed):>15.3f} {statistics.median(ratios):>6.3f} "
                    f"{min(ratios):>6.2f}-{max(ratios):<6.2f} {1e3 * own:>11.3f} {fit_end:>9.2f}"
                )


if __name__ == "__main__":
    main()
