"""Dynamic loss scaling: every task loss divided by its own running level."""

import math

import torch
from torch import Tensor

from lightning_lossagg.functional._tensors import detached


def update_loss_levels(
    levels: Tensor | None, losses: Tensor, decay: float, *, validate_args: bool = True
) -> Tensor:
    r"""One step of the exponential moving average that tracks each task's loss level.

    .. math::
        \ell_k \leftarrow L_k \text{ (first call, } \ell = \text{None)}, \qquad
        \ell_k \leftarrow \beta\, \ell_k + (1 - \beta)\, L_k \text{ (afterwards)}

    with decay :math:`\beta \in [0, 1)`: the convention of
    ``torch.optim.swa_utils.get_ema_avg_fn``. The level remembers roughly the last
    :math:`1 / (1 - \beta)` steps; :math:`\beta = 0` follows the current loss. To scale by the
    initial loss instead, call this once (``levels=None``) and keep the result.

    Args:
        levels: The current levels :math:`\ell`, shape ``(K,)``, or ``None`` before the first step.
        losses: The task losses :math:`L` of this step, shape ``(K,)``.
        decay: The decay :math:`\beta`, in ``[0, 1)``.
        validate_args: Check that ``losses`` is finite (one device-to-host sync).

    Returns:
        The new levels, shape ``(K,)``, detached.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.loss_scaling import update_loss_levels
        >>> levels = update_loss_levels(None, torch.tensor([2.0, 4.0]), decay=0.5)
        >>> update_loss_levels(levels, torch.tensor([4.0, 0.0]), decay=0.5)
        tensor([3., 2.])
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(
            f"`decay` must be in [0, 1); found {decay}. Use e.g. 0.9 for a level that averages "
            "about the last 10 steps, or keep the first levels to scale by the initial loss."
        )
    if losses.ndim != 1 or (levels is not None and levels.shape != losses.shape):
        found: object = None if levels is None else tuple(levels.shape)
        raise ValueError(
            "`losses` must be a 1-D tensor with one loss per task and `levels` None or of the "
            f"same shape; found {tuple(losses.shape)} and {found}."
        )
    if not losses.is_floating_point() or (levels is not None and not levels.is_floating_point()):
        found = losses.dtype if levels is None else (levels.dtype, losses.dtype)
        raise TypeError(f"`levels` and `losses` must be floating-point tensors; found {found}.")
    if validate_args and not torch.isfinite(losses).all():
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        raise ValueError(
            f"`losses` must be finite; found non-finite losses at task indices {bad}. Skip the "
            "update for this step."
        )
    losses = detached(losses)
    if levels is None:
        return losses.clone()
    levels = detached(levels)  # decay * levels + (1 - decay) * L:
    return torch.lerp(levels, losses.to(levels.dtype), 1.0 - decay)


def loss_scaling_weights(
    levels: Tensor, eps: float = 1e-8, *, validate_args: bool = True
) -> Tensor:
    r"""Weights that bring every task loss to the common level 1.

    .. math::
        \alpha_k = \frac{1}{\max(\ell_k, \epsilon)}

    so :math:`\alpha_k \ell_k = 1` for every task whose level exceeds :math:`\epsilon`, and a task
    whose loss sits at its level contributes 1 to the objective. There is no single paper for this
    heuristic; dividing by the initial loss is the loss ratio of GradNorm (Chen et al., 2018,
    `arXiv:1711.02257 <https://arxiv.org/abs/1711.02257>`_).

    Args:
        levels: The loss levels :math:`\ell`, shape ``(K,)``, from :func:`update_loss_levels`.
        eps: The floor :math:`\epsilon > 0`, so a zero level gives the finite weight
            :math:`1 / \epsilon` (at most half the dtype's largest number: float16's 1e-8 is 0).
        validate_args: Check that ``levels`` is finite and non-negative (one device-to-host sync).

    Returns:
        The weights :math:`\alpha`, shape ``(K,)``, detached.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.loss_scaling import loss_scaling_weights
        >>> loss_scaling_weights(torch.tensor([2.0, 0.5]))
        tensor([0.5000, 2.0000])
    """
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"`eps` must be a finite number > 0; found {eps}. The default is 1e-8.")
    if levels.ndim != 1 or not levels.is_floating_point():
        raise ValueError(
            "`levels` must be a 1-D floating-point tensor, one level per task; found "
            f"{levels.dtype} of shape {tuple(levels.shape)}."
        )
    if validate_args and not (torch.isfinite(levels) & (levels >= 0)).all():
        bad = (~(torch.isfinite(levels) & (levels >= 0))).nonzero().flatten().tolist()
        raise ValueError(
            f"`levels` must be finite and >= 0; found {levels[bad].tolist()} at task indices "
            f"{bad}. Loss scaling needs non-negative losses."
        )
    return detached(levels).clamp_min(level_floor(eps, levels.dtype)).reciprocal()


def level_floor(eps: float, dtype: torch.dtype) -> float:
    """The least level a weight divides by: ``eps``, or a floor whose reciprocal ``dtype`` holds
    (1e-8 is 0 in float16: 1/0 = inf)."""
    return max(eps, 2.0 / torch.finfo(dtype).max)
