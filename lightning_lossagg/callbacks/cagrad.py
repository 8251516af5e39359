"""``CAGrad``: the update that maximises the worst task's improvement near the mean gradient."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.callbacks._checks import check_non_negative
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting, Sync
from lightning_lossagg.functional._qp import symmetric_matrix
from lightning_lossagg.functional.cagrad import cagrad_weights


class CAGrad(GradientWeighting):
    r"""Conflict-Averse Gradient descent (Liu et al., 2021).

    `Conflict-Averse Gradient Descent for Multi-task Learning
    <https://arxiv.org/abs/2110.14048>`_ (NeurIPS 2021). With :math:`g_0 = \frac1K \sum_k g_k`
    and :math:`\sqrt\phi = c\,\lVert g_0\rVert`:

    .. math::
        w^\star = \operatorname*{arg\,min}_{w \in \Delta^K}
            \langle g_w, g_0 \rangle + \sqrt\phi\,\lVert g_w \rVert, \qquad
        d = \frac{1}{s}\Big(g_0 + \frac{\sqrt\phi}{\lVert g_w \rVert}\, g_w\Big)
          = \sum_k w_k g_k,

    with :math:`g_w = \sum_k w^\star_k g_k`, all from the global Gramian
    (:func:`~lightning_lossagg.functional.cagrad`); each head follows its own task's gradient;
    ``Task.weight`` multiplies :math:`w`.

    Scale: LibMTL's, :math:`s = 1 + c^2` (``rescale=1``, its default), :math:`1 + c`
    (``rescale=2``) or 1 (``rescale=0``, the paper's and torchjd's ``CAGrad``). LibMTL refuses
    representation gradients; ``rep_grad=True`` works here. Its state is the previous step's
    support, where the next search starts (a warm start, saved so that a resumed fit weighs
    exactly as the uninterrupted one).

    Args:
        c: the radius :math:`c \geq 0` of the ball around :math:`g_0`, relative to
            :math:`\lVert g_0\rVert` (LibMTL and the paper: 0.5).
        rescale: 0, 1 or 2, LibMTL's choice of :math:`s`.
        rep_grad: take gradients at the shared representation.
        sync: with parameter gradients under DDP, ``"gradients"`` (exact) or ``"gramian"``.

    Example:
        >>> callback = CAGrad(c=0.5)
    """

    state_is_per_task = False  # a warm start: in another task order it starts elsewhere

    def __init__(
        self, c: float = 0.5, rescale: int = 1, rep_grad: bool = False, sync: Sync = "gradients"
    ) -> None:
        super().__init__(rep_grad=rep_grad, sync=sync)
        c = check_non_negative("c", c, "The paper uses 0.5.")
        if isinstance(rescale, bool) or rescale not in (0, 1, 2):
            raise ValueError(
                f"`rescale` must be 0, 1 or 2 (LibMTL's default is 1); got {rescale!r}."
            )
        self.c, self.rescale = c, int(rescale)
        # The tasks with a positive inner weight at the latest step: where the next search
        # starts (the support rarely changes). The weights are those of the support found, but
        # for rounding where the search meets a near-singular support: it is saved with the
        # checkpoint and put back with a refused step, so that a resumed fit weighs exactly as
        # the uninterrupted one.
        self._support = np.zeros(0, dtype=bool)

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"c": self.c, "rescale": self.rescale, **super().method_arguments}

    @override
    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        support = self._support if len(self._support) == len(gramian) else None
        weights, found = cagrad_weights(symmetric_matrix(gramian), self.c, self.rescale, support)
        self._support = np.zeros(0, dtype=bool) if found is None else found
        return torch.from_numpy(weights)

    @override
    def step_state(self) -> np.ndarray:
        return self._support  # replaced, never changed in place

    @override
    def put_back_step_state(self, state: np.ndarray) -> None:
        self._support = state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"support": torch.from_numpy(self._support.copy())}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        support = state_dict.get("support")  # none in a checkpoint of an earlier version
        self._support = np.zeros(0, dtype=bool) if support is None else support.numpy().copy()
