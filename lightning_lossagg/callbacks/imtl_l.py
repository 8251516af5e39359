"""``IMTLL``: the loss-balancing half of Impartial Multi-Task Learning."""

from __future__ import annotations

import math

from typing_extensions import override

from lightning_lossagg.callbacks._learned_scales import LearnedScalesWeighting


class IMTLL(LearnedScalesWeighting):
    r"""IMTL-L (Liu et al., 2021): every task loss scaled by a learned :math:`e^{s_k}`.

    `Towards Impartial Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_
    (ICLR 2021). Each task has a log-scale :math:`s_k`, zero at the start (weights of 1, as in
    LibMTL and torchjd), and the objective

    .. math::
        \mathcal{L} = \sum_k e^{s_k} L_k - s_k, \qquad w_k = e^{s_k}, \qquad
        \frac{\partial \mathcal{L}}{\partial s_k} = w_k L_k - 1.

    The model follows :math:`\sum_k w_k \nabla L_k`; the log-scales follow
    :math:`\nabla_s \mathcal{L}` on the step's global losses (averaged over accumulated
    micro-batches), with their own Adam on the host (float64: ``K`` numbers), once per
    optimizer step of the model. At the optimum :math:`e^{s_k} L_k = 1`: every scaled loss sits
    at the same level. :math:`s_k` stays within :math:`\pm 30` (a loss between 1e-13 and 1e13 is
    unaffected): a task whose loss stays at 0 would drive it for ever.

    The log-scales live in this callback, not in the model (its ``state_dict`` does not change);
    they, Adam's state and the losses of a pending accumulation are in this callback's
    ``state_dict``. Logged as ``train/log_scale/<task>``.

    Args:
        lr: Adam's learning rate for the log-scales.

    Example:
        >>> callback = IMTLL(lr=0.01)
    """

    state_name = "log_scale"

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__(lr)

    @override
    def _weight(self, task: int, scale: float) -> float:
        return math.exp(scale)  # imtl_l_weights: e^(s_k)

    @override
    def _derivative(self, weight: float, loss: float) -> float:
        # d/ds_k of imtl_l_objective: e^(s_k) L_k - 1 = w_k L_k - 1.
        return weight * loss - 1.0
