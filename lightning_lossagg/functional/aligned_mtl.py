"""Aligned-MTL: align the task gradients' principal components to remove conflict and dominance."""

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from lightning_lossagg.functional._qp import (
    exactly_scaled,
    symmetric_eigen,
    validated_gramian,
    validated_preferences,
)
from lightning_lossagg.functional._small import PYTHON_TASKS_UP_TO, dot, pair, two_by_two

ScaleMode = Literal["min", "median", "rmse"]


def aligned_mtl(
    gramian: Tensor, pref_vector: Tensor | None = None, scale_mode: ScaleMode = "min"
) -> Tensor:
    r"""Weights of Aligned-MTL (Independent Component Alignment).

    The gradient matrix is replaced by one whose singular values all equal the smallest non-zero
    one, :math:`\hat J = \sigma\, U V^\top` for :math:`J = U \Sigma V^\top`: the aligned task
    gradients are orthogonal, of equal norm, and span the same space. With the eigendecomposition
    :math:`G = Q \Lambda Q^\top` restricted to the :math:`r` eigenvalues above
    ``K * eps * max eigenvalue`` (``eps`` of the Gramian's dtype), :math:`\hat J = B J` and

    .. math::

        B = \sqrt{\lambda}\; Q_r \Lambda_r^{-1/2} Q_r^\top, \qquad w = B p,

    where :math:`\lambda` is the smallest kept eigenvalue (``scale_mode="min"``, the paper's and
    LibMTL's), their median (``"median"``, the lower one for an even count) or mean (``"rmse"``, as
    in the authors' code), and :math:`p` the preference vector. With ``"min"`` the eigenvalues of
    :math:`B` are at most 1, so the weights stay bounded even for nearly collinear gradients.

    Scale: LibMTL's default, :math:`p = \mathbf{1}` (``B.sum(0)``): the update is the sum of the
    aligned gradients. torchjd's ``AlignedMTLWeighting`` defaults to :math:`p = \mathbf{1}/K`, the
    mean, so its weights are ``K`` times smaller; pass ``pref_vector=torch.ones(K)`` to torchjd to
    match. The weights do not change when all gradients are scaled by the same factor. A zero
    Gramian gives :math:`p` (as torchjd's; LibMTL fails); ``K = 1`` gives :math:`p`. The weights
    are detached.

    Paper: Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023,
    https://arxiv.org/abs/2305.19000.

    Args:
        gramian: the [K, K] Gramian :math:`G_{ij} = \langle g_i, g_j \rangle` of the task gradients.
        pref_vector: weights :math:`p` of shape [K] of the aligned gradients, one preference per
            task: each >= 0, at least one > 0; ``None``: ones.
        scale_mode: which kept eigenvalue sets the common norm: ``"min"``, ``"median"``, ``"rmse"``.

    Returns:
        Weights of shape [K], with the Gramian's dtype and device.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.aligned_mtl import aligned_mtl
        >>> jacobian = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> aligned_mtl(jacobian @ jacobian.T)  # aligned gradients (1, 0) and (0, 1)
        tensor([0.5000, 1.0000])
    """
    if scale_mode not in ("min", "median", "rmse"):
        raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}.")
    matrix = validated_gramian(gramian).numpy()
    preferences = validated_preferences(pref_vector, matrix.shape[0], default=1.0).numpy()
    weights = aligned_mtl_weights(matrix, preferences, scale_mode, torch.finfo(gramian.dtype).eps)
    return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)


def aligned_mtl_weights(
    matrix: np.ndarray, preferences: np.ndarray, scale_mode: ScaleMode, eps: float
) -> np.ndarray:
    """:func:`aligned_mtl` on a symmetric float64 NumPy Gramian, unchecked (for the callback's
    step); ``eps``: the rounding unit of the gradients' dtype."""
    if matrix.shape[0] == 2:
        return _two_task_aligned_mtl(*two_by_two(matrix), *pair(preferences), scale_mode, eps)
    return _general_aligned_mtl(matrix, preferences, scale_mode, eps)


def _general_aligned_mtl(
    matrix: np.ndarray, preferences: np.ndarray, scale_mode: ScaleMode, eps: float
) -> np.ndarray:
    """:func:`aligned_mtl_weights` for any number of tasks, by the eigendecomposition."""
    num_tasks = matrix.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    cutoff = num_tasks * eps * max(eigenvalues.max(), 0.0)
    kept = eigenvalues > cutoff
    if not kept.any():
        return preferences.copy()
    eigenvalues, eigenvectors = eigenvalues[kept], eigenvectors[:, kept]
    if scale_mode == "min":
        common = eigenvalues.min()
    elif scale_mode == "median":
        common = np.sort(eigenvalues)[(len(eigenvalues) - 1) // 2]  # the lower one, as torch's
    else:
        common = eigenvalues.mean()
    if num_tasks <= PYTHON_TASKS_UP_TO:
        return _balanced_in_floats(float(common), eigenvalues, eigenvectors, preferences)
    balance = (np.sqrt(common) * eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T
    return balance @ preferences


def _balanced_in_floats(
    common: float, eigenvalues: np.ndarray, eigenvectors: np.ndarray, preferences: np.ndarray
) -> np.ndarray:
    """``balance @ p = sum_k sqrt(common / λ_k) v_k <v_k, p>`` over the kept eigenpairs, in
    Python floats (a few dozen operations on K values cost less than NumPy calls in a step: see
    ``functional._small``)."""
    choices = preferences.tolist()
    weights = [0.0] * len(choices)
    for value, column in zip(eigenvalues.tolist(), eigenvectors.T.tolist(), strict=True):
        along = math.sqrt(common / value) * dot(column, choices)
        weights = [w + along * v for w, v in zip(weights, column, strict=True)]
    return np.array(weights)


def _two_task_aligned_mtl(
    g11: float,
    g12: float,
    _: float,
    g22: float,
    p1: float,
    p2: float,
    scale_mode: ScaleMode,
    eps: float,
) -> np.ndarray:
    """:func:`_general_aligned_mtl` for two tasks in Python floats (NumPy's operations on a 2×2
    matrix cost more), with the same cut-off.

    ``G = [[a, b], [b, c]]`` is first scaled by a power of 2 (exactly) so that no product over- or
    underflows. Its eigenvalues are ``λ₊ = m + r`` and ``λ₋ = det / λ₊`` (no cancellation, unlike
    ``m - r``), ``m = (a + c) / 2``, ``r = hypot((a - c) / 2, b)``, ``det = ac - b²``; the unit
    eigenvector ``u`` of ``λ₊`` is ``(h + r, b)`` normalised for ``h = (a - c) / 2 >= 0`` and ``(b,
    r - h)`` otherwise (no cancellation either), and ``u⊥ = (-u₂, u₁)`` that of ``λ₋``. With both
    kept, ``w = √(λ/λ₊) u (u·p) + √(λ/λ₋) u⊥ (u⊥·p)``, ``λ = λ₋`` for ``"min"`` and ``"median"``
    and ``m`` (their mean) for ``"rmse"``; with ``λ₊`` alone, ``w = u (u·p)``; with neither, ``p``.
    """
    a, b, c = exactly_scaled(g11, g12, g22)
    mean, radius, x, y = symmetric_eigen(a, b, c)
    large = mean + radius
    if large <= 0.0:
        return np.array([p1, p2])
    length = math.hypot(x, y)
    u1, u2 = (x / length, y / length) if length > 0 else (1.0, 0.0)
    along = u1 * p1 + u2 * p2
    small = (a * c - b * b) / large
    if small <= 2 * eps * large:
        return np.array([u1 * along, u2 * along])
    across = u1 * p2 - u2 * p1
    common = mean if scale_mode == "rmse" else small
    along *= math.sqrt(common / large)
    across *= math.sqrt(common / small)
    return np.array([u1 * along - u2 * across, u2 * along + u1 * across])
