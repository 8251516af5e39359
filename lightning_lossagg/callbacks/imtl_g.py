"""``IMTLG``: the update whose projections onto every task's gradient direction are equal."""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting
from lightning_lossagg.functional._qp import symmetric_matrix
from lightning_lossagg.functional.imtl_g import imtl_g_weights


class IMTLG(GradientWeighting):
    r"""Impartial Multi-Task Learning, gradient part (Liu et al., 2021).

    `Towards Impartial Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_
    (ICLR 2021). The shared part follows :math:`d = \sum_k \alpha_k g_k`
    with :math:`\sum_k \alpha_k = 1` and equal projections onto every unit
    gradient :math:`u_k = g_k / \lVert g_k\rVert`; from the global Gramian
    (:func:`~lightning_lossagg.functional.imtl_g`):

    .. math::
        v = G^{+} \big(\lVert g_1\rVert, \dots, \lVert g_K\rVert\big)^\top, \qquad
        \alpha = \frac{v}{\mathbf{1}^\top v}.

    Each head follows its own task's gradient; ``Task.weight`` multiplies :math:`\alpha`.

    Scale: :math:`\alpha` sums to 1 (LibMTL and torchjd's ``IMTLG``); weights may be negative.
    LibMTL's ``IMTL`` is the hybrid of this and IMTL-L (learned loss scales,
    here :class:`~lightning_lossagg.callbacks.IMTLL`); this callback is the gradient part alone,
    as torchjd's ``IMTLG``. Stateless: nothing to save.

    Args:
        rep_grad: take gradients at the shared representation.
        sync: with parameter gradients under DDP, ``"gradients"`` (exact) or ``"gramian"``.

    Example:
        >>> callback = IMTLG(rep_grad=True)
    """

    @override
    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        # The pseudo-inverse's cut-off at the rounding of the gradients' dtype, as the
        # functional's: a float32 Gramian's noise eigenvalue, kept, would set the weights.
        weights = imtl_g_weights(symmetric_matrix(gramian), self.gramian_eps)
        return torch.from_numpy(weights)
