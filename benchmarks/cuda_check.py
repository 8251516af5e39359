"""The gradient-based callbacks on a CUDA GPU: a check against the CPU-tested path, then step times.

Not part of the tests (CI has no GPU); run it where one is lent, as one short command.

* ``check``: with ``rep_grad=True``, the linear heads' factors against the views' gradients (the
  same fit with the factors refused), in float32 and bf16-mixed; parameter gradients run and give
  finite parameters. Prints the largest differences after a few steps.
* ``syncs``: every time the host waits on the GPU (``torch.cuda.set_sync_debug_mode``) in 20
  training steps, by the innermost line of the library that asked for it, for a plain
  LightningModule, static weights, each loss-based method, ``LossLogger`` with a CSV logger, and
  each gradient-based method (one wait per step for the Gramian, where the weights are solved,
  by design); other waits are Lightning's, named by their caller.
* ``time``: wall time per training step (a synchronize at each step's end), median over the epoch
  and over interleaved (rotated) rounds, of a plain LightningModule, the mixin with static
  weights, and MGDA / UPGrad with ``rep_grad=True`` and MGDA with parameter gradients, for K = 2
  and 8, on the demo MLP and on a wide one (hidden 4096, batch 2048) where the GPU does the work.

    python -m benchmarks.cuda_check [--rounds 3] [--parts syncs check time]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

import lightning_lossagg
from benchmarks._timing import (
    PlainMLP,
    interleaved_times,
    median_step_time,
    quiet,
    step_times,
    synthetic_loader,
)
from lightning_lossagg import callbacks
from lightning_lossagg.demos import MultiTaskMLP


class ViewsGradientsMLP(MultiTaskMLP):
    """The demo MLP that never takes its linear heads' factors (the reference path)."""

    @staticmethod
    def _linear_factors_pay(heads: list[torch.nn.Module], representation: Tensor) -> bool:
        return False


class Synchronize(L.Callback):
    def on_train_batch_end(self, *args: object) -> None:
        torch.cuda.synchronize()


def _parameters_after(model: MultiTaskMLP, method: L.Callback, precision: str) -> Tensor:
    loader = synthetic_loader(model.hparams.num_tasks, steps=4)
    step_times(lambda: model, loader, [method], accelerator="gpu", precision=precision)
    return torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])


def check() -> None:
    for num_tasks, name, precision in [
        (6, "MGDA", "32-true"),
        (6, "UPGrad", "32-true"),
        (8, "IMTLG", "bf16-mixed"),
    ]:
        method = getattr(callbacks, name)
        torch.manual_seed(0)
        factored = MultiTaskMLP(num_tasks)
        torch.manual_seed(0)
        reference = ViewsGradientsMLP(num_tasks)
        first = _parameters_after(factored, method(rep_grad=True), precision)
        second = _parameters_after(reference, method(rep_grad=True), precision)
        print(
            f"check K={num_tasks} {name} {precision}: factors used {factored._linear_heads}, "
            f"largest parameter difference {(first - second).abs().max():.2e}",
            flush=True,
        )
    for num_tasks, name in [(2, "MGDA"), (4, "UPGrad"), (3, "PCGrad")]:
        torch.manual_seed(0)
        parameters = _parameters_after(
            MultiTaskMLP(num_tasks), getattr(callbacks, name)(), "32-true"
        )
        finite = bool(parameters.isfinite().all())
        print(f"check K={num_tasks} {name} parameter gradients: finite {finite}", flush=True)


LOSS_BASED = ["UncertaintyWeighting", "DWA", "LossScaling", "RLW", "GLS", "IMTLL", "FAMO"]

REP = ["MGDA", "PCGrad", "CAGrad", "IMTLG", "NashMTL", "AlignedMTL", "UPGrad", "GradVac"]


def _sync_sites(make: Callable[[], L.LightningModule], methods: list[L.Callback], **kwargs) -> dict:
    """Where the host waited on the GPU in 20 training steps: ``{library line or 'elsewhere':
    count}``."""
    package = str(Path(lightning_lossagg.__file__).parent)
    sites: collections.Counter[str] = collections.Counter()

    def record(message: Warning | str, *args: object, **more: object) -> None:
        if "synchroniz" not in str(message):
            return
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if f.filename.startswith(package)]
        # Else the innermost caller of torch, outside the warnings machinery.
        theirs = [f for f in stack if not f.filename.endswith(("warnings.py", "cuda_check.py"))]
        theirs = [f for f in theirs if "site-packages/torch/" not in f.filename]
        where = (ours or theirs)[-1]
        owner = "" if ours else "elsewhere: "
        sites[f"{owner}{Path(where.filename).name}:{where.lineno} {where.name}"] += 1

    loader = synthetic_loader(4, steps=20)
    make()  # the model's first construction (and its CUDA context) outside the count
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # type: ignore[assignment]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step_times(make, loader, methods, accelerator="gpu", **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return dict(sites)


def syncs(log_dir: str) -> None:
    from lightning.pytorch.loggers import CSVLogger

    def mixin() -> L.LightningModule:
        return MultiTaskMLP(4)

    variants: dict[str, tuple[Callable[[], L.LightningModule], list[L.Callback], dict]] = {
        "plain": (lambda: PlainMLP(4), [], {}),
        "static": (mixin, [], {}),
        **{name: (mixin, [getattr(callbacks, name)()], {}) for name in LOSS_BASED},
        "LossLogger+CSV": (
            mixin,
            [callbacks.LossLogger()],
            {"logger": CSVLogger(log_dir), "log_every_n_steps": 5},
        ),
        **{f"{name} rep": (mixin, [getattr(callbacks, name)(rep_grad=True)], {}) for name in REP},
        "MGDA param": (mixin, [callbacks.MGDA()], {}),
        "DBMTL param": (mixin, [callbacks.DBMTL()], {}),
        "GradNorm": (mixin, [callbacks.GradNorm()], {}),
    }
    for label, (make, methods, kwargs) in variants.items():
        sites = sorted(_sync_sites(make, methods, **kwargs).items(), key=lambda item: -item[1])
        print(f"syncs in 20 steps, {label}: {dict(sites)}", flush=True)


def _median_step(make: Callable[[], L.LightningModule], methods: list[L.Callback], loader) -> float:
    """Median wall time per step, each step's work finished on the GPU before the clock reads."""
    return median_step_time(make, loader, [*methods, Synchronize()], accelerator="gpu")


def time_steps(rounds: int) -> None:
    for label, hidden, batch_size in [("demo", 256, 256), ("wide", 4096, 2048)]:
        for num_tasks in (2, 8):
            loader = synthetic_loader(num_tasks, batch_size=batch_size, steps=40)

            def mixin(
                *methods: L.Callback, k: int = num_tasks, h: int = hidden, data=loader
            ) -> float:
                return _median_step(lambda: MultiTaskMLP(k, hidden=h), list(methods), data)

            variants: dict[str, Callable[[], float]] = {
                "plain": lambda k=num_tasks, h=hidden, data=loader: _median_step(
                    lambda: PlainMLP(k, h), [], data
                ),
                "static mixin": mixin,
                "MGDA rep": lambda: mixin(callbacks.MGDA(rep_grad=True)),
                "UPGrad rep": lambda: mixin(callbacks.UPGrad(rep_grad=True)),
                "MGDA param": lambda: mixin(callbacks.MGDA()),
            }
            times = interleaved_times(variants, rounds)
            base = statistics.median(times["plain"])
            for name, values in times.items():
                value = statistics.median(values)
                print(
                    f"{label} K={num_tasks} {name:<13} {1e3 * value:7.3f} ms  x{value / base:5.2f}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parts = ["syncs", "check", "time"]
    parser.add_argument("--parts", nargs="+", default=parts, choices=parts)
    parser.add_argument("--log-dir", default="lightning_logs", help="the CSV logger's folder")
    args = parser.parse_args()
    quiet()
    print(torch.__version__, L.__version__, torch.cuda.get_device_name(), flush=True)
    if "syncs" in args.parts:
        syncs(args.log_dir)
    if "check" in args.parts:
        check()
    if "time" in args.parts:
        time_steps(args.rounds)


if __name__ == "__main__":
    main()
