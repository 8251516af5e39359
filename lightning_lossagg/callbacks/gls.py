"""``GLS``: the Geometric Loss Strategy, the geometric mean of the task losses."""

from __future__ import annotations

import math
import operator
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg import distributed
from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks._checks import LossesReadLater, require_multitask
from lightning_lossagg.functional.gls import gls_weights
from lightning_lossagg.mixin import MultiTaskMixin
from lightning_lossagg.weighting import WeightingCallback


class NonPositiveLossError(ValueError):
    """GLS met a task loss <= 0, whose logarithm it cannot take."""


class GLS(WeightingCallback):
    r"""Geometric Loss Strategy (Chennupati et al., 2019).

    `MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning <https://arxiv.org/abs/1904.08492>`_ (CVPR Workshops 2019). The objective is the
    geometric mean of the global task losses, realised as weights on them:

    .. math::
        G = \Big(\prod_{k=1}^K L_k\Big)^{1/K}, \qquad
        w_k = \frac{\partial G}{\partial L_k} = \frac{G}{K L_k},

    so :math:`\sum_k w_k L_k = G` and :math:`\sum_k w_k \nabla L_k = \nabla G`. A task without a
    valid sample in a step is left out: :math:`G` and :math:`K` are over the other tasks.

    GLS takes the logarithm of every loss, so it refuses a loss :math:`\leq 0` with a
    :class:`NonPositiveLossError` naming the task and the step. The check reads a flag copied to
    the host without stalling the device and raises before the optimizer step, so a bad step
    never updates the model. Stateless but for that check: a checkpoint saved amid an
    optimizer step (between micro-batches) keeps its earlier micro-batches' losses that the check
    will refuse.

    Example:
        >>> callback = GLS()
    """

    finite_weights = True  # a task without a valid sample takes the loss 1 in gls_weights

    def __init__(self) -> None:
        self._unchecked = LossesReadLater(
            "GLS takes the logarithm of every task loss",
            partial(operator.ge, 0.0),  # loss <= 0 (picklable, for ddp_spawn)
            "<= 0",
            "Add a small positive offset to that task's loss",
            NonPositiveLossError,
        )

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_multitask(self, pl_module)
        self._unchecked.clear()

    @override
    def task_weights(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        losses = step.losses
        # The losses <= 0, read on the host at the optimizer step (a task without a valid sample
        # has a NaN loss: never <= 0). NaN and +inf are the mixin's to report (nonfinite=...).
        self._unchecked.add(losses)
        if losses.device.type in distributed.PYTHON_FLOAT_DEVICES:
            weights = _host_gls_weights(losses.tolist(), step.counts.tolist())
            if weights is not None:
                return torch.tensor(weights, dtype=losses.dtype)
        # The weights of G over the valid tasks; the others' are finite and meet a term of 0.
        return gls_weights(losses, validate_args=False, valid=step.valid)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._unchecked.check(pl_module, trainer.global_step)

    @override
    def step_state(self) -> list[Any]:
        return self._unchecked.queued()

    @override
    def put_back_step_state(self, state: list[Any]) -> None:
        self._unchecked.put_back(state)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"unchecked": self._unchecked.offending()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._unchecked.queue_again(state_dict.get("unchecked", ()))  # (older checkpoints: {})


def _host_gls_weights(losses: list[float], counts: list[float]) -> list[float] | None:
    """:func:`~lightning_lossagg.functional.gls.gls_weights` over the tasks with a valid sample,
    in Python floats: on the CPU a dozen operations on K-element tensors cost several times
    this. ``None`` for a loss that is not finite and > 0 (the tensor arithmetic and the checks
    take it)."""
    logs = []
    for loss, count in zip(losses, counts, strict=True):
        if count > 0:
            if not 0.0 < loss < math.inf:
                return None
            logs.append(math.log(loss))
    num_valid = max(len(logs), 1)
    mean = sum(logs) / num_valid
    valid_logs = iter(logs)
    # A task without a valid sample takes the loss 1 (log 0), as gls_weights gives it.
    return [
        math.exp(mean - (next(valid_logs) if count > 0 else 0.0)) / num_valid for count in counts
    ]
