"""Small tensor helpers of the per-step weighting functions."""

from torch import Tensor


def detached(tensor: Tensor) -> Tensor:
    """``tensor`` without its graph: itself when it has none (``detach`` is an operation too,
    and the weighting functions run every step on tensors that are mostly detached already)."""
    return tensor.detach() if tensor.requires_grad else tensor
