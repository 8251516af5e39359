"""Step timing shared by the benchmarks: real ``Trainer.fit`` runs, timed per training batch."""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_lossagg.demos.penguins import TaskDataset
from lightning_lossagg.demos.synthetic import make_regression_tasks


class StepTimer(L.Callback):
    """Time of each training batch (forward, backward, optimizer step and every other callback's
    batch hooks: it is placed last) on a clock from :data:`CLOCKS`."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: object) -> None:
        self._start = self.clock()

    def on_train_batch_end(self, *args: object) -> None:
        self.times.append(self.clock() - self._start)


def quiet() -> None:
    """Only the benchmark's table on the terminal: no warnings, no per-fit Lightning banners."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


# wall: elapsed time; cpu: this process's CPU time (all threads); thread: the training thread's
# CPU time (with one torch thread all the work is on it): the steadiest on a shared machine, where
# wall time mostly measures waiting for a core.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time, "thread": time.thread_time}


def synthetic_loader(num_tasks: int, batch_size: int = 256, steps: int = 60) -> DataLoader:
    inputs, targets = make_regression_tasks(batch_size * steps, num_tasks, seed=0)
    return DataLoader(TaskDataset(inputs, targets), batch_size=batch_size)


def median_step_time(
    make_model: Callable[[], L.LightningModule],
    loader: DataLoader,
    callbacks: Sequence[L.Callback] = (),
    warmup: int = 10,
    clock: str = "wall",
    **trainer_kwargs: object,
) -> float:
    """Median seconds per training step over one epoch of ``loader`` (after ``warmup`` steps),
    on the ``clock`` named in :data:`CLOCKS`."""
    torch.manual_seed(0)
    timer = StepTimer(CLOCKS[clock])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
        **trainer_kwargs,
    )
    trainer.fit(make_model(), train_dataloaders=loader)
    return statistics.median(timer.times[warmup:])


class Summary(NamedTuple):
    """One variant's times over the rounds, against the baseline's in the same rounds."""

    median: float  # median over rounds of the variant's step time (seconds)
    best: float  # its fastest round
    ratio: float  # median over rounds of variant / baseline within a round
    best_ratio: float  # best / the baseline's best


def summarize(times: Mapping[str, Sequence[float]], baseline: str) -> dict[str, Summary]:
    """Each variant's :class:`Summary` from its step times, round by round.

    Two ratios, because on a shared machine a whole fit runs slow or fast at random (the plain
    step reads 2.3 ms in one fit and 3.6 ms in the next): ``ratio`` cancels slow phases that hit
    both sides of a round; ``best_ratio`` compares each side's fastest fit, as ``timeit``
    recommends: interference only ever adds time, so the fastest fit is the closest to the code's
    own cost.
    """
    reference = times[baseline]
    return {
        name: Summary(
            statistics.median(values),
            min(values),
            statistics.median(v / r for v, r in zip(values, reference, strict=True)),
            min(values) / min(reference),
        )
        for name, values in times.items()
    }


def interleaved_times(
    variants: Mapping[str, Callable[[], float]], rounds: int = 5
) -> dict[str, list[float]]:
    """Each variant's step time, round after round; every round runs the variants in a rotated
    order, so that none always runs first or right after another."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(variants[name]())
    return times
