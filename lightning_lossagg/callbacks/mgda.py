"""``MGDA``: the min-norm combination of the (normalised) task gradients (MGDA-UB)."""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg import distributed
from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting, Sync
from lightning_lossagg.functional._qp import symmetric_matrix
from lightning_lossagg.functional.mgda import min_norm_weights
from lightning_lossagg.mixin import MultiTaskMixin

Normalization = Literal["none", "l2", "loss", "loss+"]


class MGDA(GradientWeighting):
    r"""Multiple-Gradient Descent (Sener & Koltun, 2018), with LibMTL's gradient normalisation.

    `Multi-Task Learning as Multi-Objective Optimization <https://arxiv.org/abs/1810.04650>`_
    (NeurIPS 2018). Each task gradient is divided by a normaliser :math:`n_k` and the shared part
    follows the point of least norm in the convex hull of the normalised gradients:

    .. math::
        \lambda = \operatorname*{arg\,min}_{\lambda \in \Delta^K}
            \Big\lVert \sum_k \lambda_k \frac{g_k}{n_k} \Big\rVert^2
            = \operatorname*{arg\,min}_{\lambda \in \Delta^K}
            \lambda^\top \frac{G}{n n^\top} \lambda, \qquad
        d = \sum_k \frac{\lambda_k}{n_k}\, g_k, \quad w_k = \frac{\lambda_k}{n_k},

    with :math:`n_k = 1` (``"none"``, LibMTL's default ``mgda_gn``), :math:`\lVert g_k\rVert`
    (``"l2"``), :math:`L_k` (``"loss"``) or :math:`L_k \lVert g_k\rVert` (``"loss+"``), where
    :math:`L_k` is the step's global task loss. :math:`\lambda` comes from
    :func:`~lightning_lossagg.functional.mgda` (exact, instead of LibMTL's Frank-Wolfe). Each head
    follows its own task's gradient; ``Task.weight`` multiplies :math:`w`.

    Scale: LibMTL's. With ``"none"`` the weights lie on the simplex (sum 1), as in LibMTL and
    torchjd's ``MGDA``. With a normalisation the update is the min-norm combination of the
    normalised gradients, i.e. :math:`w = \lambda / n` on the original ones (LibMTL with parameter
    gradients; with ``rep_grad=True`` LibMTL combines the unnormalised representation gradients
    with :math:`\lambda`, which is not the min-norm point it solved for: here both modes use
    :math:`\lambda / n`). A task whose normaliser is 0 (a zero gradient, or a zero loss with
    ``"loss"``) is left out of the min-norm problem with weight 0, where LibMTL divides by 0.
    ``"loss"`` and ``"loss+"`` refuse a negative loss with a ValueError naming the task.
    Stateless: nothing to save.

    Args:
        normalization: ``"none"``, ``"l2"``, ``"loss"`` or ``"loss+"`` (LibMTL's ``mgda_gn``).
        rep_grad: take gradients at the shared representation (MGDA-UB).
        sync: with parameter gradients under DDP, ``"gradients"`` (exact) or ``"gramian"``.

    Example:
        >>> callback = MGDA(normalization="l2", rep_grad=True)
    """

    def __init__(
        self,
        normalization: Normalization = "none",
        rep_grad: bool = False,
        sync: Sync = "gradients",
    ) -> None:
        super().__init__(rep_grad=rep_grad, sync=sync)
        if normalization not in get_args(Normalization):
            raise ValueError(
                "`normalization` must be 'none', 'l2', 'loss' or 'loss+' (LibMTL's mgda_gn); "
                f"got {normalization!r}."
            )
        self.normalization = normalization
        self._losses: distributed.HostCopy | None = None  # the step's losses and valid flags
        self._names: tuple[str, ...] = ()
        self._global_step = 0
        # The tasks with a positive weight at the latest step: where the next solve starts (the
        # support rarely changes from one step to the next; the result does not depend on it).
        self._positive = np.zeros(0, dtype=bool)

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"normalization": self.normalization, **super().method_arguments}

    @override
    def prepare_step(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> None:
        if self.normalization in ("loss", "loss+"):
            # Read once the Gramian is on the host: that wait covers this copy too.
            losses = step.losses.detach()
            self._losses = distributed.HostCopy(torch.stack([losses, step.valid.to(losses.dtype)]))
            self._names = step.names
            self._global_step = pl_module.trainer.global_step

    @override
    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        # In NumPy: a few K×K operations at every training step cost a fraction of torch's.
        matrix = symmetric_matrix(gramian)
        if self.normalization == "none":
            weights = min_norm_weights(matrix, guess=self._guess(len(matrix)))
            self._positive = weights > 0
            return torch.from_numpy(weights)
        normalizers = self._normalizers(matrix)
        if not np.isfinite(normalizers).all():
            # A non-finite loss: the mixin's non-finite policy decides the step.
            return torch.ones(len(matrix), dtype=torch.float64)
        weights = np.zeros(len(matrix))
        usable = normalizers > 0
        if usable.any():
            scale = normalizers[usable]
            scaled = matrix[np.ix_(usable, usable)] / np.outer(scale, scale)
            weights[usable] = min_norm_weights(scaled, guess=self._guess(len(scale))) / scale
            self._positive = weights[usable] > 0
        return torch.from_numpy(weights)

    def _guess(self, num_tasks: int) -> np.ndarray | None:
        return self._positive if len(self._positive) == num_tasks else None

    def _normalizers(self, matrix: np.ndarray) -> np.ndarray:
        norms = np.sqrt(matrix.diagonal().clip(min=0.0))
        if self.normalization == "none":
            return np.ones_like(norms)
        if self.normalization == "l2":
            return norms
        assert self._losses is not None
        all_losses, valid = self._losses.get().double().numpy()
        # weights_from_gramian sees the valid tasks only.
        losses = all_losses[valid > 0]
        names = [name for name, ok in zip(self._names, valid, strict=True) if ok]
        negative = [
            f"{name!r} ({loss:g})"
            for name, loss in zip(names, losses.tolist(), strict=True)
            if loss < 0
        ]
        if negative:
            raise ValueError(
                f"MGDA(normalization={self.normalization!r}) divides each task's gradient by its "
                f"loss, but the loss of task(s) {', '.join(negative)} was negative at global step "
                f"{self._global_step}. Use normalization='l2' or 'none' for such losses."
            )
        return losses if self.normalization == "loss" else losses * norms
