"""``GLS``: the Geometric Loss Strategy, the geometric mean of the task losses."""

from __future__ import annotations

import operator
from functools import partial

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

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
    never updates the model. Stateless: nothing to save.

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
        losses, valid = step.losses, step.valid
        # The losses <= 0, read on the host at the optimizer step (a task without a valid sample
        # has a NaN loss: never <= 0). NaN and +inf are the mixin's to report (nonfinite=...).
        self._unchecked.add(losses)
        # The weights of G over the valid tasks; the others' are finite and meet a term of 0.
        return gls_weights(losses, validate_args=False, valid=valid)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._unchecked.check(pl_module, trainer.global_step)
