"""Step timing shared by the benchmarks: real ``Trainer.fit`` runs, timed per training batch."""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_lossagg.demos import MultiTaskMLP
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

PAIRED_STEPS = 300  # the default length of a paired fit
PAIRED_STEPS_HELP = (
    "steps of each paired fit: its ratio compares medians of half as many steps each, so longer "
    "fits read steadier (at 60 steps one fit's ratio moves by ±5 %% on a shared machine)"
)


def synthetic_loader(num_tasks: int, batch_size: int = 256, steps: int = 60) -> DataLoader:
    inputs, targets = make_regression_tasks(batch_size * steps, num_tasks, seed=0)
    return DataLoader(TaskDataset(inputs, targets), batch_size=batch_size)


def summed_mse(predictions: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    """A plain step's objective: the sum of the tasks' ``F.mse_loss``."""
    return sum(F.mse_loss(predictions[k], targets[k]) for k in targets)  # type: ignore[return-value]


class PlainMLP(L.LightningModule):
    """The demo MLP without the mixin: :func:`summed_mse`, nothing else (the baseline)."""

    def __init__(self, num_tasks: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = MultiTaskMLP(num_tasks, hidden=hidden)

    def training_step(self, batch: tuple[Tensor, dict[str, Tensor]], batch_idx: int) -> Tensor:
        inputs, targets = batch
        return summed_mse(self.net(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.net.configure_optimizers()


def step_times(
    make_model: Callable[[], L.LightningModule],
    loader: DataLoader,
    callbacks: Sequence[L.Callback] = (),
    clock: str = "wall",
    accelerator: str = "cpu",
    **trainer_kwargs: object,
) -> list[float]:
    """Seconds of every training step of one epoch of ``loader``, on the ``clock`` named in
    :data:`CLOCKS` (``trainer_kwargs`` override the Trainer's settings, e.g. ``logger``)."""
    torch.manual_seed(0)
    timer = StepTimer(CLOCKS[clock])
    settings: dict[str, Any] = {
        "accelerator": accelerator,
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    trainer = L.Trainer(callbacks=[*callbacks, timer], **(settings | trainer_kwargs))
    trainer.fit(make_model(), train_dataloaders=loader)
    return timer.times


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
    times = step_times(make_model, loader, callbacks, clock, **trainer_kwargs)
    return statistics.median(times[warmup:])


class PlainEveryOtherStep(MultiTaskMLP):
    """The demo MLP whose even training steps are a plain LightningModule's (the sum of the
    tasks' ``F.mse_loss``: no mixin, no weighting) and odd steps its own. Both sides of a ratio
    then run in one fit, on the same memory: a fit that runs fast or slow as a whole (on a shared
    machine they do, by up to ±20 %) moves both alike."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if batch_idx % 2:
            return super().training_step(batch, batch_idx)
        inputs, targets = batch
        return summed_mse(self(inputs), targets)


def paired_ratio(
    num_tasks: int,
    loader: DataLoader,
    callbacks: Sequence[L.Callback] = (),
    warmup: int = 10,
    clock: str = "thread",
) -> float:
    """Median step time of the mixin's steps over that of the plain steps in one fit of
    :class:`PlainEveryOtherStep` (``callbacks`` act on the mixin's steps; their batch hooks, if
    any, run on both)."""
    times = step_times(lambda: PlainEveryOtherStep(num_tasks), loader, callbacks, clock)
    # Batch b is step b of the epoch: odd ones are the mixin's.
    plain, mixin = times[warmup::2], times[warmup + 1 :: 2]
    if warmup % 2:
        plain, mixin = mixin, plain
    return statistics.median(mixin) / statistics.median(plain)


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
