"""FAMO: task weights learned from how fast each log-loss falls."""

import math

import torch
from torch import Tensor


def _shifted_losses(
    name: str, losses: Tensor, min_losses: Tensor | None, eps: float, validate_args: bool
) -> Tensor:
    """Returns L - b + eps, detached, after checking that it is finite and positive."""
    shifted = losses.detach() + eps
    if min_losses is not None:
        if min_losses.shape != losses.shape:
            raise ValueError(
                f"`min_losses` must have the shape of `{name}` {tuple(losses.shape)}; found "
                f"{tuple(min_losses.shape)}."
            )
        shifted = shifted - min_losses.detach()
    if validate_args and not (torch.isfinite(shifted) & (shifted > 0)).all():
        bad = (~(torch.isfinite(shifted) & (shifted > 0))).nonzero().flatten().tolist()
        raise ValueError(
            f"FAMO takes log(L - min_losses + eps), so `{name}` must be finite and above "
            f"`min_losses` (0 by default); it is not at task indices {bad}. Lower `min_losses`."
        )
    return shifted


def _check(logits: Tensor, losses: Tensor, eps: float, validate_args: bool) -> None:
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"`eps` must be a finite number >= 0; found {eps}. The default is 1e-8.")
    if logits.ndim != 1 or logits.shape != losses.shape or not logits.is_floating_point():
        raise ValueError(
            "`logits` must be a 1-D floating-point tensor with one logit per task and the losses "
            f"must have its shape; found {logits.dtype} of shape {tuple(logits.shape)} and "
            f"{tuple(losses.shape)}."
        )
    if validate_args and not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).nonzero().flatten().tolist()
        raise ValueError(f"`logits` must be finite; found non-finite values at task indices {bad}.")


def famo_weights(
    logits: Tensor,
    losses: Tensor,
    min_losses: Tensor | None = None,
    eps: float = 1e-8,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""Weights on the task losses that reproduce FAMO's model update (Liu et al., 2023).

    `FAMO: Fast Adaptive Multitask Optimization <https://arxiv.org/abs/2306.03792>`_
    (NeurIPS 2023). FAMO descends :math:`c \sum_k z_k \log(L_k - b_k + \epsilon)` with the
    normaliser :math:`c` held constant; its gradient with respect to :math:`L_k` is

    .. math::
        z = \operatorname{softmax}(\xi), \qquad
        w_k = \frac{z_k / (L_k - b_k + \epsilon)}{\sum_i z_i / (L_i - b_i + \epsilon)},

    so :math:`\sum_k w_k \nabla L_k` is FAMO's update and the weights sum to 1, as in the paper,
    LibMTL and torchjd. Learn the logits :math:`\xi` (initially 0) with
    :func:`famo_logit_gradient`.

    Args:
        logits: The task logits :math:`\xi`, shape ``(K,)``.
        losses: The task losses :math:`L`, shape ``(K,)``, above ``min_losses``.
        min_losses: The lower bounds :math:`b`, shape ``(K,)``; ``None`` means 0.
        eps: The constant :math:`\epsilon \geq 0` inside the logarithm.
        validate_args: Check finiteness and :math:`L > b - \epsilon` (device-to-host syncs).

    Returns:
        The weights :math:`w`, shape ``(K,)``, detached.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.famo import famo_weights
        >>> famo_weights(torch.zeros(2), torch.tensor([1.0, 3.0]), eps=0.0)
        tensor([0.7500, 0.2500])
    """
    _check(logits, losses, eps, validate_args)
    shifted = _shifted_losses("losses", losses, min_losses, eps, validate_args)
    scaled = torch.softmax(logits.detach(), dim=0) / shifted
    return scaled / scaled.sum()


def famo_logit_gradient(
    logits: Tensor,
    losses_before: Tensor,
    losses_after: Tensor,
    min_losses: Tensor | None = None,
    eps: float = 1e-8,
    *,
    validate_args: bool = True,
) -> Tensor:
    r"""The gradient FAMO hands to the optimizer of its logits, from one step's loss decrease.

    With :math:`\delta_k = \log(L_k^{\text{before}} - b_k + \epsilon) -
    \log(L_k^{\text{after}} - b_k + \epsilon)`, the decrease of each log-loss over a model step
    on the same batch,

    .. math::
        g = J_{\operatorname{softmax}}(\xi)^\top \delta = z \odot (\delta - z^\top \delta).

    Set it as ``logits.grad`` and step ``Adam([logits], lr=0.025, weight_decay=1e-3)`` (the
    paper's and LibMTL's defaults): descending :math:`g` moves weight towards the tasks whose loss
    fell least. The gradient sums to 0 and ignores a constant factor on any one task's losses
    when :math:`b = 0, \epsilon = 0`.

    Args:
        logits: The task logits :math:`\xi`, shape ``(K,)``.
        losses_before: The task losses before the model step, shape ``(K,)``.
        losses_after: The same batch's task losses after the model step, shape ``(K,)``.
        min_losses: The lower bounds :math:`b`, shape ``(K,)``; ``None`` means 0.
        eps: The constant :math:`\epsilon \geq 0` inside the logarithm.
        validate_args: Check finiteness and :math:`L > b - \epsilon` (device-to-host syncs).

    Returns:
        The gradient :math:`g`, shape ``(K,)``, detached.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.famo import famo_logit_gradient
        >>> famo_logit_gradient(torch.zeros(2), torch.tensor([2.0, 2.0]), torch.tensor([1.0, 2.0]))
        tensor([ 0.1733, -0.1733])
    """
    _check(logits, losses_before, eps, validate_args)
    if losses_after.shape != losses_before.shape:
        raise ValueError(
            "`losses_after` must have the shape of `losses_before` "
            f"{tuple(losses_before.shape)}; found {tuple(losses_after.shape)}."
        )
    before = _shifted_losses("losses_before", losses_before, min_losses, eps, validate_args)
    after = _shifted_losses("losses_after", losses_after, min_losses, eps, validate_args)
    decrease = torch.log(before) - torch.log(after)
    z = torch.softmax(logits.detach(), dim=0)
    return z * (decrease - (z * decrease).sum())
