"""``AlignedMTL``: align the task gradients' principal components (Independent Component
Alignment)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

import lightning as L
import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.callbacks._checks import require_multitask
from lightning_lossagg.callbacks._preferences import (
    check_pref_length,
    check_pref_vector,
    valid_preferences,
)
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting, Sync
from lightning_lossagg.functional._qp import symmetric_matrix
from lightning_lossagg.functional.aligned_mtl import ScaleMode, aligned_mtl_weights


class AlignedMTL(GradientWeighting):
    r"""Aligned-MTL (Senushkin et al., 2023).

    `Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_ (CVPR 2023). The gradient matrix :math:`J = U\Sigma
    V^\top` is replaced by :math:`\hat J = \sigma\, U V^\top` (orthogonal aligned gradients of a
    common norm); with the eigendecomposition :math:`G = Q \Lambda Q^\top` of the global Gramian
    (:func:`~lightning_lossagg.functional.aligned_mtl`):

    .. math::
        w = \sqrt{\lambda}\; Q_r \Lambda_r^{-1/2} Q_r^\top\, p, \qquad d = \sum_k w_k g_k,

    where :math:`\lambda` is the smallest kept eigenvalue (``scale_mode="min"``), their median or
    their mean (``"rmse"``). Each head follows its own task's gradient; ``Task.weight``
    multiplies :math:`w`.

    Scale: LibMTL's, :math:`p = \mathbf{1}` by default: the update is the sum of the aligned
    gradients (torchjd's ``AlignedMTL`` uses :math:`p = \mathbf 1 / K`, the mean). A task without
    a valid sample in a step is left out (with its entry of ``pref_vector``). Stateless: nothing
    to save.

    Args:
        pref_vector: one preference :math:`p_k \geq 0` per task, in the model's task order, at
            least one > 0; ``None``: ones.
        scale_mode: ``"min"`` (the paper's and LibMTL's), ``"median"`` or ``"rmse"``.
        rep_grad: take gradients at the shared representation.
        sync: with parameter gradients under DDP, ``"gradients"`` (exact) or ``"gramian"``.

    Example:
        >>> callback = AlignedMTL(scale_mode="min")
    """

    def __init__(
        self,
        pref_vector: Sequence[float] | None = None,
        scale_mode: ScaleMode = "min",
        rep_grad: bool = False,
        sync: Sync = "gradients",
    ) -> None:
        super().__init__(rep_grad=rep_grad, sync=sync)
        self.pref_vector = check_pref_vector("AlignedMTL", pref_vector)
        if scale_mode not in get_args(ScaleMode):
            raise ValueError(
                f"`scale_mode` must be 'min', 'median' or 'rmse' (the paper: 'min'); got "
                f"{scale_mode!r}."
            )
        self.scale_mode = scale_mode

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {
            "pref_vector": self.pref_vector,
            "scale_mode": self.scale_mode,
            **super().method_arguments,
        }

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_pref_length("AlignedMTL", self.pref_vector, require_multitask(self, pl_module))

    @override
    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        assert self.valid_tasks is not None
        preferences = valid_preferences(self.pref_vector, self.valid_tasks)
        matrix = symmetric_matrix(gramian)
        choices = np.ones(len(matrix)) if preferences is None else preferences.numpy()
        # The rank's cut-off at the rounding of the gradients' dtype, as LibMTL's (a float32
        # Gramian's noise eigenvalue kept as the smallest would shrink the update to it).
        weights = aligned_mtl_weights(matrix, choices, self.scale_mode, self.gramian_eps)
        return torch.from_numpy(weights)
