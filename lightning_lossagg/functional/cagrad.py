"""CAGrad: the update that maximises the worst task improvement near the mean gradient."""

import math

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from lightning_lossagg.functional._qp import TINY, active_set_qp, validated_gramian
from lightning_lossagg.functional._small import (
    PYTHON_TASKS_UP_TO,
    cholesky,
    cholesky_solve,
    dot,
    two_by_two,
)

# Below this norm, relative to sum_i w_i ||g_i|| (its norm without cancellation), the inner
# solution g_w is taken as zero: the gradients cancel, they are Pareto stationary, and
# g_w / ||g_w|| is undefined. (A g_w that is small because its gradients are is not: relative
# to the largest gradient, a task gradient 1e-7 times smaller was taken as stationary.) Below
# NEGLIGIBLE (relative to the root of the Gramian's trace) g_w is zero all the same: the search
# leaves ~1e-16 of weight on a task it should not, whose own norm it would then be.
STATIONARY_TOL = 1e-6
NEGLIGIBLE = 1e-12
# Smooths sqrt(w^T G w) at g_w = 0 so that SLSQP sees a differentiable objective.
_SQRT_SMOOTHING = 1e-20
# Makes the projection QP strictly convex (its Gramian is singular at Pareto-stationary points).
_TIE_BREAK = 1e-10
_RESCALE_DIVISORS = {0: lambda c: 1.0, 1: lambda c: 1.0 + c**2, 2: lambda c: 1.0 + c}


# A weight of SLSQP's answer above this counts in its support.
_SUPPORT_TOL = 1e-9


def _inner_weights(
    gram: np.ndarray, lin: np.ndarray, radius: float, support: np.ndarray | None = None
) -> np.ndarray:
    """Minimise ``lin @ w + radius * sqrt(w @ gram @ w)`` over the simplex: exactly by
    :func:`_on_support` where it certifies its answer (from the ``support`` guessed, else from
    the best vertex), else with SciPy's SLSQP, whose answer's support the exact search then
    starts from (an answer it certifies is the same, to the bit, as from a right guess)."""
    exact = (
        None if support is None or not support.any() else _on_support(gram, lin, radius, support)
    )
    if exact is None:
        exact = _on_support(gram, lin, radius)
    if exact is not None:
        return exact

    def objective(w: np.ndarray) -> float:
        return float(lin @ w + radius * np.sqrt(max(w @ gram @ w, 0.0) + _SQRT_SMOOTHING))

    def gradient(w: np.ndarray) -> np.ndarray:
        return lin + radius * (gram @ w) / np.sqrt(max(w @ gram @ w, 0.0) + _SQRT_SMOOTHING)

    num_tasks = len(lin)
    start = np.full(num_tasks, 1.0 / num_tasks)
    simplex = {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}
    result = minimize(
        objective,
        start,
        jac=gradient,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * num_tasks,
        constraints=[simplex],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    weights = np.clip(result.x, 0.0, None)
    weights /= weights.sum()
    polished = _on_support(gram, lin, radius, weights > _SUPPORT_TOL)
    return weights if polished is None else polished


def _on_support(
    gram: np.ndarray, lin: np.ndarray, radius: float, start: np.ndarray | None = None
) -> np.ndarray | None:
    r"""The inner minimiser from its KKT conditions, by an active-set search over its support.

    On a support :math:`S` with :math:`v = w / \lVert g_w\rVert`, stationarity reads
    :math:`l_S + r\,G_{SS} v = \mu \mathbf 1` with :math:`v^\top G_{SS} v = 1`, so
    :math:`v = (\mu a - b) / r` for :math:`a = G_{SS}^{-1}\mathbf 1`, :math:`b = G_{SS}^{-1} l_S`,
    and :math:`\mu` is the root of a quadratic with :math:`\mathbf 1^\top v > 0`. Starting from
    ``start`` (a guessed support) or the best vertex, a task outside with
    :math:`(\nabla f)_i < \mu` joins :math:`S` and a task with a negative weight leaves it.
    The objective is convex, so a point meeting every KKT condition is the minimiser; ``None``
    when none is found (singular :math:`G_{SS}`, Pareto-stationary gradients): SLSQP decides.
    With up to ``PYTHON_TASKS_UP_TO`` tasks (a training step's), the search runs in Python floats
    (:func:`_on_support_in_floats`), from the guess or the best vertex alike: the weights are
    those of the support found, computed alike whatever the guess.
    """
    if len(lin) <= PYTHON_TASKS_UP_TO:
        if start is None:
            start = _best_vertex(gram, lin, radius)
        try:
            found = _on_support_in_floats(
                gram.tolist(), lin.tolist(), float(radius), start.tolist()
            )
        except np.linalg.LinAlgError:  # a near-singular support: LAPACK decides
            return _on_support_in_numpy(gram, lin, radius, start)
        return None if found is None else np.array(found)
    return _on_support_in_numpy(gram, lin, radius, start)


def _on_support_in_numpy(
    gram: np.ndarray, lin: np.ndarray, radius: float, start: np.ndarray | None = None
) -> np.ndarray | None:
    """:func:`_on_support` in NumPy."""
    num_tasks = len(lin)
    support = _best_vertex(gram, lin, radius) if start is None else start.copy()
    tol = 1e-12 * (np.abs(lin).max() + radius)
    for _ in range(2 * num_tasks):
        try:
            inverse = np.linalg.solve(
                gram[np.ix_(support, support)],
                np.stack([np.ones(support.sum()), lin[support]], axis=1),
            )
        except np.linalg.LinAlgError:
            return None
        a, b = inverse[:, 0], inverse[:, 1]
        sum_a, sum_b = a.sum(), b.sum()
        discriminant = sum_b**2 - sum_a * (lin[support] @ b - radius**2)
        if not (sum_a > 0 and discriminant > 0):
            return None
        mu = (sum_b + np.sqrt(discriminant)) / sum_a
        v = np.zeros(num_tasks)
        v[support] = (mu * a - b) / radius
        if (v[support] < 0).any():
            dropped = np.flatnonzero(support)[v[support].argmin()]
            support[dropped] = False
            if not support.any():
                return None
            continue
        gradient = lin + radius * (gram @ v)
        outside = ~support & (gradient < mu - tol)
        if not outside.any():
            return v / v.sum()
        support[np.where(outside, gradient, np.inf).argmin()] = True
    return None


def _best_vertex(gram: np.ndarray, lin: np.ndarray, radius: float) -> np.ndarray:
    r"""The support of the best vertex of the simplex: :math:`f(e_i) = l_i + r \sqrt{G_{ii}}`."""
    support = np.zeros(len(lin), dtype=bool)
    support[(lin + radius * np.sqrt(np.maximum(gram.diagonal(), 0.0))).argmin()] = True
    return support


def _on_support_in_floats(
    gram: list[list[float]], lin: list[float], radius: float, start: list[bool]
) -> list[float] | None:
    """:func:`_on_support_in_numpy` from ``start``, step for step, in Python floats
    (``functional._small``).

    Raises:
        numpy.linalg.LinAlgError: a support's Gramian is near-singular (:func:`cholesky`).
    """
    num_tasks = len(lin)
    support = list(start)
    tol = 1e-12 * (max(map(abs, lin)) + radius)
    for _ in range(2 * num_tasks):
        inside = [i for i in range(num_tasks) if support[i]]
        factor = cholesky([[gram[i][j] for j in inside] for i in inside])
        if factor is None:
            raise np.linalg.LinAlgError("near-singular support")
        a = cholesky_solve(factor, [1.0] * len(inside))
        b = cholesky_solve(factor, [lin[i] for i in inside])
        sum_a, sum_b = sum(a), sum(b)
        discriminant = sum_b**2 - sum_a * (
            sum(lin[i] * b_i for i, b_i in zip(inside, b, strict=True)) - radius**2
        )
        if not (sum_a > 0 and discriminant > 0):
            return None
        mu = (sum_b + math.sqrt(discriminant)) / sum_a
        v = [0.0] * num_tasks
        for i, a_i, b_i in zip(inside, a, b, strict=True):
            v[i] = (mu * a_i - b_i) / radius
        if any(v[i] < 0 for i in inside):
            support[min(inside, key=v.__getitem__)] = False
            if not any(support):
                return None
            continue
        outside = [
            (gradient, i)
            for i in range(num_tasks)
            if not support[i] and (gradient := lin[i] + radius * dot(gram[i], v)) < mu - tol
        ]
        if not outside:
            total = sum(v)
            return [value / total for value in v]
        support[min(outside)[1]] = True
    return None


def cagrad_weights(
    matrix: np.ndarray, c: float, rescale: int = 1, support: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`cagrad` on a symmetric float64 NumPy Gramian, unchecked (for the callback's step).

    ``support``: the tasks expected to have a positive inner weight (the previous step's); the
    result is the support found's, whatever the guess, but for rounding where the search meets a
    near-singular support. Returns the weights and this call's support (``None`` when the
    inner problem was not solved).
    """
    if matrix.shape[0] == 2:
        return _two_task_cagrad(*two_by_two(matrix), c, _RESCALE_DIVISORS[rescale](c))
    return _general_cagrad_weights(matrix, c, rescale, support)


def _general_cagrad_weights(
    matrix: np.ndarray, c: float, rescale: int = 1, support: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`cagrad_weights` for any number of tasks (two skip it: :func:`_two_task_cagrad`)."""
    num_tasks = matrix.shape[0]
    divisor = _RESCALE_DIVISORS[rescale](c)
    mean_weights = np.full(num_tasks, 1.0 / num_tasks)
    trace = matrix.trace()
    if trace <= TINY:
        return mean_weights / divisor, None
    matrix = matrix / trace
    linear = matrix @ mean_weights  # <g_i, g_0>
    radius = c * np.sqrt(max(mean_weights @ linear, 0.0))
    if radius == 0.0:  # the ball is the single point g_0
        return mean_weights / divisor, None
    inner = _inner_weights(matrix, linear, radius, support)
    inner_norm = np.sqrt(max(inner @ matrix @ inner, 0.0))
    uncancelled = inner @ np.sqrt(np.maximum(matrix.diagonal(), 0.0))
    if inner_norm > max(STATIONARY_TOL * uncancelled, NEGLIGIBLE):
        return (mean_weights + (radius / inner_norm) * inner) / divisor, inner > 0
    return (mean_weights + _closest_optimum(matrix, linear)) / divisor, inner > 0


def _closest_optimum(matrix: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """The multipliers of the Pareto-stationary case: the projection of g_0 onto the cone
    ``{d : <g_i, d> >= 0}`` is ``g_0 + sum_i lambda_i g_i`` with, by duality, ``lambda =
    argmin_{lambda >= 0} lambda^T G lambda / 2 + lambda^T G w_0``."""
    num_tasks = len(linear)
    regularized = matrix + _TIE_BREAK * np.eye(num_tasks)
    zeros = np.zeros(num_tasks)
    return active_set_qp(regularized, linear, zeros, max_iter=10 * num_tasks, tol=1e-12)


def _two_task_cagrad(
    g11: float, g12: float, _: float, g22: float, c: float, divisor: float
) -> tuple[np.ndarray, np.ndarray | None]:
    r"""Two tasks' inner problem in closed form, in Python floats (the general search's NumPy
    operations on a 2×2 matrix cost more); Pareto-stationary gradients still take
    :func:`_closest_optimum`.

    On the normalised Gramian ``[[a, b], [b, d]]`` with :math:`w = (t, 1 - t)`, the objective
    :math:`f(t) = l_2 + \Delta t + r \sqrt{q(t)}`, :math:`\Delta = l_1 - l_2`,
    :math:`q(t) = \alpha t^2 + 2 \beta t + d`, :math:`\alpha = a - 2b + d`, :math:`\beta = b - d`,
    is convex. With :math:`s = \alpha t + \beta` and :math:`D = ad - b^2 \ge 0`,
    :math:`\alpha q = s^2 + D`, so :math:`f' = \Delta + r s \sqrt{\alpha / (s^2 + D)}` increases
    within :math:`(\Delta - r \sqrt\alpha, \Delta + r \sqrt\alpha)`. If :math:`\sigma =
    r^2 \alpha - \Delta^2 = D + (c^2 - 1) \lVert g_0 \rVert^2 \alpha > 0` (computed in this
    form, :math:`D / \sigma` is exactly 1 at ``c = 1``), :math:`f' = 0` at
    :math:`s = -\Delta \sqrt{D / \sigma}` (the kink :math:`s = 0` of collinear gradients when
    :math:`D = 0`), where :math:`\sqrt q = r \sqrt{D / \sigma}`, and the minimiser is
    :math:`t = (s - \beta) / \alpha` clipped to :math:`[0, 1]` (with ``1 - t = (a - b - s) / α``
    computed apart, accurate near ``t = 1``). Else :math:`f` is monotone: :math:`t = 0` if
    :math:`\Delta > 0`, else :math:`t = 1`, also when it is constant (identical gradients), like
    the general search's first vertex.
    """
    trace = g11 + g22
    if trace <= TINY:
        return np.full(2, 0.5 / divisor), None
    a, b, d = g11 / trace, g12 / trace, g22 / trace
    first, second = (a + b) * 0.5, (b + d) * 0.5  # <g_i, g_0>
    mean_norm = (first + second) * 0.5
    radius = c * math.sqrt(max(mean_norm, 0.0))
    if radius == 0.0:
        return np.full(2, 0.5 / divisor), None
    delta = first - second
    determinant = max(a * d - b * b, 0.0)
    slack = determinant + (c * c - 1.0) * mean_norm * max(a - 2.0 * b + d, 0.0)
    t1, t2 = (0.0, 1.0) if delta > 0.0 else (1.0, 0.0)
    inner_norm = math.sqrt(d) if delta > 0.0 else math.sqrt(a)
    if slack > 0.0:
        ratio = determinant / slack
        slope = -delta * math.sqrt(ratio)
        t1, t2 = slope - b + d, a - b - slope
        if t1 <= 0.0:
            t1, t2, inner_norm = 0.0, 1.0, math.sqrt(d)
        elif t2 <= 0.0:
            t1, t2, inner_norm = 1.0, 0.0, math.sqrt(a)
        else:
            t1, t2, inner_norm = t1 / (t1 + t2), t2 / (t1 + t2), radius * math.sqrt(ratio)
    support = np.array([t1 > 0.0, t2 > 0.0])
    if inner_norm > max(STATIONARY_TOL * (t1 * math.sqrt(a) + t2 * math.sqrt(d)), NEGLIGIBLE):
        scale = radius / inner_norm
        return np.array([0.5 + scale * t1, 0.5 + scale * t2]) / divisor, support
    multipliers = _closest_optimum(np.array([[a, b], [b, d]]), np.array([first, second]))
    return (0.5 + multipliers) / divisor, support


def cagrad(gramian: Tensor, c: float = 0.5, rescale: int = 1) -> Tensor:
    r"""Weights of CAGrad: the best worst-case task improvement within a ball around the mean.

    With :math:`g_0 = \tfrac1K \sum_i g_i` and :math:`\sqrt\phi = c \lVert g_0 \rVert`, CAGrad
    solves the dual of :math:`\max_d \min_i \langle g_i, d\rangle` s.t.
    :math:`\lVert d - g_0\rVert \le \sqrt\phi` over the simplex, then rescales:

    .. math::

        w^\star = \operatorname*{arg\,min}_{w \in \Delta^K}
            \langle g_w, g_0 \rangle + \sqrt\phi\,\lVert g_w \rVert, \qquad
        d = \frac{1}{s}\Big(g_0 + \frac{\sqrt\phi}{\lVert g_w \rVert}\, g_w\Big)
          = \sum_i \frac{1/K + \sqrt\phi\, w^\star_i / \lVert g_w \rVert}{s}\, g_i,

    where :math:`g_w = \sum_i w^\star_i g_i` and everything is a function of the Gramian. The
    inner problem is solved exactly on :math:`G / \operatorname{tr} G` from its KKT conditions (a
    closed form for two tasks, an active-set search otherwise; SciPy's SLSQP only where that
    search finds no certified answer), so the weights do not change when all gradients are scaled
    by the same factor.

    Scale: LibMTL's, with :math:`s = 1 + c^2` (``rescale=1``, its default), :math:`s = 1 + c`
    (``rescale=2``) or :math:`s = 1` (``rescale=0``; the paper's update). torchjd's
    ``CAGradWeighting`` returns the ``rescale=0`` weights and zero weights when
    :math:`\lVert g_w\rVert` is small; LibMTL adds ``1e-8`` inside its square roots, which matters
    only for Gramians of order ``1e-8`` or below.

    Degenerate input: if :math:`g_0 = 0` (a zero Gramian, two opposite gradients) or ``c = 0`` the
    update is :math:`g_0 / s`, i.e. weights :math:`1 / (K s)`. If :math:`g_w = 0` is optimal (the
    gradients are Pareto stationary), every :math:`d` of the ball with
    :math:`\langle g_i, d\rangle \ge 0` is optimal and the one closest to :math:`g_0` is returned:
    the projection of :math:`g_0` onto that cone, :math:`g_0 + \sum_i \lambda_i g_i` with
    :math:`\lambda \succeq 0` from a small QP (so weights stay non-negative). ``K = 1`` gives
    :math:`(1 + c) / s`.

    Paper: Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
    https://arxiv.org/abs/2110.14048.

    Args:
        gramian: the [K, K] Gramian :math:`G_{ij} = \langle g_i, g_j \rangle` of the task gradients.
        c: radius of the ball around :math:`g_0`, relative to :math:`\lVert g_0 \rVert`; ``c >= 0``.
        rescale: LibMTL's divisor choice: 0 (none), 1 (:math:`1 + c^2`) or 2 (:math:`1 + c`).

    Returns:
        Weights of shape [K] (detached) with the Gramian's dtype and device.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.cagrad import cagrad
        >>> jacobian = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> cagrad(jacobian @ jacobian.T, c=0.5)
        tensor([0.6000, 0.6000])
    """
    if not 0 <= c < math.inf:
        raise ValueError(f"c must be a finite number >= 0 (LibMTL's default is 0.5), got {c}.")
    if rescale not in _RESCALE_DIVISORS:
        raise ValueError(f"rescale must be 0, 1 or 2 (LibMTL's default is 1), got {rescale!r}.")
    weights, _ = cagrad_weights(validated_gramian(gramian).numpy(), c, rescale)
    return torch.from_numpy(weights).to(dtype=gramian.dtype, device=gramian.device)
