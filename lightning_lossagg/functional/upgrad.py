"""UPGrad: the mean of the task gradients' projections onto the cone of non-conflicting updates."""

import math

import numpy as np
import torch
from torch import Tensor

from lightning_lossagg.functional._qp import (
    TINY,
    active_set_qps,
    validated_gramian,
    validated_preferences,
)
from lightning_lossagg.functional._small import pair, two_by_two

# The normalised QP has multipliers of the order of the preferences: this is rounding level.
KKT_TOL = 1e-12


def upgrad(
    gramian: Tensor,
    pref_vector: Tensor | None = None,
    reg_eps: float = 1e-4,
    norm_eps: float = 0.0,
    max_iter: int = 250,
    guesses: list[np.ndarray] | None = None,
) -> Tensor:
    r"""Weights of UPGrad (Unconflicting Projection of Gradients).

    Each gradient is projected onto the dual cone :math:`\{x : \langle x, g_j \rangle \ge 0\ \forall
    j\}` of updates that conflict with no task, and the projections are combined with the
    preference vector :math:`p` (default :math:`1/K`). By Proposition 1 of the paper the projection
    of :math:`J^\top u` is :math:`J^\top v` with

    .. math::

        v = \operatorname*{arg\,min}_{v \succeq u} v^\top \tilde G v,
        \qquad w = \sum_{i=1}^{K} v^{(i)} \text{ where } u^{(i)} = p_i e_i,

    solved exactly for each task by an active-set method. :math:`\tilde G = G / \operatorname{tr} G
    + \epsilon I` (``reg_eps``) is torchjd's normalised, regularised Gramian: the regularisation
    keeps the QP strictly convex and lets :math:`\langle d, g_j \rangle` go below zero by at most
    ``reg_eps * tr(G) * |w_j|``.

    Scale: torchjd's, :math:`d = \sum_i p_i \pi(g_i)`, by default the mean of the projections
    (LibMTL's UPGrad copies torchjd). With no conflict the weights equal :math:`p`. They do not
    change when all gradients are scaled by the same factor. Unlike torchjd, which treats Gramians
    with ``tr(G) < 1e-4`` as zero (its ``norm_eps``) and so returns :math:`p` for small gradients,
    only a trace at most ``norm_eps`` (default 0) counts as zero here; pass ``norm_eps=1e-4`` to
    reproduce torchjd exactly. A zero Gramian and ``K = 1`` give :math:`p`. The weights are
    detached.

    Paper: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    https://arxiv.org/abs/2406.16232.

    Args:
        gramian: the [K, K] Gramian :math:`G_{ij} = \langle g_i, g_j \rangle` of the task gradients.
        pref_vector: weights :math:`p` of shape [K] combining the projections, one preference
            per task: each >= 0, at least one > 0; ``None``: ``1/K``.
        reg_eps: :math:`\epsilon > 0` added to the diagonal of the trace-normalised Gramian.
        norm_eps: Gramians whose trace is at most this are treated as zero.
        max_iter: most active-set changes per projection (the exact solution needs about ``K``).
        guesses: per projection, the coordinates expected above their bounds (a training step
            passes the previous step's, which rarely change): each solve starts there when it
            can. Updated in place with this call's; the weights do not depend on them.

    Returns:
        Weights of shape [K], with the Gramian's dtype and device.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.upgrad import upgrad
        >>> jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> upgrad(jacobian @ jacobian.T, reg_eps=1e-9)  # for two tasks: PCGrad / 2
        tensor([1.0000, 0.7500])
    """
    if not 0 < reg_eps < math.inf:
        raise ValueError(
            f"reg_eps must be a finite number > 0 (it makes the QP solvable), got {reg_eps}."
        )
    if not 0 <= norm_eps < math.inf:
        raise ValueError(f"norm_eps must be a finite number >= 0, got {norm_eps}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
    matrix = validated_gramian(gramian).numpy()
    num_tasks = matrix.shape[0]
    preferences = validated_preferences(pref_vector, num_tasks, default=1.0 / num_tasks).numpy()
    if guesses is not None and (
        len(guesses) != num_tasks or any(np.shape(guess) != (num_tasks,) for guess in guesses)
    ):
        shapes = [np.shape(guess) for guess in guesses]
        raise ValueError(
            f"guesses must hold one bool array of shape ({num_tasks},) per task ({num_tasks}), "
            f"got shapes {shapes}."
        )
    supports = None if guesses is None else np.stack(guesses)
    weights, supports = upgrad_weights(matrix, preferences, reg_eps, norm_eps, max_iter, supports)
    if guesses is not None:
        guesses[:] = list(supports)
    return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)


def upgrad_weights(
    matrix: np.ndarray,
    preferences: np.ndarray,
    reg_eps: float = 1e-4,
    norm_eps: float = 0.0,
    max_iter: int = 250,
    supports: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`upgrad` on a symmetric float64 NumPy Gramian, unchecked (for the callback's step).

    ``supports[i]``: the coordinates expected above their bounds in projection ``i`` (``None``:
    none). Returns the weights and this call's supports. The projections share their Hessian:
    they are solved together (:func:`active_set_qps`).
    """
    num_tasks = matrix.shape[0]
    if supports is None:
        supports = np.zeros((num_tasks, num_tasks), dtype=bool)
    trace = matrix.trace()
    if trace <= norm_eps or trace <= TINY:  # every projection is its own bound: no support
        return preferences.copy(), np.zeros_like(supports)
    if num_tasks == 2:
        return _two_task_upgrad(*two_by_two(matrix / trace), *pair(preferences), reg_eps)
    hessian = matrix / trace + reg_eps * np.eye(num_tasks)
    tol = KKT_TOL * float(np.abs(preferences).max())
    lowers = np.diag(preferences)  # projection i: v >= p_i e_i
    projections = active_set_qps(hessian, np.zeros(num_tasks), lowers, max_iter, tol, supports)
    return projections.sum(0), projections > lowers


def _two_task_upgrad(
    g11: float, g12: float, _: float, g22: float, p1: float, p2: float, reg_eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """The two projections in closed form (in Python floats: the active-set solver's NumPy
    operations on a 2×2 matrix cost more). With ``H = [[a, b], [b, c]]`` positive definite and
    ``q1 = max(p1, 0)``, the first projection is ``v = (q1, max(0, -b q1 / c))``: ``v = 0`` when
    ``p1 <= 0``; else the first bound is active and ``Hv >= 0`` (``a q1 + b v2 =
    q1 (a - b^2 / c) > 0`` when ``v2 > 0``), the KKT conditions. The second likewise."""
    a, b, c = g11 + reg_eps, g12, g22 + reg_eps
    q1, q2 = max(p1, 0.0), max(p2, 0.0)
    second_in_first = max(0.0, -b * q1 / c)
    first_in_second = max(0.0, -b * q2 / a)
    weights = np.array([q1 + first_in_second, q2 + second_in_first])
    supports = np.array([[q1 > p1, second_in_first > 0], [first_in_second > 0, q2 > p2]])
    return weights, supports
