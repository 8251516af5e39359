"""Geometric Loss Strategy: the geometric mean of the task losses."""

import torch
from torch import Tensor

from lightning_lossagg.functional._tensors import detached


def _check_losses(losses: Tensor, validate_args: bool) -> None:
    if losses.ndim != 1 or losses.numel() == 0 or not losses.is_floating_point():
        raise ValueError(
            "`losses` must be a non-empty 1-D floating tensor with one loss per task; found "
            f"shape {tuple(losses.shape)} and dtype {losses.dtype}."
        )
    if validate_args and not (torch.isfinite(losses) & (losses > 0)).all():
        bad = (~(torch.isfinite(losses) & (losses > 0))).nonzero().flatten().tolist()
        raise ValueError(
            f"GLS takes the logarithm of every loss, so `losses` must be finite and > 0; found "
            f"{losses.detach()[bad].tolist()} at task indices {bad}. Add a small positive offset "
            "to those losses or choose another weighting method."
        )


def gls(losses: Tensor, *, validate_args: bool = True) -> Tensor:
    r"""Geometric Loss Strategy objective (Chennupati et al., 2019).

    `MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for Multi-Task
    Learning <https://arxiv.org/abs/1904.08492>`_ (CVPR Workshops 2019). Computed through
    logarithms, so that a product of many small losses does not underflow:

    .. math::
        G = \Big(\prod_{k=1}^K L_k\Big)^{1/K} = \exp\Big(\frac{1}{K}\sum_k \log L_k\Big).

    This is the objective of LibMTL's ``GLS`` and torchjd's ``GeometricMean``.

    Args:
        losses: The task losses, shape ``(K,)``, strictly positive.
        validate_args: Check that the losses are finite and positive (one device-to-host sync);
            a zero loss is refused with its index rather than returning a zero objective whose
            gradient is infinite.

    Returns:
        The scalar objective :math:`G`, differentiable in ``losses``.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.gls import gls
        >>> gls(torch.tensor([1.0, 4.0]))
        tensor(2.)
    """
    _check_losses(losses, validate_args)
    return torch.exp(torch.log(losses).mean())


def gls_weights(
    losses: Tensor, *, validate_args: bool = True, valid: Tensor | None = None
) -> Tensor:
    r"""Weights :math:`w` with :math:`\sum_k w_k \nabla L_k = \nabla G` for :func:`gls`.

    .. math::
        w_k = \frac{\partial G}{\partial L_k} = \frac{G}{K L_k}

    so :math:`w_k L_k = G / K` for every task: a task's weight scales as :math:`1 / L_k`.
    (LibMTL's ``GLS`` reports :math:`L_k / (K \prod_i L_i)` as its weights; its gradient, like
    torchjd's, is the one given here.)

    Args:
        losses: The task losses, shape ``(K,)``, strictly positive.
        validate_args: Check that the losses are finite and positive (one device-to-host sync).
        valid: Which tasks take part (a bool mask, shape ``(K,)``): the weights of :math:`G` over
            those tasks alone, with :math:`K` their number; the other tasks' losses are ignored
            (not checked) and their weights are meaningless. ``None``: every task.

    Returns:
        The weights, shape ``(K,)``, detached.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.gls import gls_weights
        >>> gls_weights(torch.tensor([1.0, 4.0]))
        tensor([1.0000, 0.2500])
    """
    if valid is None:
        _check_losses(losses, validate_args)
        log_losses = torch.log(detached(losses))
        return torch.exp(log_losses.mean() - log_losses) / losses.numel()
    if valid.dtype != torch.bool or valid.shape != losses.shape:
        raise ValueError(
            f"`valid` must be a bool mask of the losses' shape {tuple(losses.shape)}, one entry "
            f"per task; found {valid.dtype} of shape {tuple(valid.shape)}."
        )
    taking_part = torch.where(valid, detached(losses), 1.0)
    _check_losses(taking_part, validate_args)
    log_losses = taking_part.log()
    num_valid = valid.sum(dtype=log_losses.dtype).clamp(min=1)  # no integer promotions below
    return torch.exp(log_losses.sum() / num_valid - log_losses) / num_valid
