"""Shared pieces of the Gramian-based weighting tests: the methods, tiny fits, and references.

A fit records, per training batch, the model's parameters before it, the batch, the weights the
mixin recorded and the parameters after it. The references recompute everything by hand from
those: per-task gradients with plain ``torch.autograd.grad`` on the valid labels
(:func:`tests.models.reference_task_losses`), their Gramian, the functional method on it, and the
update LibMTL would apply. They share no code with the callbacks but the functional layer.
Importable by spawned DDP ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_lossagg.callbacks import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    NashMTL,
    PCGrad,
    UPGrad,
)
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting
from lightning_lossagg.callbacks.rlw import step_seed
from lightning_lossagg.functional import (
    aligned_mtl,
    cagrad,
    imtl_g,
    mgda,
    nash_mtl,
    pcgrad,
    upgrad,
)
from tests.callbacks._fits import (
    concatenated_ddp_batches,
    ddp_batches,
    initial_model_state,
    loader,
    model_from,
    trainer,
    training_batches,
)
from tests.models import ThreeTaskNet, reference_task_losses
from tests.process_group import CollectivesPerStep

STATIC_WEIGHTS = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)  # ThreeTaskNet's Task.weight
LEARNING_RATE = 0.1  # ThreeTaskNet's plain SGD

# Arguments under which every method's weights move visibly on the tiny model.
METHODS: dict[str, Callable[..., GradientWeighting]] = {
    "mgda": lambda **kw: MGDA(normalization="l2", **kw),
    "pcgrad": lambda **kw: PCGrad(seed=3, **kw),
    "cagrad": lambda **kw: CAGrad(c=0.5, **kw),
    "imtl_g": lambda **kw: IMTLG(**kw),
    "upgrad": lambda **kw: UPGrad(**kw),
    "aligned_mtl": lambda **kw: AlignedMTL(**kw),
    "nash_mtl": lambda **kw: NashMTL(update_weights_every=2, max_norm=0.5, **kw),
}


# Under DDP too: MGDA's loss normalisations read the step's losses, which must be the global ones.
DDP_METHODS: dict[str, Callable[..., GradientWeighting]] = {
    **METHODS,
    "mgda_loss+": lambda **kw: MGDA(normalization="loss+", **kw),
}


class Recorder(L.Callback):
    """Per training batch: the global step, the batch, the parameters before and after, and the
    weights the mixin recorded (``Task.weight`` included, 0 for a task without a valid label)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(
            {"global_step": trainer.global_step, "batch": batch, "before": _snapshot(pl_module)}
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = self.steps[-1]
        step["weights"] = pl_module.loss_record.weights.clone()
        step["valid"] = pl_module.loss_record.counts > 0
        step["after"] = _snapshot(pl_module)


def _snapshot(module: L.LightningModule) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def fit(
    callback: GradientWeighting,
    batches: list,
    max_epochs: int,
    *,
    extra_callbacks: tuple[L.Callback, ...] = (),
    ckpt_path: str | Path | None = None,
    **trainer_kwargs: Any,
) -> tuple[Recorder, ThreeTaskNet]:
    """``callback`` fitted on ``batches`` from the seeded initial model."""
    recorder = Recorder()
    model = model_from(initial_model_state())
    run = trainer([callback, recorder, *extra_callbacks], max_epochs, **trainer_kwargs)
    run.fit(model, loader(batches), ckpt_path=ckpt_path)
    return recorder, model


# ----------------------------------------------------------------------------- by hand
class HandStep:
    """One batch through a copy of the model, and its per-task gradients by plain autograd."""

    def __init__(self, state: dict[str, Tensor], batch: Any, rep_grad: bool) -> None:
        self.model = model_from(state)
        inputs, _ = batch
        self.shared = self.model.forward_shared(inputs)
        predictions = self.model.forward_heads(self.shared)
        self.model.forward = lambda _: predictions
        self.losses = torch.stack(list(reference_task_losses(self.model, batch).values()))
        self.valid = ~torch.isnan(self.losses)  # a mean over no label is NaN
        self.rep_grad = rep_grad
        self.trunk = list(self.model.trunk.parameters())
        at = [self.shared] if rep_grad else self.trunk
        rows = []
        for loss, valid in zip(self.losses, self.valid, strict=True):
            if valid:
                grads = torch.autograd.grad(loss, at, retain_graph=True)
                rows.append(torch.cat([g.flatten() for g in grads]))
            else:
                rows.append(torch.zeros(sum(t.numel() for t in at), dtype=torch.float64))
        self.jacobian = torch.stack(rows)
        self.gramian = self.jacobian @ self.jacobian.T

    def gradients(self, weights: Tensor, heads_weighted: bool = False) -> dict[str, Tensor]:
        """LibMTL's update for the adaptive ``weights``: the trunk follows
        ``sum_k w_k s_k g_k`` and each head ``s_k grad L_k`` (``heads_weighted``: Nash-MTL's
        ``w_k s_k grad L_k``)."""
        coefficients = torch.where(self.valid, weights * STATIC_WEIGHTS, 0.0)
        combined = coefficients @ self.jacobian
        if self.rep_grad:
            trunk_grads = torch.autograd.grad(
                self.shared, self.trunk, combined.view_as(self.shared), retain_graph=True
            )
        else:
            trunk_grads = torch.split(combined, [p.numel() for p in self.trunk])
        head_coefficients = (
            coefficients if heads_weighted else torch.where(self.valid, STATIC_WEIGHTS, 0.0)
        )
        terms = zip(head_coefficients, self.losses, self.valid, strict=True)
        head_objective = sum(c * loss for c, loss, ok in terms if ok)
        heads = list(self.model.heads.named_parameters())
        head_grads = torch.autograd.grad(
            head_objective, [p for _, p in heads], retain_graph=True, allow_unused=True
        )
        grads = {
            f"trunk.{name}": grad.reshape(parameter.shape)
            for (name, parameter), grad in zip(
                self.model.trunk.named_parameters(), trunk_grads, strict=True
            )
        }
        for (name, parameter), grad in zip(heads, head_grads, strict=True):
            grads[f"heads.{name}"] = torch.zeros_like(parameter) if grad is None else grad
        return grads


def clip_trunk(grads: dict[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """``torch.nn.utils.clip_grad_norm_`` on the trunk's gradients, written out."""
    trunk = [name for name in grads if name.startswith("trunk.")]
    norm = torch.cat([grads[name].flatten() for name in trunk]).norm()
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return {name: grad * factor if name in trunk else grad for name, grad in grads.items()}


def assert_update(step: dict[str, Any], grads: dict[str, Tensor], msg: str = "") -> None:
    """The recorded parameter change is plain SGD's ``-lr * grads``."""
    for name, grad in grads.items():
        change = step["after"][name] - step["before"][name]
        torch.testing.assert_close(
            change, -LEARNING_RATE * grad, rtol=1e-7, atol=1e-10, msg=f"{msg} {name}"
        )


def on_valid(fn: Callable[..., Tensor], valid: Tensor, gramian: Tensor, *vectors: Tensor) -> Tensor:
    """``fn`` on the valid tasks' sub-Gramian (and sub-vectors), scattered back (0 elsewhere)."""
    index = valid.nonzero().flatten()
    result = torch.zeros(len(valid), dtype=torch.float64)
    result[index] = fn(gramian[index][:, index], *(vector[index] for vector in vectors))
    return result


def _mgda_l2(gramian: Tensor) -> Tensor:
    norms = gramian.diagonal().sqrt()
    return mgda(gramian / torch.outer(norms, norms)) / norms


def _nash_reference(callback: NashMTL) -> Callable[[HandStep, int], Tensor]:
    """Solved every ``update_weights_every`` steps from the previous solution (ones at first);
    a task without a valid label keeps its previous value; reused in between."""
    state: dict[str, Tensor] = {"previous": torch.ones(3, dtype=torch.float64)}

    def weights(hand: HandStep, global_step: int) -> Tensor:
        if global_step % callback.update_weights_every == 0 or "last" not in state:
            solution = on_valid(
                lambda g, p: nash_mtl(g, p, max_norm=0.0),
                hand.valid,
                hand.gramian,
                state["previous"],
            )
            state["previous"] = torch.where(hand.valid, solution, state["previous"])
            state["last"] = state["previous"]
        return state["last"]

    return weights


def reference_weights(name: str, callback: Any) -> Callable[[HandStep, int], Tensor]:
    """``(hand step, global step) -> adaptive weights`` of the callback ``METHODS[name]`` made."""
    if name == "nash_mtl":
        return _nash_reference(callback)
    functions: dict[str, Callable[[Tensor, int], Tensor]] = {
        "mgda": lambda g, _: _mgda_l2(g),
        "pcgrad": lambda g, global_step: pcgrad(
            g, torch.Generator().manual_seed(step_seed(callback.seed, global_step))
        ),
        "cagrad": lambda g, _: cagrad(g, c=callback.c, rescale=callback.rescale),
        "imtl_g": lambda g, _: imtl_g(g),
        "upgrad": lambda g, _: upgrad(g),
        "aligned_mtl": lambda g, _: aligned_mtl(g),
    }
    function = functions[name]
    return lambda hand, global_step: on_valid(
        lambda g: function(g, global_step), hand.valid, hand.gramian
    )


def reference_run(
    steps: list[dict[str, Any]],
    rep_grad: bool,
    weights_of: Callable[[HandStep, int], Tensor],
    heads_weighted: bool = False,
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """By hand, for every recorded step: the weights the mixin must record (``Task.weight``
    included, 0 for a task without a valid label) and the gradients of LibMTL's update (before
    any clipping or accumulation)."""
    weights, grads = [], []
    for step in steps:
        hand = HandStep(step["before"], step["batch"], rep_grad)
        assert torch.equal(hand.valid, step["valid"])
        adaptive = weights_of(hand, step["global_step"])
        weights.append(torch.where(hand.valid, adaptive * STATIC_WEIGHTS, 0.0))
        grads.append(hand.gradients(adaptive, heads_weighted=heads_weighted))
    return weights, grads


def check_fit_against_hand(
    callback: GradientWeighting,
    weights_of: Callable[[HandStep, int], Tensor],
    heads_weighted: bool = False,
    max_norm: float = 0.0,
    batches: list | None = None,
) -> list[dict[str, Any]]:
    """Fit ``callback`` for 4 steps (default: :func:`training_batches`, one batch without a valid
    "kind" label) and check every step's weights and parameter update against the hand-made
    references."""
    recorder, _ = fit(callback, batches or training_batches(), max_epochs=2)
    steps = recorder.steps
    assert len(steps) == 4 and not all(bool(step["valid"].all()) for step in steps)
    assert_adaptive(steps)
    weights, grads = reference_run(steps, callback.rep_grad, weights_of, heads_weighted)
    assert_weights(steps, weights)
    for index, (step, step_grads) in enumerate(zip(steps, grads, strict=True)):
        if max_norm > 0:
            step_grads = clip_trunk(step_grads, max_norm)
        assert_update(step, step_grads, f"step {index}")
    return steps


def assert_weights(steps: list[dict[str, Any]], expected: list[Tensor], msg: str = "") -> None:
    assert len(steps) == len(expected)
    for index, (step, weights) in enumerate(zip(steps, expected, strict=True)):
        torch.testing.assert_close(
            step["weights"], weights, rtol=1e-7, atol=1e-10, msg=f"{msg} step {index}"
        )


def assert_adaptive(steps: list[dict[str, Any]]) -> None:
    """The weights changed from step to step: a test of them can fail."""
    distinct = {tuple(step["weights"].tolist()) for step in steps}
    assert len(distinct) > 1


# ----------------------------------------------------------------------------- DDP
DDP_EPOCHS = 2


def ddp_fit(name: str, rep_grad: bool, rank: int | None = None) -> dict[str, Any]:
    """Fit ``name`` with ``sync="gradients"``: one process on the concatenated batches
    (``rank=None``) or one rank of a 2-process DDP run on its own batches."""
    callback = DDP_METHODS[name](rep_grad=rep_grad, sync="gradients")
    collectives = CollectivesPerStep()
    if rank is None:
        recorder, model = fit(callback, concatenated_ddp_batches(), DDP_EPOCHS)
    else:
        recorder, model = fit(
            callback,
            ddp_batches()[rank],
            DDP_EPOCHS,
            extra_callbacks=(collectives,),
            strategy="ddp",
            devices=2,
            use_distributed_sampler=False,
        )
    return {
        "collectives_per_step": collectives.calls,
        "weights": torch.stack([step["weights"] for step in recorder.steps]),
        "parameters": {k: v.clone() for k, v in model.state_dict().items()},
        "state": callback.state_dict(),
    }


def ddp_rank(rank: int, cases: list[tuple[str, bool]]) -> dict[tuple[str, bool], dict]:
    """One rank of a 2-process run (:func:`tests.process_group.run_on_lightning_ranks`): every
    case fits with Lightning's DDP strategy in turn; DDP averages the gradients in backward, as in
    any DDP run."""
    return {case: ddp_fit(*case, rank=rank) for case in cases}
