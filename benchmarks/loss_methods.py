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
interface itself costs (hooks, the weights' way through the mixin). Target: at most 1.05, FAMO
excepted (an extra forward pass by design).

    python -m benchmarks.loss_methods [--rounds 9] [--threads 1] [--clock cpu|wall]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor

from benchmarks._timing import (
    interleaved_times,
    median_step_time,
    quiet,
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

    def task_weights(self, pl_module: L.LightningModule, step: GlobalTaskLosses) -> Tensor:
        return torch.ones_like(step.losses)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
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
    print_method_table(args.rounds, args.clock)


def print_method_table(rounds: int, clock_name: str) -> None:
    """Each method's median step time and its ratio to static weights, measured in this run."""
    clock = "thread" if clock_name == "cpu" else "wall"
    loader = synthetic_loader(NUM_TASKS, batch_size=256)

    def timed(make: Callable[[], L.Callback | None]) -> Callable[[], float]:
        def run() -> float:
            callback = make()
            callbacks = [] if callback is None else [callback]
            return median_step_time(lambda: MultiTaskMLP(NUM_TASKS), loader, callbacks, clock=clock)

        return run

    times = interleaved_times({name: timed(make) for name, make in METHODS.items()}, rounds)
    print(
        f"K={NUM_TASKS}, batch 256, {rounds} rounds, {torch.get_num_threads()} thread(s), "
        f"{clock_name} time"
    )
    print(f"{'method':<22} {'ms/step':>8} {'ratio':>6} {'best':>6}")
    for name, summary in summarize(times, "static").items():
        print(
            f"{name:<22} {1e3 * summary.median:>8.3f} {summary.ratio:>6.3f} "
            f"{summary.best_ratio:>6.3f}"
        )


if __name__ == "__main__":
    main()
