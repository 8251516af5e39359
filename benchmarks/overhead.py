"""Step-time overhead of MultiTaskMixin (static weights) against a plain LightningModule.

Both train the same demo MLP (shared trunk 64→256→256, one head per task, MSE each, batch 256) on
the same data; the plain module sums ``F.mse_loss`` of each task. Ratios are medians over
interleaved rounds, measured in this run, and (``best``) of each side's fastest fit
(:func:`benchmarks._timing.summarize`); ``paired``: the median over rounds of the ratio within one
fit whose every other step is the plain module's (:func:`benchmarks._timing.paired_ratio`), which
a fit's running fast or slow as a whole does not move. Target: at most 1.05. ``--methods`` then
times every loss-based weighting method against static weights (:mod:`benchmarks.loss_methods`;
the gradient-based ones are in :mod:`benchmarks.gradient_methods`).

    python -m benchmarks.overhead [--rounds 5] [--tasks 2 4 8] [--paired-steps 300] [--clock cpu]
        [--threads 1] [--methods]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks._timing import (
    PAIRED_STEPS,
    PAIRED_STEPS_HELP,
    PlainMLP,
    interleaved_times,
    median_step_time,
    paired_ratio,
    quiet,
    summarize,
    synthetic_loader,
)
from benchmarks.loss_methods import print_method_table
from lightning_lossagg.demos import MultiTaskMLP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--paired-steps", type=int, default=PAIRED_STEPS, help=PAIRED_STEPS_HELP)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, steadier on a machine shared with other work",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--methods",
        action="store_true",
        help="then each loss-based method against static weights (benchmarks.loss_methods)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()
    print(f"clock: {args.clock}, torch threads: {torch.get_num_threads()}, {args.rounds} rounds")
    print(f"{'K':>3} {'plain ms':>9} {'mixin ms':>9} {'ratio':>6} {'best':>6} {'paired':>7}")
    for num_tasks in args.tasks:
        loader = synthetic_loader(num_tasks)
        models = {"plain": PlainMLP, "mixin": MultiTaskMLP}
        variants = {
            name: lambda make=make, k=num_tasks, loader=loader: median_step_time(
                lambda: make(k), loader, clock=args.clock
            )
            for name, make in models.items()
        }
        paired_loader = synthetic_loader(num_tasks, steps=args.paired_steps)
        variants["paired"] = lambda k=num_tasks, loader=paired_loader: paired_ratio(
            k, loader, clock=args.clock
        )
        times = interleaved_times(variants, args.rounds)
        paired = statistics.median(times.pop("paired"))
        plain, mixin = (summarize(times, "plain")[name] for name in models)
        print(
            f"{num_tasks:>3} {1e3 * plain.median:>9.3f} {1e3 * mixin.median:>9.3f} "
            f"{mixin.ratio:>6.3f} {mixin.best_ratio:>6.3f} {paired:>7.3f}"
        )
    if args.methods:
        print_method_table(args.rounds, args.clock, args.paired_steps)


if __name__ == "__main__":
    main()
