"""Small tensor helpers of the per-step weighting functions."""

import torch
from torch import Tensor


def detached(tensor: Tensor) -> Tensor:
    """``tensor`` without its graph: itself when it has none (``detach`` is an operation too,
    and the weighting functions run every step on tensors that are mostly detached already)."""
    return tensor.detach() if tensor.requires_grad else tensor


def check_log_scale_losses(losses: Tensor) -> None:
    """Refuse losses that are not finite and >= 0 for a learned log-scale's objective (one
    device-to-host sync): a negative loss makes it unbounded below in the log-scales."""
    usable = torch.isfinite(losses) & (losses >= 0)
    if not usable.all():
        bad = (~usable).nonzero().flatten().tolist()
        raise ValueError(
            f"`losses` must be finite and >= 0 (a negative loss makes the objective unbounded "
            f"below in the log-scales); found {losses.detach()[bad].tolist()} at task indices "
            f"{bad}. Shift those losses to be >= 0."
        )
