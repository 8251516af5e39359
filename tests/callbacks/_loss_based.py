"""Shared pieces of the loss-based weighting tests: the methods, tiny fits, and references.

The references recompute each method's weights from the global losses that a real fit recorded,
with the functional layer (the learned methods: autograd through its objectives and one
``torch.optim.Adam`` per task): they share no code with the callbacks but the formulas.
Importable by spawned DDP ranks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_lossagg import MaskedLoss, Task, global_task_losses
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
from lightning_lossagg.callbacks.rlw import DRAW_BLOCK, step_seed
from lightning_lossagg.functional.dwa import dwa
from lightning_lossagg.functional.famo import famo_logit_gradient, famo_weights
from lightning_lossagg.functional.gls import gls_weights
from lightning_lossagg.functional.imtl_l import imtl_l_objective, imtl_l_weights
from lightning_lossagg.functional.loss_scaling import loss_scaling_weights, update_loss_levels
from lightning_lossagg.functional.rlw import rlw
from lightning_lossagg.functional.uncertainty import uncertainty_objective, uncertainty_weights
from lightning_lossagg.weighting import WeightingCallback
from tests.callbacks._fits import (  # noqa: F401 - re-exported for the tests
    assert_nested_equal,
    concatenated_ddp_batches,
    ddp_batches,
    initial_model_state,
    loader,
    model_from,
    trainer,
    training_batches,
)
from tests.models import ThreeTaskNet
from tests.process_group import CollectivesPerStep

STATIC_WEIGHTS = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)  # ThreeTaskNet's Task.weight

# Arguments that make every method's state move visibly within a few steps.
METHODS: dict[str, Callable[[], WeightingCallback]] = {
    "uncertainty_weighting": lambda: UncertaintyWeighting(lr=0.1, classification_tasks=["kind"]),
    "dwa": lambda: DWA(temperature=0.5),
    "loss_scaling": lambda: LossScaling(mode="ema", decay=0.5, warmup_steps=1),
    "rlw": lambda: RLW(seed=3),
    "gls": GLS,
    "imtl_l": lambda: IMTLL(lr=0.1),
    "famo": lambda: FAMO(lr=0.1),
}
STATEFUL = [name for name in METHODS if name != "gls"]


class Recorder(L.Callback):
    """Keeps every training step's global figures; optionally the same batch's losses after the
    optimizer step (what FAMO measures), evaluated here independently of the callback."""

    def __init__(self, evaluate_after: bool = False) -> None:
        self.evaluate_after = evaluate_after
        self.steps: list[dict[str, Any]] = []
        self._optimizer_step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._optimizer_step = trainer.global_step  # optimizer steps done before this batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = pl_module.loss_record
        step = {
            "optimizer_step": self._optimizer_step,
            "epoch": trainer.current_epoch,
            "losses": record.losses.clone(),
            "counts": record.counts.clone(),
            "valid": record.counts > 0,
            "weights": record.weights.clone(),
            "state": {k: v.clone() for k, v in record.method_state.items()},
        }
        if self.evaluate_after:
            with torch.no_grad(), trainer.precision_plugin.train_step_context():
                step["losses_after"] = pl_module.compute_global_losses(batch).losses.clone()
        self.steps.append(step)


def global_losses(losses: list[float], valid: list[bool] | None = None) -> GlobalTaskLosses:
    """One step's global figures for direct calls of ``task_weights``: one sample per task, whose
    loss is ``losses[k]`` (masked out where ``valid[k]`` is False)."""
    valid = [True] * len(losses) if valid is None else valid
    tasks = {f"task_{k}": Task("mse") for k in range(len(losses))}
    masked = {
        name: MaskedLoss(torch.tensor([value], dtype=torch.float64), torch.tensor([ok]))
        for name, value, ok in zip(tasks, losses, valid, strict=True)
    }
    return global_task_losses(masked, tasks)


def at_step(global_step: int, epoch: int = 0) -> Any:
    """A stand-in for :class:`~tests.models.ThreeTaskNet` as the methods' hooks see it:
    ``trainer``'s step counters, the task names, and an optimizer step that is taken, with
    finite losses (a step refused here puts nothing back: refusals are tested on real fits)."""
    trainer = SimpleNamespace(global_step=global_step, current_epoch=epoch)
    return SimpleNamespace(
        trainer=trainer,
        task_names=("price", "kind", "sold"),
        skipping_optimizer_step=False,
        optimizer_step_taken=True,
        forget_refused_step=lambda: None,
        forget_unfinished_step=lambda: None,
    )


def fit_method(
    name: str,
    batches: list,
    max_epochs: int,
    *,
    val_batches: list | None = None,
    extra_callbacks: tuple[L.Callback, ...] = (),
    ckpt_path: str | Path | None = None,
    callback: WeightingCallback | None = None,
    **trainer_kwargs: Any,
) -> tuple[WeightingCallback, Recorder, ThreeTaskNet]:
    """A fresh ``name`` callback (or ``callback``) fitted on ``batches`` from the seeded initial
    model."""
    callback = METHODS[name]() if callback is None else callback
    recorder = Recorder(evaluate_after=name == "famo")
    model = model_from(initial_model_state())
    run = trainer([callback, recorder, *extra_callbacks], max_epochs, **trainer_kwargs)
    val_loader = None if val_batches is None else loader(val_batches)
    run.fit(model, loader(batches), val_loader, ckpt_path=ckpt_path)
    return callback, recorder, model


# ----------------------------------------------------------------------------- references
class _AdamPerTask:
    """A ``torch.optim.Adam`` per task, stepped only when its task takes part."""

    def __init__(self, lr: float, weight_decay: float = 0.0) -> None:
        self.scalars = [torch.zeros((), dtype=torch.float64, requires_grad=True) for _ in range(3)]
        self.optimizers = [
            torch.optim.Adam([scalar], lr=lr, weight_decay=weight_decay) for scalar in self.scalars
        ]

    def values(self) -> Tensor:
        return torch.stack([scalar.detach() for scalar in self.scalars])

    def step(self, gradient: Tensor, taking_part: Tensor) -> None:
        for task, (scalar, optimizer) in enumerate(zip(self.scalars, self.optimizers, strict=True)):
            if taking_part[task]:
                scalar.grad = gradient[task].clone()
                optimizer.step()


def _optimizer_steps(steps: list[dict]) -> list[list[dict]]:
    """The micro-batches of each optimizer step, in order."""
    groups: dict[int, list[dict]] = {}
    for step in steps:
        groups.setdefault(step["optimizer_step"], []).append(step)
    return list(groups.values())


def _mean_valid_losses(group: list[dict]) -> tuple[Tensor, Tensor]:
    """Each task's loss averaged over the micro-batches where it had a valid sample."""
    total = sum(torch.where(s["valid"], s["losses"], 0.0) for s in group)
    count = sum(s["valid"].to(torch.float64) for s in group)
    return total / count.clamp(min=1), count > 0


def _learned_scales(steps: list[dict], lr: float, weights_of, objective_of) -> list[Tensor]:
    adam, weights = _AdamPerTask(lr), []
    for group in _optimizer_steps(steps):
        scales = adam.values().requires_grad_()
        weights += [weights_of(scales.detach())] * len(group)
        losses, seen = _mean_valid_losses(group)
        (gradient,) = torch.autograd.grad(objective_of(losses, scales), scales)
        adam.step(gradient, seen)
    return weights


def _uncertainty(steps: list[dict], callback: UncertaintyWeighting) -> list[Tensor]:
    classification = torch.tensor([False, True, False])  # "kind"
    return _learned_scales(
        steps,
        callback.lr,
        lambda s: uncertainty_weights(s, classification),
        lambda losses, s: uncertainty_objective(losses, s, classification),
    )


def _imtl_l(steps: list[dict], callback: IMTLL) -> list[Tensor]:
    return _learned_scales(steps, callback.lr, imtl_l_weights, imtl_l_objective)


def _dwa(steps: list[dict], callback: DWA) -> list[Tensor]:
    def period(step: dict) -> int:
        if callback.window_steps is None:
            return step["epoch"]
        return step["optimizer_step"] // callback.window_steps

    means = {}
    for index in sorted({period(step) for step in steps}):
        in_period = [step for step in steps if period(step) == index]
        total = sum(torch.nan_to_num(s["losses"]) * s["counts"] for s in in_period)
        means[index] = total / sum(s["counts"] for s in in_period)  # NaN: no valid sample
    weights = []
    for step in steps:
        index = period(step)
        if index < 2:
            weights.append(torch.ones(3, dtype=torch.float64))
            continue
        previous, before = means[index - 1], means[index - 2]
        has_rate = previous.isfinite() & before.isfinite()  # otherwise the rate is taken as 1
        previous, before = previous.where(has_rate, 1.0), before.where(has_rate, 1.0)
        weights.append(dwa(previous, before, callback.temperature))
    return weights


def _loss_scaling(steps: list[dict], callback: LossScaling) -> list[Tensor]:
    levels: list[Tensor | None] = [None, None, None]  # per task, from its valid steps only
    weights = []
    for step in steps:
        in_warmup = step["optimizer_step"] < callback.warmup_steps
        for task in range(3):
            if not step["valid"][task]:
                continue
            loss = step["losses"][task : task + 1]
            if callback.mode == "ema":
                levels[task] = update_loss_levels(levels[task], loss, callback.decay)
            elif not in_warmup and levels[task] is None:
                levels[task] = loss
        if in_warmup:
            weights.append(torch.ones(3, dtype=torch.float64))
            continue
        weights.append(
            torch.cat(
                [
                    torch.ones(1) if level is None else loss_scaling_weights(level, callback.eps)
                    for level in levels
                ]
            )
        )
    return weights


def _rlw(steps: list[dict], callback: RLW) -> list[Tensor]:
    def draw(optimizer_step: int) -> Tensor:
        block, row = divmod(optimizer_step, DRAW_BLOCK)
        generator = torch.Generator().manual_seed(step_seed(callback.seed, block))
        return rlw(3, generator, dtype=torch.float64, draws=DRAW_BLOCK)[row]

    return [draw(step["optimizer_step"]) for step in steps]


def _on_valid(fn: Callable[..., Tensor], valid: Tensor, *vectors: Tensor) -> Tensor:
    """``fn`` applied to the valid tasks only, scattered back (0 elsewhere)."""
    result = torch.zeros(valid.shape, dtype=torch.float64)
    result[valid] = fn(*(vector[valid] for vector in vectors))
    return result


def _gls(steps: list[dict], callback: GLS) -> list[Tensor]:
    return [_on_valid(gls_weights, step["valid"], step["losses"]) for step in steps]


def _famo(steps: list[dict], callback: FAMO) -> list[Tensor]:
    adam, weights = _AdamPerTask(callback.lr, callback.weight_decay), []
    for group in _optimizer_steps(steps):
        logits = adam.values()
        weights_of = partial(famo_weights, eps=callback.eps)
        for step in group:
            weights.append(_on_valid(weights_of, step["valid"], logits, step["losses"]))
        last = group[-1]  # the micro-batch evaluated again after the optimizer step
        valid = last["valid"]
        gradient_of = partial(famo_logit_gradient, eps=callback.eps)
        gradient = _on_valid(gradient_of, valid, logits, last["losses"], last["losses_after"])
        adam.step(gradient, valid)
    return weights


REFERENCES: dict[str, Callable[[list[dict], Any], list[Tensor]]] = {
    "uncertainty_weighting": _uncertainty,
    "dwa": _dwa,
    "loss_scaling": _loss_scaling,
    "rlw": _rlw,
    "gls": _gls,
    "imtl_l": _imtl_l,
    "famo": _famo,
}


def expected_record_weights(name: str, steps: list[dict], callback: Any) -> list[Tensor]:
    """What the mixin must record: reference weights times the static ones, 0 where invalid."""
    return [
        torch.where(step["valid"], weights.to(torch.float64) * STATIC_WEIGHTS, 0.0)
        for step, weights in zip(steps, REFERENCES[name](steps, callback), strict=True)
    ]


# ----------------------------------------------------------------------------- DDP
DDP_EPOCHS = 3


def ddp_rank(rank: int, names: list[str], accumulate: int = 1) -> dict[str, dict[str, Any]]:
    """One rank of a 2-process run (:func:`tests.process_group.run_on_lightning_ranks`): each
    method fits with Lightning's DDP strategy in turn (``accumulate`` micro-batches a step)."""
    results = {}
    for name in names:
        callback, recorder = METHODS[name](), Recorder(evaluate_after=name == "famo")
        collectives = CollectivesPerStep()
        model = model_from(initial_model_state())
        run = trainer(
            [callback, collectives, recorder],
            DDP_EPOCHS,
            strategy="ddp",
            devices=2,
            use_distributed_sampler=False,
            accumulate_grad_batches=accumulate,
        )
        run.fit(model, loader(ddp_batches()[rank]))
        results[name] = {
            "weights": torch.stack([step["weights"] for step in recorder.steps]),
            "state": copy.deepcopy(callback.state_dict()),
            "parameters": {k: v.clone() for k, v in model.state_dict().items()},
            "collectives_per_step": collectives.calls,
        }
    return results
