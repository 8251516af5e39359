"""Nash-MTL: the Nash bargaining solution between the tasks, clipped to a maximum norm."""

import math

import numpy as np
import torch
from torch import Tensor

from lightning_lossagg.functional._qp import TINY, validated_gramian
from lightning_lossagg.functional._small import two_by_two

# Stop when the Newton decrement is this small: the residual of alpha * (G alpha) = 1 is then of
# the order of float64 rounding.
_DECREMENT_TOL = 1e-10
_RESIDUAL_TOL = 1e-6
# Newton steps allowed: about 10 are needed, hundreds to a few thousand (a few ms each hundred)
# for nearly degenerate input (weights of 1e3-1e4 times those of well-spread gradients), whose
# damped steps decrease the objective by a bounded amount each. Input without a solution stops
# at _DIVERGED instead, in some 50 steps.
MAX_ITER = 5000
# Where no solution exists, the weights along a vanishing combination of the gradients grow
# geometrically (by half at least per damped step): once a weight times its gradient's norm
# (1 for orthogonal gradients, 1e3-1e4 nearly degenerate) passes this, the objective is taken
# as unbounded, in some 50 steps (a zero gradient counts with a norm of 1e-8 of the trace's root:
# some 90 steps).
_DIVERGED = 1e8
_NORM_FLOOR = 1e-16
# Two gradients with 1 + cos at most this many rounding units of the Gramian's dtype are taken
# as opposite (no solution): below it the cosine itself is rounding.
_OPPOSITE_ROUNDING = 64
_OPPOSITE_TOL = 1e-12  # at least (float64 products of norms)


def _resolved(matrix: np.ndarray, alpha: np.ndarray, eps: float) -> float | None:
    """``||d||^2 = alpha @ G @ alpha`` for ``d = sum_k alpha_k g_k``, or ``None`` where it is
    below the rounding of a Gramian in a dtype of rounding unit ``eps`` (``K eps sum_k alpha_k^2
    ||g_k||^2``): the gradients cancel to within what the Gramian can tell apart."""
    quadratic = float(alpha @ matrix @ alpha)
    rounding = len(alpha) * eps * float(alpha**2 @ matrix.diagonal())
    return quadratic if quadratic > rounding else None


def _scaled_like_a_solution(matrix: np.ndarray, alpha: np.ndarray, eps: float) -> np.ndarray:
    """``alpha`` times the factor giving ``alpha @ G @ alpha = K``, as every solution has.

    Unchanged when its update vanishes to the rounding ``eps`` of the Gramian's dtype (e.g. equal
    weights on opposite gradients).
    """
    quadratic = _resolved(matrix, alpha, eps)
    return alpha if quadratic is None else alpha * np.sqrt(len(alpha) / quadratic)


def _solve_bargaining(matrix: np.ndarray, start: np.ndarray, max_iter: int) -> np.ndarray | None:
    """Damped Newton on the self-concordant ``alpha @ G @ alpha / 2 - sum(log(alpha))``, in NumPy
    (K×K steps are cheaper there than in torch).

    Returns ``None`` when it does not converge: then the function is unbounded below (some
    non-negative combination of the gradients vanishes) and no solution exists.
    """
    if matrix.diagonal().min() <= 0.0:  # a zero gradient: no alpha_k (G alpha)_k = 1
        return None
    alpha = start
    # On G / tr G: the norms, floored, that scale the weights in the divergence test.
    norms = np.sqrt(np.maximum(matrix.diagonal(), _NORM_FLOOR))
    for _ in range(max_iter):
        gradient = matrix @ alpha - 1.0 / alpha
        hessian = matrix + np.diag(alpha**-2)
        try:
            step = np.linalg.solve(hessian, -gradient)
        except np.linalg.LinAlgError:
            return None
        decrement = np.sqrt(max(-gradient @ step, 0.0))
        if not np.isfinite(decrement):
            return None
        if decrement < _DECREMENT_TOL:
            residual = np.abs(alpha * (matrix @ alpha) - 1.0).max()
            return alpha if residual < _RESIDUAL_TOL else None
        # Damped steps 1 / (1 + decrement) stay inside the domain alpha > 0 (self-concordance).
        alpha = alpha + (step if decrement < 0.25 else step / (1.0 + decrement))
        if (alpha * norms).max() > _DIVERGED:
            return None
    return None


def _two_task_solution(
    g11: float, g12: float, _: float, g22: float, eps: float
) -> np.ndarray | None:
    """Two tasks' bargaining solution in closed form (Python floats), ``None`` where Newton finds
    none either. ``alpha_1 (G alpha)_1 = alpha_2 (G alpha)_2`` gives ``g11 alpha_1^2 =
    g22 alpha_2^2``, so ``alpha_k = 1 / (||g_k|| sqrt(1 + cos))`` with ``cos`` the cosine of the
    two gradients: a solution exactly when neither is zero and they are not opposite (to the
    rounding ``eps`` of the Gramian's dtype: in float32 the cosine of ``g`` and ``-3 g`` is
    ``-1 + 1e-7``, which gave weights of 1e3 set by rounding)."""
    if not (g11 > TINY and g22 > TINY):
        return None
    norm1, norm2 = math.sqrt(g11), math.sqrt(g22)
    agreement = 1.0 + g12 / (norm1 * norm2)  # 1 + cos, in [0, 2]
    if not agreement > max(_OPPOSITE_TOL, _OPPOSITE_ROUNDING * eps):
        return None
    root = math.sqrt(agreement)
    return np.array([1.0 / (norm1 * root), 1.0 / (norm2 * root)])


def nash_mtl(
    gramian: Tensor,
    previous: Tensor | None = None,
    max_norm: float = 1.0,
    max_iter: int = MAX_ITER,
) -> Tensor:
    r"""Weights of Nash-MTL: the Nash bargaining solution, with LibMTL's gradient norm clipping.

    The update :math:`d = \sum_i \alpha_i g_i` maximises :math:`\sum_i \log \langle g_i, d\rangle`
    in a ball; its weights solve :math:`\alpha_i (G\alpha)_i = 1` with :math:`\alpha \succ 0`,
    which is the stationarity condition of a strictly convex problem solved by damped Newton in
    float64 (instead of LibMTL's and torchjd's sequence of cvxpy problems; two tasks in closed
    form, :math:`\alpha_i = 1 / (\lVert g_i\rVert \sqrt{1 + \cos(g_1, g_2)})`):

    .. math::

        \alpha^\star = \operatorname*{arg\,min}_{\alpha \succ 0}
            \tfrac12 \alpha^\top G \alpha - \sum_{i=1}^K \log \alpha_i, \qquad
        w = \alpha^\star \min\Big(1, \frac{m}{\sqrt{\alpha^{\star\top} G \alpha^\star}}\Big).

    Scale: LibMTL's and torchjd's. :math:`\alpha^\star` solves the equation for the unnormalised
    :math:`G` (their constraint undoes their Frobenius normalisation), so
    :math:`\lVert d\rVert = \sqrt K` before clipping; the update is then clipped to norm
    :math:`m` = ``max_norm`` (0 disables clipping), as LibMTL's ``clip_grad_norm_`` does to the
    shared gradient. Here the clipping scales the weights, so task-specific parameters are scaled
    too.

    Degenerate input: no solution exists when some non-negative combination of the gradients is
    zero (a zero Gramian or gradient, opposite gradients), to the rounding of the Gramian's dtype
    (in float32 the cosine of ``g`` and ``-3 g`` is ``-1 + 1e-7``). Then the previous weights
    (ones at the first step) are reused, scaled so that :math:`\lVert d\rVert^2 = K` as for every
    solution, and clipped; LibMTL and torchjd reuse them unscaled when cvxpy fails, and otherwise
    may return an approximate solution with huge weights. So the update never depends on the
    scale of the gradients. ``K = 1`` gives :math:`1 / \lVert g \rVert`. Nearly degenerate input
    has a solution with large weights.

    Paper: Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022,
    https://arxiv.org/abs/2202.01017.

    Args:
        gramian: the [K, K] Gramian :math:`G_{ij} = \langle g_i, g_j \rangle` of the task gradients.
        previous: the weights this function returned at the previous step (the state to keep), or
            ``None`` at the first step. Newton starts from them; they are the fallback. The
            solution, when there is one, does not depend on them.
        max_norm: the largest norm of the update :math:`\lVert d\rVert = \sqrt{w^\top G w}`.
        max_iter: most Newton steps; about 10 are needed, thousands for nearly degenerate input
            (where no solution exists, the weights' growth stops Newton in some 50 steps, and a
            zero gradient before the first). Running out of steps counts as no solution: the
            fallback above.

    Returns:
        Positive weights of shape [K] (detached) with the Gramian's dtype and device.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.nash_mtl import nash_mtl
        >>> jacobian = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> nash_mtl(jacobian @ jacobian.T, max_norm=0.0)
        tensor([1.0000, 0.5000])
    """
    if not max_norm >= 0:
        raise ValueError(f"max_norm must be >= 0 (0 disables clipping), got {max_norm}.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
    matrix = validated_gramian(gramian)
    num_tasks = matrix.shape[0]
    if previous is None:
        start = torch.ones(num_tasks, dtype=torch.float64)
    else:
        # A copy: the fallback may return the start, which must not share memory with previous.
        start = previous.detach().to(device="cpu", dtype=torch.float64, copy=True)
        if start.shape != (num_tasks,) or not (torch.isfinite(start).all() and (start > 0).all()):
            raise ValueError(
                f"previous must hold {num_tasks} positive finite weights (the last result of "
                f"nash_mtl), got {previous}. Pass None to start afresh."
            )
    weights = nash_mtl_weights(
        matrix.numpy(), start.numpy(), max_norm, max_iter, torch.finfo(gramian.dtype).eps
    )
    return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)


def nash_mtl_weights(
    matrix: np.ndarray, start: np.ndarray, max_norm: float, max_iter: int, eps: float
) -> np.ndarray:
    """:func:`nash_mtl` on a symmetric float64 NumPy Gramian from positive weights ``start``,
    unchecked (for the callback's step); ``eps``: the rounding unit of the gradients' dtype."""
    solution = _two_task_solution(*two_by_two(matrix), eps) if len(matrix) == 2 else None
    weights = solution if solution is not None else _scaled_like_a_solution(matrix, start, eps)
    trace = np.trace(matrix)
    # (One task: the scaled start is the solution; two: the closed form is exact.)
    if len(matrix) > 2 and trace > TINY:
        # Newton on G / tr(G) is better conditioned; its solution is sqrt(tr(G)) times ours.
        normalized = _solve_bargaining(matrix / trace, weights * np.sqrt(trace), max_iter)
        solved = None if normalized is None else normalized / np.sqrt(trace)
        # A solution whose update cancels below the Gramian's rounding is the rounding's.
        if solved is not None and _resolved(matrix, solved, eps):
            weights = solved
    norm = np.sqrt(max(weights @ matrix @ weights, 0.0))
    if max_norm > 0 and norm > max_norm:
        weights = weights * (max_norm / norm)
    return weights
