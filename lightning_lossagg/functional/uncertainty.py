"""Uncertainty weighting: task losses weighted by learned homoscedastic uncertainty."""

import math

import torch
from torch import Tensor

from lightning_lossagg.functional._tensors import check_log_scale_losses, detached

_LOG_HALF = -math.log(2.0)


def _log_factors(
    log_vars: Tensor, classification: Tensor | None, validate_args: bool
) -> Tensor | float:
    """Validates the arguments and returns log c_k (log 1/2, or 0 for a classification task), the
    log of the factor in front of e^(-s_k)·L_k."""
    if log_vars.ndim != 1 or not log_vars.is_floating_point():
        raise ValueError(
            "`log_vars` must be a 1-D floating tensor with one log-variance per task; found "
            f"shape {tuple(log_vars.shape)} and dtype {log_vars.dtype}."
        )
    if validate_args and not torch.isfinite(log_vars).all():
        bad = (~torch.isfinite(log_vars)).nonzero().flatten().tolist()
        raise ValueError(
            f"`log_vars` must be finite; found non-finite values at task indices {bad}. "
            "Lower the learning rate of the log-variance optimizer or clamp the log-variances."
        )
    if classification is None:
        return _LOG_HALF
    if classification.dtype != torch.bool or classification.shape != log_vars.shape:
        raise ValueError(
            "`classification` must be a bool tensor with the shape of `log_vars` "
            f"{tuple(log_vars.shape)}, True for each classification task; found shape "
            f"{tuple(classification.shape)} and dtype {classification.dtype}."
        )
    log_half = log_vars.new_full(log_vars.shape, _LOG_HALF)
    return log_half.masked_fill_(classification.to(log_vars.device), 0.0)


def uncertainty_weights(
    log_vars: Tensor, classification: Tensor | None = None, *, validate_args: bool = True
) -> Tensor:
    r"""Weights on the task losses under uncertainty weighting (Kendall et al., 2018).

    `Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics
    <https://arxiv.org/abs/1705.07115>`_ (CVPR 2018). With learnable log-variances
    :math:`s_k = \log \sigma_k^2` the objective is

    .. math::
        \mathcal{L}(s) = \sum_k c_k e^{-s_k} L_k + \tfrac{1}{2} s_k, \qquad
        w_k = \frac{\partial \mathcal{L}}{\partial L_k} = c_k e^{-s_k},

    with :math:`c_k = \tfrac{1}{2}` (regression, LibMTL's form for every task) or
    :math:`c_k = 1` where ``classification[k]`` is True (the paper's softmax likelihood).
    LibMTL starts from :math:`s_k = -0.5` (weights :math:`\approx 0.82`), torchjd's ``UW`` from
    :math:`s_k = 0` (weights 0.5): neither scale is 1 per task.

    Args:
        log_vars: The log-variances :math:`s`, shape ``(K,)``.
        classification: Optional bool mask of shape ``(K,)``; True selects :math:`c_k = 1`.
        validate_args: Check that ``log_vars`` is finite (one device-to-host sync).

    Returns:
        The weights :math:`w`, shape ``(K,)``, detached.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.uncertainty import uncertainty_weights
        >>> uncertainty_weights(torch.tensor([0.0, 0.0]), torch.tensor([False, True]))
        tensor([0.5000, 1.0000])
    """
    log_factors = _log_factors(log_vars, classification, validate_args)
    return torch.exp(log_factors - detached(log_vars))  # c_k e^(-s_k) = e^(log c_k - s_k)


def uncertainty_objective(
    losses: Tensor,
    log_vars: Tensor,
    classification: Tensor | None = None,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""The full uncertainty-weighting objective, regulariser included, differentiable throughout.

    .. math::
        \mathcal{L}(s) = \sum_k c_k e^{-s_k} L_k + \tfrac{1}{2} s_k

    Minimised over :math:`s` it gives :math:`s_k^* = \log(2 c_k L_k)`. See
    :func:`uncertainty_weights` for the paper and :math:`c_k`; pass detached losses to update
    :math:`s` alone.

    Args:
        losses: The task losses :math:`L`, shape ``(K,)``.
        log_vars: The log-variances :math:`s`, shape ``(K,)``.
        classification: Optional bool mask of shape ``(K,)``; True selects :math:`c_k = 1`.
        validate_args: Check that both tensors are finite and the losses >= 0 (device-to-host
            syncs).

    Returns:
        The scalar objective.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.uncertainty import uncertainty_objective
        >>> uncertainty_objective(torch.tensor([2.0, 4.0]), torch.zeros(2))
        tensor(3.)
    """
    log_factors = _log_factors(log_vars, classification, validate_args)
    if losses.shape != log_vars.shape:
        raise ValueError(
            f"`losses` must have the shape of `log_vars` {tuple(log_vars.shape)}, one loss per "
            f"task; found {tuple(losses.shape)}."
        )
    if validate_args:
        check_log_scale_losses(losses)
    return (torch.exp(log_factors - log_vars) * losses + 0.5 * log_vars).sum()
