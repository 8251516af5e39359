"""MGDA against torchjd's Frank-Wolfe, an exact QP (quadprog) and the two-task closed form."""

import numpy as np
import pytest
import torch
from qpsolvers import solve_qp
from torch import Tensor
from torchjd.aggregation import MGDAWeighting

from lightning_lossagg.functional.mgda import mgda
from tests.functional._jacobians import (
    as_params,
    assert_same_update,
    degenerate_jacobians,
    random_jacobians,
)

ALL_CASES = as_params(random_jacobians() + degenerate_jacobians())
# With a zero Gramian every point of the simplex is optimal (test_degenerate_results pins one).
NONZERO_CASES = as_params(
    [
        (case_id, jacobian)
        for case_id, jacobian in random_jacobians() + degenerate_jacobians()
        if jacobian.any()
    ]
)


def min_norm_weights_by_quadprog(gramian: Tensor) -> Tensor:
    """The min-norm point of the simplex from an independent QP solver."""
    num_tasks = gramian.shape[0]
    normalized = (gramian / gramian.trace()).numpy() + 1e-13 * np.eye(num_tasks)
    solution = solve_qp(
        normalized,
        np.zeros(num_tasks),
        A=np.ones((1, num_tasks)),
        b=np.ones(1),
        lb=np.zeros(num_tasks),
        solver="quadprog",
    )
    return torch.from_numpy(solution)


@pytest.mark.parametrize("jacobian", NONZERO_CASES)
def test_update_matches_exact_qp(jacobian: Tensor) -> None:
    gramian = jacobian @ jacobian.T
    weights = mgda(gramian)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=weights.dtype))
    assert (weights >= 0).all()
    reference = min_norm_weights_by_quadprog(gramian)
    assert_same_update(weights, reference, jacobian, tol=1e-6)


@pytest.mark.parametrize("jacobian", ALL_CASES)
def test_update_agrees_with_torchjd(jacobian: Tensor) -> None:
    """torchjd's Frank-Wolfe stops early (epsilon=1e-3), so its update is a little longer than the
    exact min-norm point and a little off in direction; both are on the simplex (same scale)."""
    gramian = jacobian @ jacobian.T
    update = mgda(gramian) @ jacobian
    reference = MGDAWeighting()(gramian) @ jacobian
    largest_gradient = jacobian.norm(dim=1).max()
    assert update.norm() <= reference.norm() + 1e-9 * largest_gradient
    if update.norm() <= 1e-9 * largest_gradient:  # Pareto stationary: FW only gets close to 0
        assert reference.norm() <= 1e-3 * largest_gradient
    else:
        cosine = update @ reference / (update.norm() * reference.norm())
        assert cosine >= 0.99
        assert update.norm() >= 0.95 * reference.norm()


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ([1.0, 0.0], [0.0, 2.0]),
        ([3.0, 1.0], [-1.0, 2.0]),
        ([1.0, 0.0], [-4.0, 0.5]),
        ([1.0, 0.0], [2.0, 0.1]),  # the first gradient is the min-norm point: w = [1, 0]
        ([1.0, 1.0], [1.0, 1.0]),
    ],
)
def test_two_tasks_closed_form(first: list[float], second: list[float]) -> None:
    """Sener & Koltun, Algorithm 1: for two gradients the min-norm weight of g_1 is
    clip(<g_2 - g_1, g_2> / ||g_1 - g_2||^2, 0, 1); identical gradients get equal weights."""
    g1 = torch.tensor(first, dtype=torch.float64)
    g2 = torch.tensor(second, dtype=torch.float64)
    difference = (g1 - g2) @ (g1 - g2)
    gamma = 0.5 if difference == 0 else float(((g2 - g1) @ g2 / difference).clamp(0.0, 1.0))
    jacobian = torch.stack([g1, g2])
    torch.testing.assert_close(
        mgda(jacobian @ jacobian.T),
        torch.tensor([gamma, 1.0 - gamma], dtype=torch.float64),
        rtol=0.0,
        atol=1e-8,
    )


@pytest.mark.parametrize(
    ("case_id", "expected"),
    [
        ("single-task", [1.0]),
        ("zero", [1 / 3, 1 / 3, 1 / 3]),
        ("zero-pair", [0.5, 0.5]),
        ("identical", [1 / 3, 1 / 3, 1 / 3]),
        ("opposite", [0.5, 0.5]),
        ("opposite-unequal", [0.75, 0.25]),  # 0.75 g - 0.25 * 3 g = 0
        ("one-zero-row", [0.0, 1.0, 0.0]),  # the zero gradient is the min-norm point
    ],
)
def test_degenerate_results(case_id: str, expected: list[float]) -> None:
    jacobian = dict(degenerate_jacobians())[case_id]
    weights = mgda(jacobian @ jacobian.T)
    torch.testing.assert_close(
        weights, torch.tensor(expected, dtype=torch.float64), atol=1e-7, rtol=0
    )


def test_rejects_bad_solver_arguments() -> None:
    gramian = torch.eye(2)
    with pytest.raises(ValueError, match="max_iter"):
        mgda(gramian, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        mgda(gramian, tol=-1.0)
    with pytest.raises(ValueError, match="tol"):  # would free no bound: NaN weights
        mgda(gramian, tol=float("inf"))


@pytest.mark.parametrize("jacobian", NONZERO_CASES)
def test_a_guessed_support_changes_nothing_but_the_start(jacobian: Tensor) -> None:
    # The callback starts each step's solve from the previous step's positive weights; right,
    # wrong, empty or full, the guess must lead to the same exact minimiser.
    from lightning_lossagg.functional.mgda import min_norm_weights

    matrix = (jacobian @ jacobian.T).numpy()
    cold = min_norm_weights(matrix)
    num_tasks = len(cold)
    rng = np.random.default_rng(0)
    guesses = [cold > 0, ~(cold > 0), np.ones(num_tasks, bool), rng.random(num_tasks) < 0.5]
    for guess in guesses:
        np.testing.assert_allclose(min_norm_weights(matrix, guess=guess), cold, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_a_float32_gramian_of_dependent_gradients_gives_the_min_norm_point(seed: int) -> None:
    # 5 float32 gradients in a 2-D span: their float32 Gramian is indefinite at rounding level.
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(2, 2000, generator=generator, dtype=torch.float64)
    jacobian = (torch.randn(5, 2, generator=generator, dtype=torch.float64) @ basis).float()
    gramian = jacobian @ jacobian.T
    exact = jacobian.double() @ jacobian.double().T  # the same rows' Gramian in float64
    assert torch.linalg.eigvalsh(gramian.double()).min() < -1e-9 * gramian.trace()
    weights = mgda(gramian).double()
    reference = min_norm_weights_by_quadprog(exact)
    trace = float(exact.trace())
    assert float(weights @ exact @ weights) <= float(reference @ exact @ reference) + 1e-6 * trace


# Two tasks where either gradient may be the min-norm point of the segment [g_1, g_2]. Reference:
# Sener & Koltun's Algorithm 1, gamma = clip(<g_2 - g_1, g_2> / ||g_1 - g_2||^2, 0, 1), and a
# brute-force minimum of ||t g_1 + (1 - t) g_2|| over a fine grid of t in [0, 1].
@pytest.mark.parametrize(
    ("first", "second"),
    [
        ([2.0, 0.1], [1.0, 0.0]),  # g_2 is the min-norm point: w = [0, 1]
        ([3.0, 0.0], [1.0, 0.5]),
        ([-4.0, 0.5], [1.0, 0.0]),  # interior, for contrast
    ],
)
def test_two_tasks_min_norm_point_at_either_vertex(first: list[float], second: list[float]) -> None:
    g1, g2 = np.array(first), np.array(second)
    gamma = float(np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0))
    grid = np.linspace(0.0, 1.0, 100_001)
    norms = np.linalg.norm(grid[:, None] * g1 + (1 - grid[:, None]) * g2, axis=1)
    assert abs(grid[norms.argmin()] - gamma) <= 1e-5
    jacobian = torch.tensor(np.stack([g1, g2]))
    weights = mgda(jacobian @ jacobian.T)
    assert (weights >= 0).all()
    torch.testing.assert_close(
        weights, torch.tensor([gamma, 1.0 - gamma], dtype=torch.float64), rtol=0.0, atol=1e-8
    )
