"""Step time of each loss-based weighting method relative to static weights, in the same run.

The demo MLP (K=3 tasks, trunk 64→256→256, batch 256) trains one epoch of 60 steps per
measurement; a step is timed from the start of the training batch to the end of every
``on_train_batch_end`` hook (FAMO's re-evaluation of the batch runs there), and its time is the
median over the epoch after 10 warm-up steps. Each round measures every variant once, in a
rotated order; ``ratio`` is the median over rounds of (method / static) within a round, so slow
phases of a shared machine cancel, and ``best`` the ratio of each one's fastest fit
(:func:`benchmarks._timing.summarize`). By default the clock is the main thread's CPU time (with one
torch thread all the work is on it): on a machine shared with other jobs, wall time mostly
measures waiting for a core. "(weights of 1)" is a weighting callback that returns ones: what the
interface itself costs (hooks, the weights' way through the mixin). ``paired``: the median over
rounds of the ratio within one fit (``--paired-steps`` long) whose odd steps weigh with the method
and even steps are static (:class:`OnOddSteps`), which a fit running fast or slow as a whole does
not move; Lightning's own
cost of calling a callback's hooks then falls on both sides (the "(weights of 1)" row's ``ratio``
shows it). Target: at most 1.05, FAMO excepted (an extra forward pass by design).

    python -m benchmarks.loss_methods [--rounds 9] [--paired-steps 300] [--threads 1]
        [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from benchmarks._timing import (
    PAIRED_STEPS,
    PAIRED_STEPS_HELP,
    interleaved_times,
    median_step_time,
    quiet,
    step_times,
    summarize,
    synthetic_loader,
)
from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks import (
    DWA,
    FAMO,
    GLS,
    IMTLL,
    RLW,
    LossScaling,
    UncertaintyWeighting,
)
from lightning_lossagg.demos import MultiTaskMLP
from lightning_lossagg.weighting import WeightingCallback

NUM_TASKS = 3


class OnesWeighting(WeightingCallback):
    """Weights of 1 through the weighting interface: the floor that any method pays."""

    finite_weights = True

    def task_weights(self, pl_module: L.LightningModule, step: GlobalTaskLosses) -> Tensor:
        return torch.ones_like(step.losses)


class OnOddSteps(L.Callback):
    """Hands a weighting method its training-step hooks on odd steps only (its other hooks always):
    with :class:`StaticOnEvenSteps` the even steps of a fit are static weights, the odd ones the
    method's."""

    STEP_HOOKS = (
        "on_train_batch_start",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_before_zero_grad",
        "on_train_batch_end",
    )
    OTHER_HOOKS = ("setup", "teardown", "on_fit_start", "on_train_start", "on_train_epoch_start")

    def __init__(self, method: WeightingCallback) -> None:
        self.method = method
        self.odd_step = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.odd_step = args[-1] % 2 == 1  # the batch index
        if self.odd_step:
            self.method.on_train_batch_start(trainer, pl_module, *args)


def _forward_hook(name: str, odd_steps_only: bool) -> Callable[..., Any]:
    def hook(self: OnOddSteps, *args: Any, **kwargs: Any) -> Any:
        if self.odd_step or not odd_steps_only:
            return getattr(self.method, name)(*args, **kwargs)
        return None

    return hook


for _name in OnOddSteps.STEP_HOOKS[1:]:
    setattr(OnOddSteps, _name, _forward_hook(_name, odd_steps_only=True))
for _name in OnOddSteps.OTHER_HOOKS:
    setattr(OnOddSteps, _name, _forward_hook(_name, odd_steps_only=False))


class StaticOnEvenSteps(MultiTaskMLP):
    """The demo MLP weighing with the method of the trainer's :class:`OnOddSteps` on odd training
    steps, with static weights on even ones."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._method = next(c for c in self.trainer.callbacks if isinstance(c, OnOddSteps)).method
        self._weighting = self._method  # the model's method (for its hooks' checks)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._weighting = self._method if batch_idx % 2 else None
        return super().training_step(batch, batch_idx)


def paired_method_ratio(method: WeightingCallback, loader: Any, warmup: int = 10) -> float:
    """Median step time of the method's steps over that of the static steps in one fit."""
    times = step_times(lambda: StaticOnEvenSteps(NUM_TASKS), loader, [OnOddSteps(method)], "thread")
    static, weighted = times[warmup::2], times[warmup + 1 :: 2]  # batch b is step b; warmup even
    return statistics.median(weighted) / statistics.median(static)


METHODS: dict[str, Callable[[], L.Callback | None]] = {
    "static": lambda: None,
    "(weights of 1)": OnesWeighting,
    "UncertaintyWeighting": UncertaintyWeighting,
    "DWA": lambda: DWA(window_steps=5),  # windows, so that its weights change in a short run
    "LossScaling": LossScaling,
    "RLW": RLW,
    "GLS": GLS,
    "IMTLL": IMTLL,
    "FAMO": FAMO,
}
# A paired fit hands the method every other step while ``global_step`` counts them all: DWA's
# window of 10 steps there is 5 of its own, as in the unpaired fit (a period closed every 2.5 of
# its steps made its median step a closing one).
PAIRED_METHODS = METHODS | {"DWA": lambda: DWA(window_steps=10)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--paired-steps", type=int, default=PAIRED_STEPS, help=PAIRED_STEPS_HELP)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: the main thread's CPU time (robust on a shared machine; needs --threads 1)",
    )
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    print_method_table(args.rounds, args.clock, args.paired_steps)


def print_method_table(rounds: int, clock_name: str, paired_steps: int = PAIRED_STEPS) -> None:
    """Each method's median step time and its ratio to static weights, measured in this run."""
    clock = "thread" if clock_name == "cpu" else "wall"
    loader = synthetic_loader(NUM_TASKS, batch_size=256)
    paired_loader = synthetic_loader(NUM_TASKS, batch_size=256, steps=paired_steps)

    def timed(make: Callable[[], L.Callback | None]) -> Callable[[], float]:
        def run() -> float:
            callback = make()
            callbacks = [] if callback is None else [callback]
            return median_step_time(lambda: MultiTaskMLP(NUM_TASKS), loader, callbacks, clock=clock)

        return run

    def paired(make: Callable[[], L.Callback | None]) -> Callable[[], float]:
        return lambda: paired_method_ratio(make(), paired_loader)  # type: ignore[arg-type]

    variants = {name: timed(make) for name, make in METHODS.items()}
    variants |= {
        f"paired {name}": paired(make) for name, make in PAIRED_METHODS.items() if name != "static"
    }
    times = interleaved_times(variants, rounds)
    print(
        f"K={NUM_TASKS}, batch 256, {rounds} rounds, {torch.get_num_threads()} thread(s), "
        f"{clock_name} time, paired fits of {paired_steps} steps"
    )
    print(f"{'method':<22} {'ms/step':>8} {'ratio':>6} {'best':>6} {'paired':>7}")
    paired_ratios = {name: times.pop(f"paired {name}", None) for name in METHODS}
    for name, summary in summarize(times, "static").items():
        ratios = paired_ratios[name]
        paired_text = f"{statistics.median(ratios):>7.3f}" if ratios else f"{'':>7}"
        print(
            f"{name:<22} {1e3 * summary.median:>8.3f} {summary.ratio:>6.3f} "
            f"{summary.best_ratio:>6.3f} {paired_text}"
        )


if __name__ == "__main__":
    main()
