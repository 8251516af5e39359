"""IMTL-L: the loss-balancing half of Impartial Multi-Task Learning."""

import torch
from torch import Tensor

from lightning_lossagg.functional._tensors import check_log_scale_losses


def _check_log_scales(log_scales: Tensor, validate_args: bool) -> None:
    if log_scales.ndim != 1 or not log_scales.is_floating_point():
        raise ValueError(
            "`log_scales` must be a 1-D floating tensor with one log-scale per task; found "
            f"shape {tuple(log_scales.shape)} and dtype {log_scales.dtype}."
        )
    if validate_args and not torch.isfinite(log_scales).all():
        bad = (~torch.isfinite(log_scales)).nonzero().flatten().tolist()
        raise ValueError(
            f"`log_scales` must be finite; found non-finite values at task indices {bad}. "
            "Lower the learning rate of the log-scale optimizer."
        )


def imtl_l_weights(log_scales: Tensor, *, validate_args: bool = True) -> Tensor:
    r"""Weights on the task losses under IMTL-L (Liu et al., 2021).

    `Towards Impartial Multi-task Learning <https://openreview.net/forum?id=IMPnRXEWpvr>`_
    (ICLR 2021; no arXiv version). With learnable log-scales :math:`s`, the objective
    :func:`imtl_l_objective` has the gradient

    .. math::
        w_k = \frac{\partial}{\partial L_k} \sum_i \big(e^{s_i} L_i - s_i\big) = e^{s_k}.

    LibMTL and torchjd start from :math:`s = 0`: weights of 1 (sum :math:`K`). LibMTL's ``IMTL``
    combines these scaled losses with IMTL-G's gradient step; this is the loss part alone.

    Args:
        log_scales: The log-scales :math:`s`, shape ``(K,)``.
        validate_args: Check that ``log_scales`` is finite (one device-to-host sync).

    Returns:
        The weights, shape ``(K,)``, detached.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.imtl_l import imtl_l_weights
        >>> imtl_l_weights(torch.zeros(2))
        tensor([1., 1.])
    """
    _check_log_scales(log_scales, validate_args)
    return torch.exp(log_scales).detach()


def imtl_l_objective(losses: Tensor, log_scales: Tensor, *, validate_args: bool = True) -> Tensor:
    r"""The IMTL-L objective, differentiable in the losses and the log-scales.

    .. math::
        \mathcal{L}(s) = \sum_k e^{s_k} L_k - s_k

    Minimised over :math:`s` (for positive losses) it gives :math:`s_k^* = -\log L_k`, where every
    scaled loss :math:`e^{s_k} L_k` equals 1. It equals twice the uncertainty objective of
    LibMTL's form at :math:`-s`. Pass detached losses to update :math:`s` alone.

    Args:
        losses: The task losses :math:`L`, shape ``(K,)``.
        log_scales: The log-scales :math:`s`, shape ``(K,)``.
        validate_args: Check that both tensors are finite and the losses >= 0 (device-to-host
            syncs).

    Returns:
        The scalar objective.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.imtl_l import imtl_l_objective
        >>> imtl_l_objective(torch.tensor([2.0, 4.0]), torch.zeros(2))
        tensor(6.)
    """
    _check_log_scales(log_scales, validate_args)
    if losses.shape != log_scales.shape:
        raise ValueError(
            f"`losses` must have the shape of `log_scales` {tuple(log_scales.shape)}, one loss "
            f"per task; found {tuple(losses.shape)}."
        )
    if validate_args:
        check_log_scale_losses(losses)
    return (torch.exp(log_scales) * losses - log_scales).sum()
