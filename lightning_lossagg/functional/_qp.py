"""Helpers shared by the Gramian-based weightings: input checks and a small exact QP solver.

Gramians are K×K with K the number of tasks (rarely more than a few dozen), so the methods move
them to the CPU in float64 once: solver loops on tiny tensors are faster there than on an
accelerator, and float64 keeps rank decisions and active sets stable. MPS has no float64 at all.
The loops themselves run in NumPy, whose operations on K×K arrays cost a fraction of torch's:
they run at every training step.
"""

import numpy as np
import torch
from torch import Tensor

SYMMETRY_RTOL = 1e-5


def validated_gramian(gramian: Tensor) -> Tensor:
    """Check that ``gramian`` looks like a Gramian and return a symmetric float64 CPU copy.

    Raises:
        ValueError: if ``gramian`` is not a non-empty square matrix, has non-finite entries, a
            negative diagonal, or is not symmetric to a relative tolerance of ``SYMMETRY_RTOL``.
    """
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
        raise ValueError(
            f"Expected a square [K, K] Gramian with K >= 1, got shape {tuple(gramian.shape)}. "
            "Pass G = J @ J.T for the [K, P] matrix J of per-task gradients."
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
    if (diagonal < -SYMMETRY_RTOL * scale).any():
        raise ValueError(
            f"The Gramian has a negative diagonal entry {diagonal.min():.3g}, "
            "so it is not a Gramian: G[i, i] = <g_i, g_i> is a squared norm."
        )
    asymmetry = np.abs(matrix - matrix.T).max()
    if asymmetry > SYMMETRY_RTOL * scale:
        raise ValueError(
            f"The Gramian is not symmetric (max |G - G.T| = {asymmetry:.3g}, "
            f"max |G| = {scale:.3g}). Pass G = J @ J.T, or symmetrise it with "
            "(G + G.T) / 2."
        )
    return torch.from_numpy((matrix + matrix.T) / 2)


def validated_preferences(pref_vector: Tensor | None, num_tasks: int, default: float) -> Tensor:
    """``pref_vector`` as a float64 CPU copy, or ``default`` for every task when it is ``None``.

    Raises:
        ValueError: if ``pref_vector`` is not a finite vector with one weight per task.
    """
    if pref_vector is None:
        return torch.full((num_tasks,), default, dtype=torch.float64)
    if pref_vector.shape != (num_tasks,) or not torch.isfinite(pref_vector).all():
        raise ValueError(
            f"pref_vector must be a finite vector of shape ({num_tasks},), one weight per task, "
            f"got shape {tuple(pref_vector.shape)}."
        )
    return pref_vector.detach().to(device="cpu", dtype=torch.float64)


def solve_lower_bounded_qp(
    hessian: Tensor, linear: Tensor, lower: Tensor, max_iter: int, tol: float
) -> Tensor:
    r"""Solve :math:`\min_x \tfrac12 x^\top H x + c^\top x` subject to :math:`x \succeq l`.

    A primal active-set method (Lawson & Hanson's NNLS algorithm, written for a quadratic
    objective): start with every bound active, free the bound with the most negative multiplier,
    solve the equality-constrained problem on the free set, and step back to the nearest bound when
    that solution is infeasible. It terminates exactly in finitely many steps (usually ≤ 2K).
    The loop runs in NumPy: on K×K matrices a NumPy operation costs a fraction of a torch one.

    Args:
        hessian: symmetric positive definite :math:`H` of shape [K, K].
        linear: :math:`c` of shape [K].
        lower: :math:`l` of shape [K].
        max_iter: most bounds freed; the feasible iterate reached is returned when it is spent.
        tol: a bound stays active while its multiplier :math:`(Hx + c)_i \geq -\text{tol}`.

    Returns:
        The minimiser :math:`x` of shape [K] (float64, CPU), feasible even if ``max_iter`` ran out.
    """
    solution = active_set_qp(_as_numpy(hessian), _as_numpy(linear), _as_numpy(lower), max_iter, tol)
    return torch.from_numpy(solution)


def _as_numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to(device="cpu", dtype=torch.float64).numpy()


def active_set_qp(
    hessian: np.ndarray,
    linear: np.ndarray,
    lower: np.ndarray,
    max_iter: int,
    tol: float,
    guess: np.ndarray | None = None,
) -> np.ndarray:
    """:func:`solve_lower_bounded_qp` on float64 NumPy arrays.

    ``guess``: the variables expected above their bounds (at a training step, those of the
    previous step's solution): when the solution on that free set is feasible, the method starts
    there and usually only checks the multipliers; otherwise it starts from the bounds. The
    result is the same either way, the exact minimiser.
    """
    solution = lower.copy()
    free = np.zeros(len(lower), dtype=bool)
    if guess is not None and guess.any():
        trial = _solve_on_free_set(hessian, linear, lower, guess)
        if (trial[guess] > lower[guess]).all():
            solution, free = trial, guess.copy()
    tiny = np.finfo(np.float64).tiny
    for _ in range(max_iter):
        multipliers = hessian @ solution + linear
        releasable = ~free & (multipliers < -tol)
        if not releasable.any():
            break
        previous_free = free.copy()
        free[np.where(releasable, multipliers, np.inf).argmin()] = True
        while True:
            # Every pass of this loop either accepts a feasible point or fixes one more bound.
            trial = _solve_on_free_set(hessian, linear, lower, free)
            if (trial[free] > lower[free]).all():
                solution = trial
                break
            blocked = free & (trial <= lower)
            # For blocked bounds solution >= lower >= trial; the clamp turns 0 / 0 into 0.
            distances = np.maximum(solution - trial, tiny)
            ratios = np.full(len(lower), np.inf)
            with np.errstate(over="ignore"):  # a huge ratio is as good as inf
                ratios[blocked] = (solution - lower)[blocked] / distances[blocked]
            step = min(max(ratios.min(), 0.0), 1.0)
            solution = solution + step * (trial - solution)
            hits = free & (solution <= lower)
            hits[ratios.argmin()] = True
            solution[hits] = lower[hits]
            free &= ~hits
            if not free.any():
                break
        if np.array_equal(free, previous_free):
            break  # the freed bound was blocked at once: optimal to rounding
    return solution


def active_set_qps(
    hessian: np.ndarray,
    linear: np.ndarray,
    lowers: np.ndarray,
    max_iter: int,
    tol: float,
    guesses: np.ndarray,
) -> np.ndarray:
    """Row ``i``: :func:`active_set_qp` with ``lowers[i]`` and ``guesses[i]``, for QPs that share
    their Hessian (UPGrad's projections). The solutions on the guessed free sets come from one
    batched solve (the fixed variables' rows and columns replaced by the identity); a row whose
    solution there is feasible and has no negative multiplier is the exact minimiser, and only
    the other rows run the active-set method."""
    size = lowers.shape[1]
    free = guesses.astype(bool)
    matrices = np.where(free[:, :, None] & free[:, None, :], hessian, np.eye(size))
    fixed_lowers = np.where(free, 0.0, lowers)
    rhs = np.where(free, -(linear + fixed_lowers @ hessian), lowers)
    trial = np.linalg.solve(matrices, rhs[:, :, None])[:, :, 0]
    multipliers = trial @ hessian + linear  # the Hessian is symmetric
    optimal = np.all(np.where(free, trial > lowers, multipliers >= -tol), axis=1)
    for row in np.flatnonzero(~optimal):
        trial[row] = active_set_qp(hessian, linear, lowers[row], max_iter, tol, free[row])
    return trial


def _solve_on_free_set(
    hessian: np.ndarray, linear: np.ndarray, lower: np.ndarray, free: np.ndarray
) -> np.ndarray:
    """The minimiser with the variables outside ``free`` at their bounds (the others unbounded)."""
    trial = lower.copy()
    rhs = -(linear + hessian[:, ~free] @ lower[~free])[free]
    trial[free] = np.linalg.solve(hessian[np.ix_(free, free)], rhs)
    return trial
