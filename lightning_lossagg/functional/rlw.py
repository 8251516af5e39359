"""Random Loss Weighting: fresh random weights at every step."""

import numbers

import torch
from torch import Tensor


def rlw(
    num_tasks: int,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    draws: int | None = None,
) -> Tensor:
    r"""Random Loss Weighting (Lin et al., 2022).

    `Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning
    <https://arxiv.org/abs/2111.10603>`_ (TMLR 2022), with the normal distribution of its
    Algorithm 2:

    .. math::
        z \sim \mathcal{N}(0, I_K), \qquad w = \operatorname{softmax}(z).

    The weights are positive and sum to 1 (so :math:`\mathbb{E}[w_k] = 1/K`), as in LibMTL's
    ``RLW`` (``dist='Normal'``) and torchjd's ``Random``; equal weighting in LibMTL (``EW``) uses
    weights of 1, which sum to :math:`K`. With ``generator=None`` the draw comes from the global
    generator exactly as torchjd's ``Random`` draws it. Under DDP every rank must draw the same
    weights: seed the generator identically on every rank (or broadcast the weights).

    Args:
        num_tasks: The number of tasks :math:`K \geq 1`.
        generator: The random generator; its state is the method's whole state. ``None`` uses
            torch's global generator.
        device: Where to draw; defaults to the generator's device (CPU for the global one).
        dtype: The floating dtype of the weights; defaults to torch's default dtype.
        draws: ``None`` for one weight vector; else that many independent ones, in one draw.

    Returns:
        The weights :math:`w`, shape ``(K,)`` (``(draws, K)`` with ``draws``).

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.rlw import rlw
        >>> weights = rlw(3, torch.Generator().manual_seed(0))
        >>> bool((weights > 0).all()), round(float(weights.sum()), 6)
        (True, 1.0)
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, numbers.Integral) or num_tasks < 1:
        raise ValueError(f"`num_tasks` must be an int >= 1; found {num_tasks!r}.")
    if device is None and generator is not None:
        device = generator.device
    if draws is not None and (isinstance(draws, bool) or not isinstance(draws, int) or draws < 1):
        raise ValueError(f"`draws` must be None or an int >= 1; found {draws!r}.")
    shape = (int(num_tasks),) if draws is None else (draws, int(num_tasks))
    normal_draw = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return torch.softmax(normal_draw, dim=-1)
