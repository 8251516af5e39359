"""Step time of the Gramian-based weighting callbacks against a plain step and torchjd.

On the demo MLP (shared trunk 64→256→256, one linear head per task, MSE each, batch 256), for
K = 2, 4, 8 tasks, every method is timed three ways, each a real ``Trainer.fit`` timed per
training batch (forward, backward and optimizer step; SGD with momentum), as the CPU time of the
training thread with one intra-op thread: on a shared machine wall time measures the other
processes as much as this one, and OpenMP workers waiting for a busy core make it erratic.

* ``rep``: the callback with ``rep_grad=True``, against a plain LightningModule that sums the task
  losses (target: at most 1.3 times the plain step);
* ``param``: the callback with parameter gradients, against torchjd's ``mtl_backward`` and
  ``jac_to_grad`` with the same aggregator on the same network, in a manual-optimization
  LightningModule (target: at most 0.8 times torchjd's step); ``floor/torchjd``: the bare step of
  per-task backwards (:class:`PerTaskBackwardsMLP`) against torchjd's, the least either can cost.

Variants run interleaved, round after round (rotated); each ratio is the median over rounds of the
ratio within a round, ``best`` the ratio of each side's fastest fit
(:func:`benchmarks._timing.summarize`), ``paired`` the median over rounds of the ratio within one
fit whose every other step is the plain module's (:func:`benchmarks._timing.paired_ratio`: a fit
running fast or slow as a whole moves both sides alike), and the times shown are medians over
rounds of each fit's median step time.

    python -m benchmarks.gradient_methods [--rounds 5] [--tasks 2 4 8] [--methods mgda ...]
        [--kinds rep param]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchjd import aggregation
from torchjd.autojac import jac_to_grad, mtl_backward

from benchmarks._timing import (
    PlainMLP,
    interleaved_times,
    median_step_time,
    paired_ratio,
    quiet,
    summarize,
    synthetic_loader,
)
from lightning_lossagg import callbacks
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting
from lightning_lossagg.demos import MultiTaskMLP

# name: (our callback, torchjd's aggregator for K tasks), at LibMTL's and torchjd's defaults.
METHODS: dict[str, tuple[Callable[..., GradientWeighting], Callable[[int], object]]] = {
    "mgda": (callbacks.MGDA, lambda k: aggregation.MGDA()),
    "pcgrad": (callbacks.PCGrad, lambda k: aggregation.PCGrad()),
    "cagrad": (callbacks.CAGrad, lambda k: aggregation.CAGrad(c=0.5)),
    "imtl_g": (callbacks.IMTLG, lambda k: aggregation.IMTLG()),
    "upgrad": (callbacks.UPGrad, lambda k: aggregation.UPGrad()),
    "aligned_mtl": (callbacks.AlignedMTL, lambda k: aggregation.AlignedMTL()),
    "nash_mtl": (callbacks.NashMTL, lambda k: aggregation.NashMTL(n_tasks=k)),
    "gradvac": (callbacks.GradVac, lambda k: aggregation.GradVac()),
}


class TorchJDMLP(L.LightningModule):
    """The same network trained with torchjd: per-task Jacobian of the trunk, aggregated."""

    def __init__(self, num_tasks: int, aggregator: object) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = MultiTaskMLP(num_tasks)
        self.aggregator = aggregator

    def training_step(self, batch: tuple[Tensor, dict[str, Tensor]], batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        inputs, targets = batch
        features = self.net.forward_shared(inputs)
        predictions = self.net.forward_heads(features)
        losses = [F.mse_loss(predictions[k], targets[k]) for k in targets]
        mtl_backward(losses, features=features)
        jac_to_grad(list(self.net.trunk.parameters()), self.aggregator)
        optimizer.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.net.configure_optimizers()


class PerTaskBackwardsMLP(TorchJDMLP):
    """``floor``: what every method with exact per-task parameter gradients does at the least,
    torchjd's way and ours: the forward, each head's own gradient, the K per-task backwards
    through the trunk, the optimizer step; the trunk's gradients are summed (weights of one) —
    no Gramian, no aggregator, no combination, and Lightning's lighter manual optimization.
    ``floor/torchjd`` is the lowest ``param/torchjd`` the per-task backwards leave room for."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks, aggregator=None)

    def training_step(self, batch: tuple[Tensor, dict[str, Tensor]], batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad()
        inputs, targets = batch
        features = self.net.forward_shared(inputs)
        views = [features.detach().requires_grad_() for _ in targets]
        losses = [
            F.mse_loss(head(view).squeeze(-1), targets[name])
            for view, (name, head) in zip(views, self.net.heads.items(), strict=True)
        ]
        torch.autograd.backward(losses, inputs=[*views, *self.net.heads.parameters()])
        for view in views:
            features.backward(view.grad, retain_graph=True)
        optimizer.step()


def _variants(num_tasks: int, names: list[str], kinds: list[str]) -> dict[str, Callable[[], float]]:
    loader = synthetic_loader(num_tasks, steps=40)
    variants = {}
    if "rep" in kinds:
        variants["plain"] = lambda: median_step_time(
            lambda: PlainMLP(num_tasks), loader, clock="thread"
        )
    for name in names:
        method, aggregator = METHODS[name]
        for kind in kinds:
            variants[f"{name}/{kind}"] = lambda method=method, rep_grad=kind == "rep": (
                median_step_time(
                    lambda: MultiTaskMLP(num_tasks),
                    loader,
                    [method(rep_grad=rep_grad)],
                    clock="thread",
                )
            )
        if "rep" in kinds:
            variants[f"{name}/paired"] = lambda method=method: paired_ratio(
                num_tasks, loader, [method(rep_grad=True)]
            )
        if "param" in kinds:
            variants[f"{name}/torchjd"] = lambda aggregator=aggregator: median_step_time(
                lambda: TorchJDMLP(num_tasks, aggregator(num_tasks)), loader, clock="thread"
            )
    if "param" in kinds:
        variants["floor"] = lambda: median_step_time(
            lambda: PerTaskBackwardsMLP(num_tasks), loader, clock="thread"
        )
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["rep", "param"],
        choices=["rep", "param"],
        help=(
            "rep: rep_grad=True against the plain step; param: parameter gradients against torchjd"
        ),
    )
    args = parser.parse_args()
    quiet()
    # One intra-op thread: on a shared machine, OpenMP workers that wait for a busy core turn
    # millisecond steps into tens of milliseconds at random. Both sides of every ratio use it.
    torch.set_num_threads(1)
    header = (
        f"{'K':>2} {'method':<12} {'plain ms':>8} {'rep ms':>7} {'rep/plain':>9} {'best':>5} "
        f"{'paired':>6} "
        f"{'param ms':>8} {'torchjd ms':>10} {'param/torchjd':>13} {'best':>5} "
        f"{'floor/torchjd':>13}"
    )
    print(
        f"{args.rounds} rounds; best: the ratio of each side's fastest fit; paired: within one fit "
        "whose every other step is plain"
    )
    print(header)
    for num_tasks in args.tasks:
        times = interleaved_times(_variants(num_tasks, args.methods, args.kinds), args.rounds)
        for name in args.methods:
            row = f"{num_tasks:>2} {name:<12} "
            if "rep" in args.kinds:
                against_plain = summarize({k: times[k] for k in ("plain", f"{name}/rep")}, "plain")
                rep = against_plain[f"{name}/rep"]
                paired = statistics.median(times[f"{name}/paired"])
                row += (
                    f"{1e3 * against_plain['plain'].median:>8.2f} {1e3 * rep.median:>7.2f} "
                    f"{rep.ratio:>9.2f} {rep.best_ratio:>5.2f} {paired:>6.2f} "
                )
            else:
                row += f"{'':>8} {'':>7} {'':>9} {'':>5} {'':>6} "
            if "param" in args.kinds:
                torchjd = f"{name}/torchjd"
                against = summarize(
                    {k: times[k] for k in (torchjd, f"{name}/param", "floor")}, torchjd
                )
                param = against[f"{name}/param"]
                row += (
                    f"{1e3 * param.median:>8.2f} {1e3 * against[torchjd].median:>10.2f} "
                    f"{param.ratio:>13.2f} {param.best_ratio:>5.2f} {against['floor'].ratio:>13.2f}"
                )
            print(row.rstrip(), flush=True)


if __name__ == "__main__":
    main()
