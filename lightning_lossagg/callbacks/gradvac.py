"""``GradVac``: pull the cosine of every pair of task gradients up to an adaptive target."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks._checks import check_int_at_least, require_multitask
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting, Sync
from lightning_lossagg.callbacks.rlw import step_seed
from lightning_lossagg.functional._qp import symmetric_matrix
from lightning_lossagg.functional.gradvac import gradvac_weights, task_orders
from lightning_lossagg.mixin import MultiTaskMixin


class GradVac(GradientWeighting):
    r"""Gradient Vaccine (Wang et al., 2021), whole-model variant.

    `Gradient Vaccine: Investigating and Improving Multi-task Optimization in Massively
    Multilingual Models <https://arxiv.org/abs/2010.05874>`_ (ICLR 2021). For each task
    :math:`i` and each other task :math:`j` in random order, with :math:`\phi_{ij}` the cosine
    between the corrected :math:`g_i^{PC}` and :math:`g_j`, and :math:`\hat\phi_{ij}` its target:

    .. math::
        \text{if } \phi_{ij} < \hat\phi_{ij}:\quad
        g_i^{PC} \mathrel{+}= \frac{\lVert g_i^{PC}\rVert
            \big(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2} - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\big)}
            {\lVert g_j\rVert \sqrt{1-\hat\phi_{ij}^2}}\, g_j, \qquad
        \hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta\phi_{ij},

    and the shared part follows :math:`d = \sum_i g_i^{PC} = \sum_k w_k g_k`, the weights of
    :func:`~lightning_lossagg.functional.gradvac` (scale of LibMTL and torchjd: 1 when nothing
    is corrected), times ``Task.weight``; each head follows its own task's gradient (the
    surrogate of :class:`GradientWeighting`). The targets :math:`\hat\phi` (zero at the start)
    are the state: a [K, K] matrix updated at every training step (micro-batch) from the step's
    global Gramian, only for the pairs of tasks that both have a valid sample in it.

    The order of the tasks :math:`j` is drawn from a CPU ``torch.Generator`` seeded from
    ``(seed, global_step)``: every rank draws the same order without a collective, a resumed run
    draws the orders of an uninterrupted one, and the global generator is not touched.

    Differences from LibMTL: the targets move at every visit of a pair (paper, torchjd), not
    only when a correction is made; only the whole-model grouping (``GradVac_group_type=0``);
    LibMTL refuses representation gradients, which this callback accepts (``rep_grad=True``:
    the cosines are those of the gradients at the shared representation).

    The targets are in this callback's ``state_dict`` (the model's does not change) and logged as
    ``train/target_cos/<task_i>~<task_j>`` (task :math:`i`'s target towards :math:`j`, for
    :math:`i` before :math:`j`), with the base's ``grad_norm`` and ``grad_cos``.

    Args:
        beta: the EMA rate :math:`\beta` of the targets, in [0, 1] (LibMTL: 0.5).
        seed: an int >= 0 for the random task orders.
        rep_grad: take gradients at the shared representation.
        sync: with parameter gradients under DDP, ``"gradients"`` (exact) or ``"gramian"``.

    Example:
        >>> callback = GradVac(beta=0.5, seed=0)
    """

    def __init__(
        self, beta: float = 0.5, seed: int = 0, rep_grad: bool = False, sync: Sync = "gradients"
    ) -> None:
        super().__init__(rep_grad=rep_grad, sync=sync)
        if isinstance(beta, bool) or not isinstance(beta, Real) or not math.isfinite(beta):
            raise ValueError(f"`beta` must be a number in [0, 1] (LibMTL uses 0.5); got {beta!r}.")
        if not 0 <= beta <= 1:
            raise ValueError(f"`beta` must be in [0, 1] (LibMTL uses 0.5); got {beta}.")
        self.beta: float = float(beta)
        self.seed: int = check_int_at_least("seed", seed, 0, "Pass e.g. seed=0.")
        self._generator: torch.Generator = torch.Generator()
        self._num_tasks: int = 0
        self._targets: Tensor | None = None

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"beta": self.beta, "seed": self.seed, **super().method_arguments}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._num_tasks = len(require_multitask(self, pl_module))
        self._check_targets(self._targets)

    @override
    def prepare_step(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> None:
        self._generator.manual_seed(step_seed(self.seed, pl_module.trainer.global_step))

    @override
    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        assert self.valid_tasks is not None
        # In NumPy and Python floats: torch's indexing and scalar operations cost microseconds
        # each, the whole method a few more.
        size = self._num_tasks
        targets = np.zeros((size, size)) if self._targets is None else self._targets.numpy()
        index = np.flatnonzero(self.valid_tasks.numpy())
        pairs = np.ix_(index, index)
        orders = task_orders(len(index), self._generator)
        current = np.clip(targets[pairs], -1.0, 1.0)
        matrix = symmetric_matrix(gramian)
        weights, new_targets = gradvac_weights(matrix, current, self.beta, orders)
        updated = targets.copy()
        updated[pairs] = new_targets
        self._targets = torch.from_numpy(updated)
        return torch.tensor(weights, dtype=torch.float64)

    @override
    def pairwise_state_to_log(self) -> dict[str, Tensor]:
        state = super().pairwise_state_to_log()
        if self._targets is not None:
            state["target_cos"] = self._targets.clone()
        return state

    @override
    def step_state(self) -> Tensor | None:
        return self._targets  # replaced, never changed in place

    @override
    def put_back_step_state(self, state: Tensor | None) -> None:
        self._targets = state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"targets": None if self._targets is None else self._targets.clone()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        targets = state_dict["targets"]
        self._check_targets(targets)
        self._targets = None if targets is None else targets.to("cpu", torch.float64)

    def _check_targets(self, targets: Tensor | None) -> None:
        size = self._num_tasks
        if targets is not None and size and tuple(targets.shape) != (size, size):
            raise ValueError(
                f"This GradVac holds targets of shape {tuple(targets.shape)} for a model with "
                f"{size} tasks: they belong to another model. Resume the same model, or create "
                "a new GradVac."
            )
