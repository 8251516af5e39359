"""Helpers shared by the Gramian-based weightings: input checks and a small exact QP solver.

Gramians are K×K with K the number of tasks (rarely more than a few dozen), so the methods move
them to the CPU in float64 once: solver loops on tiny tensors are faster there than on an
accelerator, and float64 keeps rank decisions and active sets stable. MPS has no float64 at all.
"""

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
    matrix = gramian.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(matrix).all():
        raise ValueError(
            "The Gramian has NaN or infinite entries: some task gradient is not finite. "
            "Check the task losses, or skip the step."
        )
    scale = matrix.abs().max()
    if (matrix.diagonal() < -SYMMETRY_RTOL * scale).any():
        raise ValueError(
            f"The Gramian has a negative diagonal entry {matrix.diagonal().min().item():.3g}, "
            "so it is not a Gramian: G[i, i] = <g_i, g_i> is a squared norm."
        )
    asymmetry = (matrix - matrix.T).abs().max()
    if asymmetry > SYMMETRY_RTOL * scale:
        raise ValueError(
            f"The Gramian is not symmetric (max |G - G.T| = {asymmetry.item():.3g}, "
            f"max |G| = {scale.item():.3g}). Pass G = J @ J.T, or symmetrise it with "
            "(G + G.T) / 2."
        )
    return (matrix + matrix.T) / 2


def solve_lower_bounded_qp(
    hessian: Tensor, linear: Tensor, lower: Tensor, max_iter: int, tol: float
) -> Tensor:
    r"""Solve :math:`\min_x \tfrac12 x^\top H x + c^\top x` subject to :math:`x \succeq l`.

    A primal active-set method (Lawson & Hanson's NNLS algorithm, written for a quadratic
    objective): start with every bound active, free the bound with the most negative multiplier,
    solve the equality-constrained problem on the free set, and step back to the nearest bound when
    that solution is infeasible. It terminates exactly in finitely many steps (usually ≤ 2K).

    Args:
        hessian: symmetric positive definite :math:`H` of shape [K, K].
        linear: :math:`c` of shape [K].
        lower: :math:`l` of shape [K].
        max_iter: most bounds freed; the feasible iterate reached is returned when it is spent.
        tol: a bound stays active while its multiplier :math:`(Hx + c)_i \geq -\text{tol}`.

    Returns:
        The minimiser :math:`x` of shape [K], feasible even if ``max_iter`` ran out.
    """
    solution = lower.clone()
    free = torch.zeros_like(lower, dtype=torch.bool)
    for _ in range(max_iter):
        multipliers = hessian @ solution + linear
        releasable = ~free & (multipliers < -tol)
        if not releasable.any():
            break
        previous_free = free.clone()
        free[torch.where(releasable, multipliers, torch.inf).argmin()] = True
        while True:
            # Every pass of this loop either accepts a feasible point or fixes one more bound.
            trial = lower.clone()
            rhs = -(linear + hessian[:, ~free] @ lower[~free])[free]
            trial[free] = torch.linalg.solve(hessian[free][:, free], rhs)
            if (trial[free] > lower[free]).all():
                solution = trial
                break
            blocked = free & (trial <= lower)
            # For blocked bounds solution >= lower >= trial; the clamp turns 0 / 0 into 0.
            distances = (solution - trial).clamp(min=torch.finfo(solution.dtype).tiny)
            ratios = torch.where(blocked, (solution - lower) / distances, torch.inf)
            step = ratios.min().clamp(0.0, 1.0)
            solution = solution + step * (trial - solution)
            hits = free & (solution <= lower)
            hits[ratios.argmin()] = True
            solution[hits] = lower[hits]
            free &= ~hits
            if not free.any():
                break
        if torch.equal(free, previous_free):
            break  # the freed bound was blocked at once: optimal to rounding
    return solution
