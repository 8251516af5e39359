"""Where a step's time goes: the mixin's step against the plain one, section by section.

One fit of :class:`benchmarks._timing.PlainEveryOtherStep` (every other step is a plain
LightningModule's: the sum of ``F.mse_loss``), with the weighting callback named (or static weights)
acting on the mixin's steps. Each step's CPU time of the training thread is split into sections by
timing a few functions (each wrapper costs ~1 µs): ``training_step`` (forward, losses and
reduction), Lightning's ``backward``, and inside it the weighting's work at the heads' views (with
``--param`` the trunk's K backwards, the Jacobian and Gramian, the host copy and the split into
parameters) and the host solve of the weights. Printed per section: the median of the plain steps,
of the mixin's, and their difference. Sections nest (the weights are part of the views' work,
which is part of backward). On this machine a whole fit runs fast or slow at random; within one
fit the two sides share its speed.

    python -m benchmarks.step_sections [--tasks 4] [--method mgda|static] [--fits 3] [--param]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.module import LightningModule

from benchmarks._timing import PlainEveryOtherStep, quiet, step_times, synthetic_loader
from benchmarks.gradient_methods import METHODS
from lightning_lossagg.callbacks import gradient_weighting
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting

SECTIONS: list[tuple[str, Any, str]] = [
    ("training_step", PlainEveryOtherStep, "training_step"),
    ("backward", LightningModule, "backward"),
    ("  views' work in backward", GradientWeighting, "_weigh_at_heads"),
    ("  views' work in backward", GradientWeighting, "_weigh_at_parameters"),
    # With parameter gradients (--param): the K backwards through the trunk, then the rest
    # (a row counts every caller of its functions; w @ J is in none).
    ("    trunk backwards", gradient_weighting, "_trunk_gradients"),
    ("    Jacobian and Gramian", gradient_weighting, "_jacobian"),
    ("    Jacobian and Gramian", GradientWeighting, "_synced_gramian"),
    ("    host copy, split, reach", gradient_weighting, "_on_host"),
    ("    host copy, split, reach", gradient_weighting, "_shaped_like"),
    ("    host copy, split, reach", gradient_weighting, "_reached"),
    ("    host copy, split, reach", GradientWeighting, "_shared_gradients"),
    ("    host weights", GradientWeighting, "_weights_of_scaled_gramian"),
]

LABELS = list(dict.fromkeys(label for label, _, _ in SECTIONS))


class _SectionTimes(L.Callback):
    """Per step, the time spent in each section, kept apart for odd (mixin) and even steps."""

    def __init__(self, warmup: int = 10) -> None:
        self.warmup = warmup
        self.current: dict[str, float] = collections.defaultdict(float)
        self.steps: dict[bool, dict[str, list[float]]] = {
            odd: collections.defaultdict(list) for odd in (False, True)
        }
        self._start = 0.0

    def timed(self, label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.current[label] += time.thread_time() - start

        return wrapper

    def on_train_batch_start(self, *args: object) -> None:
        self.current.clear()
        self._start = time.thread_time()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, index: int
    ) -> None:
        if index < self.warmup:
            return
        times = self.steps[index % 2 == 1]
        times["step"].append(time.thread_time() - self._start)
        for label in LABELS:
            times[label].append(self.current.get(label, 0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--method", default="mgda", choices=["static", *METHODS])
    parser.add_argument("--fits", type=int, default=3)
    parser.add_argument("--param", action="store_true", help="parameter gradients (rep_grad=False)")
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    recorder = _SectionTimes()
    originals = [(owner, name, getattr(owner, name)) for _, owner, name in SECTIONS]
    for (label, owner, name), (_, _, function) in zip(SECTIONS, originals, strict=True):
        setattr(owner, name, recorder.timed(label, function))
    try:
        loader = synthetic_loader(args.tasks, steps=80)
        for _ in range(args.fits):
            callbacks: list[L.Callback] = [recorder]
            if args.method != "static":
                callbacks.insert(0, METHODS[args.method][0](rep_grad=not args.param))
            step_times(lambda: PlainEveryOtherStep(args.tasks), loader, callbacks, clock="thread")
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)
    kind = "" if args.method == "static" else " (param)" if args.param else " (rep_grad)"
    print(f"K = {args.tasks}, {args.method}{kind}, {args.fits} fits: median ms per step")
    print(f"  {'section':<28} {'plain':>7} {'mixin':>7} {'diff':>7}")
    for label in ["step", *LABELS]:
        plain = 1e3 * statistics.median(recorder.steps[False][label])
        mixin = 1e3 * statistics.median(recorder.steps[True][label])
        print(f"  {label:<28} {plain:7.3f} {mixin:7.3f} {mixin - plain:+7.3f}")


if __name__ == "__main__":
    main()
