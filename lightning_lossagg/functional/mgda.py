"""MGDA / MGDA-UB: the min-norm point in the convex hull of the task gradients."""

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_lossagg.functional._qp import TINY, active_set_qp, validated_gramian
from lightning_lossagg.functional._small import PYTHON_TASKS_UP_TO, two_by_two

# Relative Tikhonov term: among weights giving the same min-norm update (identical or linearly
# dependent gradients) it picks the one of least norm, so the result is unique and symmetric.
TIE_BREAK = 1e-10


def mgda(gramian: Tensor, max_iter: int = 250, tol: float = 1e-12) -> Tensor:
    r"""Weights of MGDA: the point of least norm in the convex hull of the task gradients.

    .. math::

        w^\star = \operatorname*{arg\,min}_{w \in \Delta^{K}}
            \Big\lVert \sum_{i=1}^{K} w_i g_i \Big\rVert^2
            = \operatorname*{arg\,min}_{w \in \Delta^{K}} w^\top G w,
        \qquad \Delta^{K} = \{w \succeq 0,\ \textstyle\sum_i w_i = 1\}.

    Instead of Frank-Wolfe (LibMTL, torchjd), the QP is solved exactly: by its KKT conditions
    :math:`w^\star = x^\star / \mathbf{1}^\top x^\star` with
    :math:`x^\star = \arg\min_{x \succeq 0} \tfrac12 x^\top (G / \operatorname{tr} G
    + \epsilon I) x - \mathbf{1}^\top x`, solved by an active-set method, or for two tasks by
    the paper's closed form (``TIE_BREAK`` :math:`\epsilon = 10^{-10}` only makes the weights
    unique). The update is zero, to the tie-break (about ``1e-10`` of the gradients' norm), when
    the gradients are Pareto stationary (e.g. two opposite gradients).

    Scale: the weights lie on the simplex (sum 1), as in LibMTL (``mgda_gn="none"``) and torchjd;
    they do not change when all gradients are scaled by the same factor. Degenerate input: a zero
    Gramian gives uniform weights :math:`1/K`; ``K = 1`` gives ``[1.0]``. The weights are detached.

    Paper: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    https://arxiv.org/abs/1810.04650.

    Args:
        gramian: the [K, K] Gramian :math:`G_{ij} = \langle g_i, g_j \rangle` of the task gradients.
        max_iter: most active-set changes; the exact solution usually needs at most ``2 * K``.
        tol: optimality tolerance on the KKT multipliers, relative to the squared min norm. It
            must stay below ``TIE_BREAK`` for ties to be split evenly (identical gradients then
            get equal weights).

    Returns:
        Weights of shape [K] on the simplex, with the Gramian's dtype and device.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.mgda import mgda
        >>> jacobian = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> mgda(jacobian @ jacobian.T)
        tensor([0.8000, 0.2000])
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
    if not 0 <= tol < math.inf:
        raise ValueError(f"tol must be a finite number >= 0, got {tol}.")
    matrix = validated_gramian(gramian).numpy()
    weights = torch.from_numpy(min_norm_weights(matrix, max_iter, tol))
    return weights.to(dtype=gramian.dtype, device=gramian.device)


def min_norm_weights(
    matrix: np.ndarray, max_iter: int = 250, tol: float = 1e-12, guess: np.ndarray | None = None
) -> np.ndarray:
    """:func:`mgda` on a symmetric float64 NumPy Gramian, unchecked (for the callbacks' step);
    ``guess``: the tasks expected to have a positive weight (see :func:`active_set_qp`)."""
    num_tasks = matrix.shape[0]
    if num_tasks == 2:
        return _two_task_weights(*two_by_two(matrix))
    trace = float(matrix.trace())
    if trace <= TINY:
        return np.full(num_tasks, 1.0 / num_tasks)
    matrix = _positive_semidefinite(matrix, trace)
    hessian: Any
    if num_tasks <= PYTHON_TASKS_UP_TO:  # the solver's Python floats take lists
        hessian = [[value / trace for value in row] for row in matrix.tolist()]
        for i, row in enumerate(hessian):
            row[i] += TIE_BREAK
    else:
        hessian = matrix / trace + TIE_BREAK * np.eye(num_tasks)
    unnormalized = active_set_qp(
        hessian, [-1.0] * num_tasks, [0.0] * num_tasks, max_iter, tol, guess
    )
    return unnormalized / unnormalized.sum()


def _positive_semidefinite(matrix: np.ndarray, trace: float) -> np.ndarray:
    """``matrix`` itself if ``matrix / trace + TIE_BREAK I`` is positive definite (a Cholesky
    factorisation, a few microseconds), else its nearest positive semidefinite matrix: its
    eigenvalues below 0 set to 0. A Gramian of linearly dependent float32 gradients is
    indefinite at float32 rounding (eigenvalues of -1e-8 of its trace), far beyond
    ``TIE_BREAK``: the active-set method, which needs a convex problem, then stopped on a wrong
    support (an update twice the min norm)."""
    try:
        np.linalg.cholesky(matrix / trace + TIE_BREAK * np.eye(len(matrix)))
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(matrix)
        return (vectors * np.maximum(values, 0.0)) @ vectors.T
    return matrix


def _two_task_weights(g11: float, g12: float, _: float, g22: float) -> np.ndarray:
    """Sener & Koltun's Algorithm 1, exact: the min-norm point of the segment [g_1, g_2] (in
    Python floats: a handful of NumPy operations on a 2×2 matrix cost more)."""
    trace = g11 + g22
    if trace <= TINY:
        return np.full(2, 0.5)
    a, b, c = g11 / trace + TIE_BREAK, g12 / trace, g22 / trace + TIE_BREAK
    first = min(max((c - b) / (a + c - 2 * b), 0.0), 1.0)  # a + c - 2b >= 2 * TIE_BREAK
    return np.array([first, 1.0 - first])
