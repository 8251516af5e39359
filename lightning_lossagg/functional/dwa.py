"""Dynamic Weight Average: weights from the rate at which each task's loss falls."""

import math

import torch
from torch import Tensor


def dwa(
    prev: Tensor, prev2: Tensor, temperature: float = 2.0, *, validate_args: bool = True
) -> Tensor:
    r"""Dynamic Weight Average (Liu et al., 2019).

    `End-to-End Multi-Task Learning with Attention <https://arxiv.org/abs/1803.10704>`_
    (CVPR 2019). From the epoch-mean losses of the two previous epochs,

    .. math::
        r_k = \frac{L_k(t-1)}{L_k(t-2)}, \qquad
        w_k = K \frac{\exp(r_k / T)}{\sum_i \exp(r_i / T)}.

    The weights sum to :math:`K` (LibMTL and torchjd use the same scale) and are unchanged when a
    task's whole history is multiplied by a positive constant. Until two epochs of history exist,
    use weights of 1, as LibMTL and torchjd do. A zero ``prev[k]`` is a finite rate
    :math:`r_k = 0`; a zero ``prev2[k]`` has no rate and is refused.

    Args:
        prev: The epoch-mean task losses :math:`L(t-1)`, shape ``(K,)``.
        prev2: The epoch-mean task losses :math:`L(t-2)`, shape ``(K,)``, non-zero.
        temperature: The softmax temperature :math:`T > 0`; larger is more uniform. The paper
            uses 2.
        validate_args: Check that the inputs are finite and ``prev2`` non-zero (one
            device-to-host sync).

    Returns:
        The weights :math:`w`, shape ``(K,)``, detached.

    Raises:
        ValueError: If ``temperature`` is not positive, the shapes differ, or (with
            ``validate_args``) a loss is not finite or ``prev2`` is zero.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.dwa import dwa
        >>> dwa(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]))
        tensor([1., 1.])
    """
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(
            f"`temperature` must be a finite number > 0; found {temperature}. The paper uses 2.0."
        )
    if prev.ndim != 1 or prev.shape != prev2.shape:
        raise ValueError(
            "`prev` and `prev2` must be 1-D tensors of the same shape (one epoch-mean loss per "
            f"task); found {tuple(prev.shape)} and {tuple(prev2.shape)}."
        )
    scaled_rates = prev.detach() / prev2.detach() / temperature
    if validate_args:
        _check_rates(prev, prev2, scaled_rates)
    return prev.numel() * torch.softmax(scaled_rates, dim=0)


def _check_rates(prev: Tensor, prev2: Tensor, scaled_rates: Tensor) -> None:
    """A ValueError naming the tasks whose losses or rate are not finite (one host sync)."""
    if (torch.isfinite(prev) & torch.isfinite(prev2) & torch.isfinite(scaled_rates)).all():
        return
    for name, values in (("prev", prev), ("prev2", prev2)):
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"`{name}` must be finite; found non-finite losses at indices {bad}.")
    zero = (prev2 == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(
            f"`prev2` is 0 at task indices {zero}, so the rate L(t-1)/L(t-2) is undefined. "
            "Use weights of 1 until those tasks have a non-zero epoch-mean loss."
        )
    bad = (~torch.isfinite(scaled_rates)).nonzero().flatten().tolist()
    raise ValueError(
        f"The rate `prev / prev2` divided by the temperature overflows at task indices {bad}."
    )
