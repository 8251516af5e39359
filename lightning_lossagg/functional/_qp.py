"""Helpers shared by the Gramian-based weightings: input checks and a small exact QP solver.

Gramians are K×K with K the number of tasks (rarely more than a few dozen), so the methods move
them to the CPU in float64 once: solver loops on tiny tensors are faster there than on an
accelerator, and float64 keeps rank decisions and active sets stable. MPS has no float64 at all.
The loops run at every training step: in Python floats up to ``PYTHON_TASKS_UP_TO`` tasks (see
:mod:`lightning_lossagg.functional._small`), else in NumPy, whose operations on K×K arrays cost a
fraction of torch's.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_lossagg.functional._small import PYTHON_TASKS_UP_TO, Matrix, cholesky, cholesky_solve

SYMMETRY_RTOL = 1e-5
# The smallest positive normal float64 (a Gramian whose trace is at most this counts as zero).
TINY = float(np.finfo(np.float64).tiny)


def validated_gramian(gramian: Tensor) -> Tensor:
    """Check that ``gramian`` looks like a Gramian and return a symmetric float64 CPU copy (a
    diagonal entry rounded below 0, within the tolerance, is a zero gradient's: 0 in the copy).

    Raises:
        ValueError: if ``gramian`` is not a non-empty square matrix, has non-finite entries, a
            negative diagonal, or an entry ``G[i, j]`` that is not symmetric, or exceeds
            ``sqrt(G[i, i] G[j, j])`` (Cauchy-Schwarz), to a relative tolerance of
            ``SYMMETRY_RTOL`` of that pair's scale.
    """
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(
            f"Expected a square [K, K] Gramian with K >= 1, got shape {tuple(gramian.shape)}. "
            "Pass G = J @ J.T for the [K, P] matrix J of per-task gradients."
        )
    if not gramian.is_floating_point():
        raise TypeError(
            f"Expected a floating-point Gramian, got {gramian.dtype}: the weights are returned "
            "in the Gramian's dtype. Pass e.g. (J @ J.T).double()."
        )
    # The checks run in NumPy on the float64 copy: a NumPy operation on a K×K matrix costs a
    # fraction of a torch one, and they run at every training step.
    matrix = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(matrix).all():
        raise ValueError(
            "The Gramian has NaN or infinite entries: some task gradient is not finite. "
            "Check the task losses, or skip the step."
        )
    scale = np.abs(matrix).max()
    diagonal = matrix.diagonal()
    if (lowest := diagonal.min()) < -SYMMETRY_RTOL * scale:
        raise ValueError(
            f"The Gramian has a negative diagonal entry {lowest:.3g}, "
            "so it is not a Gramian: G[i, i] = <g_i, g_i> is a squared norm."
        )
    if lowest < 0.0:  # rounding around a zero gradient's squared norm: it is 0
        matrix = matrix.copy()  # may share the caller's memory
        np.fill_diagonal(matrix, np.maximum(diagonal, 0.0))
        diagonal = matrix.diagonal()
    # Each entry against the scale of its own pair, ||g_i|| ||g_j||, not the largest entry's.
    norms = np.sqrt(np.maximum(diagonal, 0.0))
    pair_scale = np.outer(norms, norms)
    allowed = SYMMETRY_RTOL * (pair_scale + 1e-3 * scale)
    asymmetry = np.abs(matrix - matrix.T)
    if (at := _worst_violation(asymmetry, allowed)) is not None:
        i, j = at
        raise ValueError(
            f"The Gramian is not symmetric (|G[{i}, {j}] - G[{j}, {i}]| = {asymmetry[i, j]:.3g}, "
            f"against sqrt(G[{i}, {i}] G[{j}, {j}]) = {pair_scale[i, j]:.3g}). Pass G = J @ J.T, "
            "or symmetrise it with (G + G.T) / 2."
        )
    if (at := _worst_violation(np.abs(matrix) - pair_scale, allowed)) is not None:
        i, j = at
        raise ValueError(
            f"|G[{i}, {j}]| = {abs(matrix[i, j]):.3g} exceeds sqrt(G[{i}, {i}] G[{j}, {j}]) = "
            f"{pair_scale[i, j]:.3g}, so it is not a Gramian (Cauchy-Schwarz: |<g_i, g_j>| <= "
            "||g_i|| ||g_j||). Pass G = J @ J.T for the [K, P] matrix J of per-task gradients."
        )
    return torch.from_numpy((matrix + matrix.T) / 2)


def _worst_violation(excess: np.ndarray, allowed: np.ndarray) -> tuple[int, int] | None:
    """The entry where ``excess`` exceeds ``allowed`` the most, or None where it never does."""
    if not (excess > allowed).any():
        return None
    i, j = np.unravel_index(np.argmax(excess - allowed), excess.shape)
    return int(i), int(j)


def symmetric_matrix(gramian: Tensor) -> np.ndarray:
    """A float64 CPU Gramian that passed a training step's checks (finite) as a symmetric NumPy
    matrix: what the callbacks hand their method's unchecked solver."""
    matrix = gramian.numpy()
    return (matrix + matrix.T) / 2


def validated_preferences(pref_vector: Tensor | None, num_tasks: int, default: float) -> Tensor:
    """``pref_vector`` as a float64 CPU copy, or ``default`` for every task when it is ``None``.

    Raises:
        ValueError: if ``pref_vector`` is not a finite vector with one weight >= 0 per task, at
            least one > 0.
    """
    if pref_vector is None:
        return torch.full((num_tasks,), default, dtype=torch.float64)
    if pref_vector.shape != (num_tasks,) or not torch.isfinite(pref_vector).all():
        raise ValueError(
            f"pref_vector must be a finite vector of shape ({num_tasks},), one weight per task, "
            f"got {pref_vector.tolist()} of shape {tuple(pref_vector.shape)}."
        )
    if (pref_vector < 0).any() or pref_vector.sum() <= 0:
        raise ValueError(
            "pref_vector holds a preference per task: every entry must be >= 0 and at least one "
            f"> 0, got {pref_vector.tolist()}."
        )
    return pref_vector.detach().to(device="cpu", dtype=torch.float64)


def active_set_qp(
    hessian: Matrix | np.ndarray,
    linear: Sequence[float] | np.ndarray,
    lower: Sequence[float] | np.ndarray,
    max_iter: int,
    tol: float,
    guess: Sequence[bool] | np.ndarray | None = None,
) -> np.ndarray:
    r"""Solve :math:`\min_x \tfrac12 x^\top H x + c^\top x` subject to :math:`x \succeq l`.

    A primal active-set method (Lawson & Hanson's NNLS algorithm, written for a quadratic
    objective): start with every bound active, free the bound with the most negative multiplier,
    solve the equality-constrained problem on the free set, and step back to the nearest bound when
    that solution is infeasible. It terminates exactly in finitely many steps (usually ≤ 2K).
    Small problems run in Python floats, others in NumPy (:func:`active_set_qps`).

    Args:
        hessian: symmetric positive definite :math:`H` of shape [K, K], float64 (arrays or
            nested lists: a training step's small problems never need NumPy).
        linear: :math:`c` of shape [K].
        lower: :math:`l` of shape [K].
        max_iter: most bounds freed; the feasible iterate reached is returned when it is spent.
        tol: a bound stays active while its multiplier :math:`(Hx + c)_i \geq -\text{tol}`.
        guess: the variables expected above their bounds (at a training step, those of the
            previous step's solution): when the solution on that free set is feasible, the method
            starts there and usually only checks the multipliers; otherwise it starts from the
            bounds. The result is the same either way, the exact minimiser.

    Returns:
        The minimiser :math:`x` of shape [K], feasible even if ``max_iter`` ran out.
    """
    guesses = None if guess is None else [guess]
    return active_set_qps(hessian, linear, [lower], max_iter, tol, guesses)[0]


def active_set_qps(
    hessian: Matrix | np.ndarray,
    linear: Sequence[float] | np.ndarray,
    lowers: Sequence[Sequence[float] | np.ndarray] | np.ndarray,
    max_iter: int,
    tol: float,
    guesses: Sequence[Sequence[bool] | np.ndarray] | np.ndarray | None = None,
) -> np.ndarray:
    r"""Row ``i``: the minimiser of :math:`\tfrac12 x^\top H x + c^\top x` subject to
    :math:`x \succeq` ``lowers[i]``, for QPs that share their Hessian (UPGrad's projections).
    Up to ``PYTHON_TASKS_UP_TO`` variables the QPs are solved in Python floats, row by row
    (:func:`_active_set_in_floats`), unless a free set's Hessian is near-singular; others in
    NumPy, all the rows together (:func:`_active_sets_in_numpy`). See
    :func:`active_set_qp` for ``guesses[i]``."""
    if len(linear) <= PYTHON_TASKS_UP_TO:
        factors: dict[tuple[bool, ...], list[list[float]] | None] = {}
        hessian_rows, linear_values = _listed(hessian), _listed(linear)
        rows = [
            _active_set_in_floats(hessian_rows, linear_values, lower, guess, max_iter, tol, factors)
            for lower, guess in zip(
                _listed(lowers),
                [None] * len(lowers) if guesses is None else _listed(guesses),
                strict=True,
            )
        ]
        if all(row is not None for row in rows):
            return np.array(rows, dtype=float)
    return _active_sets_in_numpy(
        np.asarray(hessian, dtype=float),
        np.asarray(linear, dtype=float),
        np.asarray(lowers, dtype=float),
        max_iter,
        tol,
        None if guesses is None else np.asarray(guesses, dtype=bool),
    )


def _listed(values: Any) -> list[Any]:
    """``values`` (an array, or a list of arrays or of Python numbers) as Python lists."""
    if isinstance(values, np.ndarray):
        return values.tolist()
    return [value.tolist() if isinstance(value, np.ndarray) else value for value in values]


def _active_sets_in_numpy(
    hessian: np.ndarray,
    linear: np.ndarray,
    lowers: np.ndarray,
    max_iter: int,
    tol: float,
    guesses: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`active_set_qps` in NumPy: every iteration of the active-set method runs on all
    the rows still working, with one batched solve."""
    num_rows, size = lowers.shape
    solution = lowers.copy()
    free = np.zeros((num_rows, size), dtype=bool)
    if guesses is not None:
        trial = _solve_on_free_sets(hessian, linear, lowers, guesses)
        start = guesses.any(1) & np.all(~guesses | (trial > lowers), axis=1)
        solution[start], free[start] = trial[start], guesses[start]
    done = np.zeros(num_rows, dtype=bool)
    for _ in range(max_iter):
        multipliers = solution @ hessian + linear  # the Hessian is symmetric
        releasable = ~free & (multipliers < -tol) & ~done[:, None]
        working = releasable.any(1)
        if not working.any():
            break
        previous_free = free.copy()
        rows = np.flatnonzero(working)
        free[rows, np.where(releasable, multipliers, np.inf)[rows].argmin(1)] = True
        pending = working.copy()
        while pending.any():
            # Every pass accepts a feasible point or fixes one more bound, in each pending row.
            trial = _solve_on_free_sets(hessian, linear, lowers, free)
            accepted = pending & np.all(~free | (trial > lowers), axis=1)
            solution[accepted] = trial[accepted]
            pending &= ~accepted
            if not pending.any():
                break
            blocked = free & (trial <= lowers) & pending[:, None]
            # For blocked bounds solution >= lower >= trial; the clamp turns 0 / 0 into 0.
            distances = np.maximum(solution - trial, TINY)
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                ratios = np.where(blocked, (solution - lowers) / distances, np.inf)
            steps = np.clip(ratios.min(1), 0.0, 1.0)[:, None]
            solution = np.where(pending[:, None], solution + steps * (trial - solution), solution)
            hits = free & (solution <= lowers) & pending[:, None]
            rows = np.flatnonzero(pending)
            hits[rows, ratios[rows].argmin(1)] = True
            solution = np.where(hits, lowers, solution)
            free &= ~hits
            pending &= free.any(1)
        # A row whose freed bound was blocked at once is optimal to rounding.
        done |= working & np.all(free == previous_free, axis=1)
    return solution


def _active_set_in_floats(
    hessian: Matrix,
    linear: Sequence[float],
    lower: Sequence[float],
    guess: Sequence[bool] | None,
    max_iter: int,
    tol: float,
    factors: dict[tuple[bool, ...], list[list[float]] | None],
) -> list[float] | None:
    """One row of :func:`_active_sets_in_numpy`, step for step, in Python floats (``factors``:
    the free sets' Cholesky factors, shared by the rows of one call). ``None`` when a free set's
    Hessian is near-singular (:func:`cholesky`): NumPy's LU then solves the problem."""
    size = len(lower)
    solution, free = list(lower), [False] * size
    if guess is not None and any(guess):
        trial = _solve_on_free_set(hessian, linear, lower, guess, factors)
        if trial is None:
            return None
        if all(trial[i] > lower[i] for i in range(size) if guess[i]):
            solution, free = trial, list(guess)
    for _ in range(max_iter):
        nonzero = [(j, value) for j, value in enumerate(solution) if value != 0.0]
        releasable = [
            (multiplier, i)
            for i in range(size)
            if not free[i] and (multiplier := _sparse_dot(hessian[i], nonzero) + linear[i]) < -tol
        ]
        if not releasable:
            break
        previous_free = list(free)
        free[min(releasable)[1]] = True
        while True:
            # Every pass accepts a feasible point or fixes one more bound.
            trial = _solve_on_free_set(hessian, linear, lower, free, factors)
            if trial is None:
                return None
            if all(trial[i] > lower[i] for i in range(size) if free[i]):
                solution = trial
                break
            # For blocked bounds solution >= lower >= trial; the floor turns 0 / 0 into 0.
            ratios = [
                (solution[i] - lower[i]) / max(solution[i] - trial[i], TINY)
                if free[i] and trial[i] <= lower[i]
                else math.inf
                for i in range(size)
            ]
            step = min(max(min(ratios), 0.0), 1.0)
            solution = [s + step * (t - s) for s, t in zip(solution, trial, strict=True)]
            nearest = ratios.index(min(ratios))
            for i in range(size):
                if free[i] and (solution[i] <= lower[i] or i == nearest):
                    solution[i], free[i] = lower[i], False
            if not any(free):
                break
        if free == previous_free:  # the freed bound was blocked at once: optimal to rounding
            break
    return solution


def _solve_on_free_set(
    hessian: Matrix,
    linear: Sequence[float],
    lower: Sequence[float],
    free: Sequence[bool],
    factors: dict[tuple[bool, ...], list[list[float]] | None],
) -> list[float] | None:
    """The minimiser with the variables outside ``free`` at ``lower`` (the others unbounded):
    :math:`H_{FF} x_F = -(c_F + H_{FB} l_B)`, by a Cholesky factor of :math:`H_{FF}` kept in
    ``factors``; ``None`` when it is near-singular."""
    inside = [i for i, is_free in enumerate(free) if is_free]
    key = tuple(free)
    if key not in factors:
        factors[key] = cholesky([[hessian[i][j] for j in inside] for i in inside])
    factor = factors[key]
    if factor is None:
        return None
    bounds = [(j, value) for j, value in enumerate(lower) if value != 0.0 and not free[j]]
    rhs = [-linear[i] - _sparse_dot(hessian[i], bounds) for i in inside]
    solution = list(lower)
    for i, value in zip(inside, cholesky_solve(factor, rhs), strict=True):
        solution[i] = value
    return solution


def _sparse_dot(row: Sequence[float], entries: list[tuple[int, float]]) -> float:
    """``<row, x>`` for the ``(index, value)`` entries where ``x`` is not zero."""
    return sum(row[j] * value for j, value in entries)


def _solve_on_free_sets(
    hessian: np.ndarray, linear: np.ndarray, lowers: np.ndarray, free: np.ndarray
) -> np.ndarray:
    """Row ``i``: the minimiser with the variables outside ``free[i]`` at ``lowers[i]`` (the
    others unbounded), from one batched solve: the fixed variables' rows and columns of the
    Hessian are replaced by the identity's."""
    size = hessian.shape[0]
    matrices = np.where(free[:, :, None] & free[:, None, :], hessian, np.eye(size))
    fixed = np.where(free, 0.0, lowers)
    rhs = np.where(free, -(linear + fixed @ hessian), lowers)
    return np.linalg.solve(matrices, rhs[:, :, None])[:, :, 0]


def exactly_scaled(
    g11: float, g12: float, g22: float, even: bool = False
) -> tuple[float, float, float]:
    """A 2×2 Gramian's entries divided by the power of two (of four with ``even``, so that square
    roots scale exactly too) that brings the largest near 1: exact, and no product of two of them
    over- or underflows."""
    exponent = math.frexp(max(abs(g11), abs(g12), abs(g22)))[1]
    if even:
        exponent &= ~1
    return math.ldexp(g11, -exponent), math.ldexp(g12, -exponent), math.ldexp(g22, -exponent)


def symmetric_eigen(a: float, b: float, c: float) -> tuple[float, float, float, float]:
    """Of ``[[a, b], [b, c]]``: the mean ``m = (a + c) / 2`` of its eigenvalues ``m ± r``, the half
    gap ``r = hypot((a - c) / 2, b)``, and an eigenvector ``(x, y)`` of ``m + r`` computed without
    cancellation: ``(h + r, b)`` for ``h = (a - c) / 2 >= 0``, else ``(b, r - h)``."""
    mean, half_gap = (a + c) / 2, (a - c) / 2
    radius = math.hypot(half_gap, b)
    x, y = (half_gap + radius, b) if half_gap >= 0 else (b, radius - half_gap)
    return mean, radius, x, y
