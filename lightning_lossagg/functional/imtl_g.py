"""IMTL-G: the update that has the same projection onto every task's gradient direction."""

import math

import numpy as np
import torch
from torch import Tensor

from lightning_lossagg.functional._qp import exactly_scaled, symmetric_eigen, validated_gramian
from lightning_lossagg.functional._small import (
    PYTHON_TASKS_UP_TO,
    cholesky,
    cholesky_solve,
    inverse_trace,
    two_by_two,
)


def imtl_g(gramian: Tensor) -> Tensor:
    r"""Weights of IMTL-G (the gradient half of Impartial Multi-Task Learning).

    IMTL-G looks for the update :math:`d = \sum_i \alpha_i g_i` with :math:`\sum_i \alpha_i = 1`
    whose projections onto the unit gradients :math:`u_i = g_i / \lVert g_i \rVert` are all equal.
    From the Gramian alone, following torchjd's generalisation to linearly dependent gradients:

    .. math::

        v = G^{+} \begin{bmatrix} \lVert g_1 \rVert & \cdots & \lVert g_K \rVert \end{bmatrix}^\top,
        \qquad \alpha = \frac{v}{\mathbf{1}^\top v},

    since :math:`G v = (\lVert g_i \rVert)_i` means :math:`\langle J^\top v, u_i \rangle = 1` for
    every task. With independent gradients this is the paper's closed form
    :math:`\alpha_{2:K} = g_1 U^\top (D U^\top)^{-1}`. The pseudo-inverse drops eigenvalues below
    ``K * eps * max eigenvalue``, with ``eps`` of the Gramian's dtype (its accuracy). Up to 8
    tasks, a Gramian of which it provably keeps every eigenvalue is solved by its Cholesky factor
    instead: the same result, to rounding.

    Scale: :math:`\alpha` sums to 1, as in LibMTL and torchjd; it does not change when all
    gradients are scaled by the same factor. Weights can be negative, and when
    :math:`\mathbf{1}^\top v < 0` every task's projection is negative: that is the method.
    Degenerate input: when :math:`\mathbf{1}^\top v` vanishes, i.e.
    :math:`|\mathbf{1}^\top v| \max_i \lVert g_i \rVert \le \sqrt{K \epsilon}` (zero Gramian, two
    opposite gradients of equal norm), every update with equal projections is zero and the weights
    are uniform, :math:`1/K` (torchjd returns zeros, or weights set by rounding; the update is zero
    either way). A zero gradient gets weight 0; ``K = 1`` gives ``[1.0]``. The weights are
    detached.

    Paper: Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021,
    https://openreview.net/forum?id=IMPnRXEWpvr (no arXiv version).

    Args:
        gramian: the [K, K] Gramian :math:`G_{ij} = \langle g_i, g_j \rangle` of the task gradients.

    Returns:
        Weights of shape [K] that sum to 1, with the Gramian's dtype and device.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.imtl_g import imtl_g
        >>> jacobian = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> imtl_g(jacobian @ jacobian.T)
        tensor([0.6667, 0.3333])
    """
    matrix = validated_gramian(gramian).numpy()
    weights = imtl_g_weights(matrix, torch.finfo(gramian.dtype).eps)
    return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)


def imtl_g_weights(matrix: np.ndarray, eps: float) -> np.ndarray:
    """:func:`imtl_g` on a symmetric float64 NumPy Gramian, unchecked (for the callback's step);
    ``eps``: the rounding unit of the gradients' dtype."""
    if matrix.shape[0] == 2:
        return _two_task_imtl_g(*two_by_two(matrix), eps)
    return _general_imtl_g(matrix, eps)


def _general_imtl_g(matrix: np.ndarray, eps: float) -> np.ndarray:
    """:func:`imtl_g_weights` for any number of tasks, by the pseudo-inverse (for up to
    ``PYTHON_TASKS_UP_TO`` tasks with a well-conditioned Gramian, by :func:`_inverse_in_floats`)."""
    num_tasks = matrix.shape[0]
    precision = num_tasks * eps
    norms = np.sqrt(np.maximum(matrix.diagonal(), 0.0))
    in_floats = None
    if num_tasks <= PYTHON_TASKS_UP_TO:
        in_floats = _inverse_in_floats(matrix.tolist(), norms.tolist(), precision)
    if in_floats is None:
        solution = np.linalg.pinv(matrix, rcond=precision, hermitian=True) @ norms
    else:
        solution = np.array(in_floats)
    total = solution.sum()
    # 1ᵀv is measured in units of 1 / ||g||; below this cut-off the weights, ~1 / |1ᵀv|, would be
    # set by rounding in the cancellation, not by the gradients.
    if abs(total) * norms.max() <= precision**0.5:
        return np.full(num_tasks, 1.0 / num_tasks)
    return solution / total


def _inverse_in_floats(
    rows: list[list[float]], norms: list[float], precision: float
) -> list[float] | None:
    """``G⁻¹ n`` (``n``: the gradients' norms) in Python floats (``functional._small``) when the
    pseudo-inverse keeps every eigenvalue, i.e. when ``λ_min > precision · λ_max``, as
    ``trace(G) · trace(G⁻¹) < 1 / precision`` guarantees (``λ_min >= 1 / trace(G⁻¹)``, ``λ_max
    <= trace(G)``); else ``None``."""
    factor = cholesky(rows)
    if factor is None:
        return None
    trace = sum(row[i] for i, row in enumerate(rows))
    if not trace * inverse_trace(factor) * precision < 1.0:
        return None
    return cholesky_solve(factor, norms)


def _two_task_imtl_g(g11: float, g12: float, _: float, g22: float, eps: float) -> np.ndarray:
    """:func:`_general_imtl_g` for two tasks in Python floats (NumPy's operations on a 2×2 matrix
    cost more), with the same rank decision and fallback.

    ``G = [[a, b], [b, c]]`` is first scaled by a power of 4 (exactly, norms included) so that no
    product over- or underflows. Its eigenvalues are ``m ± r``, ``m = (a + c) / 2``, ``r =
    hypot((a - c) / 2, b)``; the one of largest magnitude, ``λ = m + r`` (``m - r`` if ``m < 0``),
    sets the cut-off: the other, ``det / λ`` with ``det = ac - b²`` (no cancellation, unlike the
    difference), is kept when ``|det| > 2 eps λ²``. Then ``v = G⁻¹ n = (c n₁ - b n₂, a n₂ - b n₁) /
    det``; else ``v = q (q·n) / (λ |q|²)`` with ``q`` the eigenvector of ``λ``: ``(h + r, b)`` for
    ``h = (a - c) / 2 >= 0`` and ``(b, r - h)`` otherwise (no cancellation either). A rank-1 ``G``
    with ``λ <= 0`` gets the uniform weights: it is zero, or has a negative diagonal entry, and
    then ``|1ᵀv| max n <= 2√2 eps / (1 - √(2 eps))``, far below the fallback's ``√(2 eps)``.
    """
    a, b, c = exactly_scaled(g11, g12, g22, even=True)
    precision = 2 * eps
    norm1, norm2 = math.sqrt(max(a, 0.0)), math.sqrt(max(c, 0.0))
    mean, radius, x, y = symmetric_eigen(a, b, c)
    largest = mean + radius if mean >= 0 else mean - radius
    determinant = a * c - b * b
    if abs(determinant) > precision * largest * largest:
        first = (c * norm1 - b * norm2) / determinant
        second = (a * norm2 - b * norm1) / determinant
    elif largest <= 0.0:
        return np.full(2, 0.5)
    else:
        along = (x * norm1 + y * norm2) / (largest * (x * x + y * y))
        first, second = x * along, y * along
    total = first + second
    if abs(total) * max(norm1, norm2) <= precision**0.5:
        return np.full(2, 0.5)
    return np.array([first / total, second / total])
