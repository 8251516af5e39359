"""``UPGrad``: the mean of the task gradients projected onto the cone of non-conflicting updates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.callbacks._checks import (
    check_non_negative,
    check_positive,
    require_multitask,
)
from lightning_lossagg.callbacks._preferences import (
    check_pref_length,
    check_pref_vector,
    valid_preferences,
)
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting, Sync
from lightning_lossagg.functional._qp import symmetric_matrix
from lightning_lossagg.functional.upgrad import upgrad_weights


class UPGrad(GradientWeighting):
    r"""Unconflicting Projection of Gradients (Quinton & Rey, 2024).

    `Jacobian Descent for Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_.
    Each task gradient is projected onto the dual cone
    :math:`\{x : \langle x, g_j\rangle \geq 0\ \forall j\}` and the projections are combined with
    the preferences :math:`p`; by the paper's Proposition 1, from the global Gramian
    (:func:`~lightning_lossagg.functional.upgrad`):

    .. math::
        v^{(i)} = \operatorname*{arg\,min}_{v \succeq p_i e_i} v^\top \tilde G v, \qquad
        w = \sum_i v^{(i)}, \qquad \tilde G = G / \operatorname{tr} G + \epsilon I.

    Each head follows its own task's gradient; ``Task.weight`` multiplies :math:`w`.

    Scale: torchjd's (LibMTL's UPGrad copies it): :math:`d = \sum_i p_i \pi(g_i)`, by default
    (:math:`p = 1/K`) the mean of the projections; the weights equal :math:`p` when no pair
    conflicts. A task without a valid sample in a step is left out: the default then averages
    over the others, a given ``pref_vector`` keeps the others' entries. Unlike torchjd
    (``norm_eps=1e-4``), only a Gramian of trace at most ``norm_eps`` (default 0) counts as zero.
    Stateless: nothing to save.

    Args:
        pref_vector: one preference :math:`p_k \geq 0` per task, in the model's task order, at
            least one > 0; ``None``: :math:`1/K`.
        reg_eps: :math:`\epsilon > 0` (torchjd: 1e-4).
        norm_eps: a Gramian whose trace is at most this gives the weights :math:`p`.
        rep_grad: take gradients at the shared representation.
        sync: with parameter gradients under DDP, ``"gradients"`` (exact) or ``"gramian"``.

    Example:
        >>> callback = UPGrad(rep_grad=True)
    """

    def __init__(
        self,
        pref_vector: Sequence[float] | None = None,
        reg_eps: float = 1e-4,
        norm_eps: float = 0.0,
        rep_grad: bool = False,
        sync: Sync = "gradients",
    ) -> None:
        super().__init__(rep_grad=rep_grad, sync=sync)
        self.pref_vector = check_pref_vector("UPGrad", pref_vector)
        self.reg_eps = check_positive("reg_eps", reg_eps, "torchjd uses reg_eps=1e-4.")
        self.norm_eps = check_non_negative("norm_eps", norm_eps)
        # Per projection, the coordinates above their bounds at the latest step: where the next
        # solves start (they rarely change from one step to the next; the weights do not depend
        # on them).
        self._supports = np.zeros((0, 0), dtype=bool)

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {
            "pref_vector": self.pref_vector,
            "reg_eps": self.reg_eps,
            "norm_eps": self.norm_eps,
            **super().method_arguments,
        }

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_pref_length("UPGrad", self.pref_vector, require_multitask(self, pl_module))

    @override
    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        assert self.valid_tasks is not None
        num_tasks = len(gramian)
        preferences = valid_preferences(self.pref_vector, self.valid_tasks)
        choices = np.full(num_tasks, 1 / num_tasks) if preferences is None else preferences.numpy()
        if self._supports.shape != (num_tasks, num_tasks):
            self._supports = np.zeros((num_tasks, num_tasks), dtype=bool)
        weights, self._supports = upgrad_weights(
            symmetric_matrix(gramian),
            choices,
            reg_eps=self.reg_eps,
            norm_eps=self.norm_eps,
            supports=self._supports,
        )
        return torch.from_numpy(weights)
