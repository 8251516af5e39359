"""Nash-MTL against torchjd's cvxpy solver, the defining equation, and hand examples."""

import math

import numpy as np
import pytest
import torch
from torch import Tensor
from torchjd.aggregation import NashMTL

from lightning_lossagg.functional.nash_mtl import (
    MAX_ITER,
    _solve_bargaining,
    _two_task_solution,
    nash_mtl,
)
from tests.functional._jacobians import (
    as_params,
    assert_same_update,
    degenerate_jacobians,
    random_jacobians,
    two_task_jacobians,
)

# cvxpy's chatter, and its divisions by zero on degenerate Gramians inside torchjd.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


def torchjd_weights(jacobian: Tensor, max_norm: float) -> Tensor:
    return NashMTL(n_tasks=jacobian.shape[0], max_norm=max_norm).weighting(jacobian)


@pytest.mark.parametrize("jacobian", as_params(random_jacobians()))
def test_weights_solve_the_bargaining_equation_and_match_torchjd(jacobian: Tensor) -> None:
    gramian = jacobian @ jacobian.T
    weights = nash_mtl(gramian, max_norm=0.0)
    assert (weights > 0).all()
    torch.testing.assert_close(weights * (gramian @ weights), torch.ones_like(weights))
    reference = torchjd_weights(jacobian, max_norm=0.0)
    # torchjd stops its cvxpy iterations early; where it has converged the solution is unique.
    if (reference * (gramian @ reference) - 1).abs().max() < 1e-4:
        torch.testing.assert_close(weights, reference, rtol=1e-4, atol=0.0)
    clipped = nash_mtl(gramian)
    assert_same_update(clipped, torchjd_weights(jacobian, max_norm=1.0), jacobian, tol=1e-4)
    torch.testing.assert_close(clipped @ gramian @ clipped, torch.tensor(1.0, dtype=torch.float64))


def test_torchjd_converges_on_most_random_cases() -> None:
    """Guards the comparison above against silently skipping every case."""
    converged = 0
    for _, jacobian in random_jacobians():
        reference = torchjd_weights(jacobian, max_norm=0.0)
        gramian = jacobian @ jacobian.T
        converged += bool((reference * (gramian @ reference) - 1).abs().max() < 1e-4)
    assert converged >= 10


def test_hand_worked_examples() -> None:
    # Orthogonal gradients: alpha_i^2 ||g_i||^2 = 1, so alpha_i = 1 / ||g_i||.
    orthogonal = torch.diag(torch.tensor([1.0, 4.0, 0.25]))
    torch.testing.assert_close(nash_mtl(orthogonal, max_norm=0.0), torch.tensor([1.0, 0.5, 2.0]))
    # Then ||d||^2 = K = 3 and clipping to 1 divides the weights by sqrt(3).
    torch.testing.assert_close(nash_mtl(orthogonal), torch.tensor([1.0, 0.5, 2.0]) / math.sqrt(3.0))
    # K identical gradients g: alpha_i ||g||^2 sum(alpha) = 1, so alpha_i = 1 / (||g|| sqrt(K)).
    identical = torch.full((4, 4), 9.0)
    torch.testing.assert_close(nash_mtl(identical, max_norm=0.0), torch.full((4,), 1 / 6.0))
    assert torch.allclose(nash_mtl(torch.tensor([[16.0]])), torch.tensor([0.25]))


def test_no_solution_falls_back_to_the_previous_weights() -> None:
    """Reused weights are scaled so that ||d||^2 = K, as for a solution, then clipped."""
    # Opposite gradients: alpha_1 (G alpha)_1 = -alpha_2 (G alpha)_2, so both cannot be 1. The
    # initial ones give d = 0, which no scaling changes.
    opposite = torch.tensor([[4.0, -4.0], [-4.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(nash_mtl(opposite), torch.ones(2, dtype=torch.float64))
    # With ||g1|| = 2, previous weights (0.2, 0.7) give d = -0.5 g1 of norm 1: scaled by sqrt(2)
    # to reach ||d|| = sqrt(K), then clipped back to max_norm = 1.
    previous = torch.tensor([0.2, 0.7], dtype=torch.float64)
    unclipped = nash_mtl(opposite, previous=previous, max_norm=0.0)
    torch.testing.assert_close(unclipped, math.sqrt(2.0) * previous)
    torch.testing.assert_close(nash_mtl(opposite, previous=previous), previous)
    # Unequal opposite gradients g2 = -3 g1: previous weights (1, 0.5) give d = -0.5 g1 of norm
    # 1; at ||d|| = sqrt(2) > max_norm = 0.25 the clipping leaves 0.25 (1, 0.5).
    unequal = torch.tensor([[4.0, -12.0], [-12.0, 36.0]], dtype=torch.float64)
    previous = torch.tensor([1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(nash_mtl(unequal, previous=previous, max_norm=0.25), previous / 4)
    torch.testing.assert_close(nash_mtl(torch.zeros(3, 3)), torch.ones(3))


@pytest.mark.parametrize("jacobian", as_params(degenerate_jacobians()))
def test_degenerate_input_gives_finite_positive_weights(jacobian: Tensor) -> None:
    gramian = jacobian @ jacobian.T
    weights = nash_mtl(gramian)
    assert torch.isfinite(weights).all() and (weights > 0).all()
    assert weights @ gramian @ weights <= 1.0 + 1e-9
    if jacobian.shape[0] == 1 or not jacobian.any():
        return  # torchjd raises on these
    # Compare where torchjd solved the equation, or where both fell back to the initial ones.
    # Elsewhere cvxpy returns an approximation of an unsolvable system, or fails on the scale.
    reference = torchjd_weights(jacobian, max_norm=0.0)
    solved = (reference * (gramian @ reference) - 1).abs().max() < 1e-4
    ones = torch.ones_like(reference)
    both_fell_back = torch.equal(reference, ones) and torch.equal(
        nash_mtl(gramian, max_norm=0), ones
    )
    if solved or both_fell_back:
        assert_same_update(weights, torchjd_weights(jacobian, max_norm=1.0), jacobian, tol=1e-3)


@pytest.mark.parametrize("jacobian", as_params(random_jacobians(num_tasks=(3, 6), seeds=(0,))))
def test_warm_start_and_scale(jacobian: Tensor) -> None:
    gramian = jacobian @ jacobian.T
    weights = nash_mtl(gramian, max_norm=0.0)
    previous = torch.rand(jacobian.shape[0], dtype=torch.float64) + 0.01
    torch.testing.assert_close(nash_mtl(gramian, previous=previous, max_norm=0.0), weights)
    for factor in (1e-8, 1e6):  # alpha solves alpha (G alpha) = 1, so it scales as 1/sqrt(factor)
        scaled = nash_mtl(factor * gramian, max_norm=0.0)
        torch.testing.assert_close(scaled * math.sqrt(factor), weights)


def test_dtype_and_device_follow_the_gramian() -> None:
    weights = nash_mtl(torch.eye(3, dtype=torch.float32))
    assert weights.dtype == torch.float32 and weights.device == torch.device("cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_norm": -1.0}, "max_norm must be"),
        ({"max_iter": 0}, "max_iter must be"),
        ({"previous": torch.tensor([1.0, 0.0])}, "previous must hold 2 positive"),
        ({"previous": torch.ones(3)}, "previous must hold 2 positive"),
    ],
)
def test_invalid_input_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nash_mtl(torch.eye(2), **kwargs)


@pytest.mark.parametrize("seed", range(3))
def test_two_task_closed_form_equals_newton(seed: int) -> None:
    # Two tasks skip Newton. Both find a solution exactly when neither gradient is zero and they
    # are not opposite; nearly opposite pairs (1 + cos below 1e-6) have huge weights, which the
    # rounding of 1 + cos sets, and where Newton may stop short and fall back.
    for jacobian in two_task_jacobians(seed):
        matrix = jacobian @ jacobian.T
        closed = _two_task_solution(*matrix.ravel().tolist(), np.finfo(np.float64).eps)
        trace = matrix.trace()
        newton = None
        if trace > 0:
            newton = _solve_bargaining(matrix / trace, np.ones(2), MAX_ITER)
            newton = None if newton is None else newton / math.sqrt(trace)
        norms = np.sqrt(matrix.diagonal())
        agreement = 1 + matrix[0, 1] / norms.prod() if norms.min() > 0 else 1.0  # 1 + cos
        opposed = agreement < 1e-6
        if newton is not None:  # both: to the rounding that 1 + cos amplifies
            np.testing.assert_allclose(closed, newton, rtol=1e-10 + 1e-14 / agreement)
        elif not opposed:
            assert closed is None
        if closed is not None and not opposed:
            np.testing.assert_allclose(closed * (matrix @ closed), 1.0, rtol=1e-9)
        if closed is not None:
            assert np.isfinite(closed).all() and (closed > 0).all()


@pytest.mark.parametrize("seed", range(3))
def test_opposite_float32_gradients_have_no_solution_as_in_float64(seed: int) -> None:
    # In float32, 1 + cos of g and -3 g is rounding (1e-7): no solution, as in float64, not
    # weights of 1e3 that the rounding sets.
    gradient = torch.randn(12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    jacobian = torch.stack([gradient, -3 * gradient])
    expected = nash_mtl(jacobian @ jacobian.T)
    single = jacobian.float()
    torch.testing.assert_close(nash_mtl(single @ single.T).double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("num_tasks", "cross"),
    [(2, -3.0 + 3e-6), (3, -2.9999995)],  # 1 + cos = 1e-6 and 1.7e-7: 8 and 1.4 rounding units
)
def test_float32_gradients_opposite_to_rounding_are_opposite(num_tasks: int, cross: float) -> None:
    # g and about -3 g in float32, with (K = 3) an orthogonal third: their 1 + cos is within the
    # Gramian's rounding, so there is no solution, as for exactly opposite ones. Taken as a
    # solution, the rounding set weights of ~700 (K = 2, closed form) and ~2500 (K = 3, Newton).
    def gramian(cross: float) -> Tensor:
        matrix = torch.eye(num_tasks)
        matrix[:2, :2] = torch.tensor([[1.0, cross], [cross, 9.0]])
        return matrix

    for max_norm in (0.0, 1.0):
        expected = nash_mtl(gramian(-3.0), max_norm=max_norm)
        torch.testing.assert_close(nash_mtl(gramian(cross), max_norm=max_norm), expected)


@pytest.mark.parametrize("num_tasks", [3, 5, 10])
def test_nearly_stationary_gradients_reach_their_solution(num_tasks: int) -> None:
    # A positive combination of the gradients cancels to 1e-4 of its size: weights of ~3e3,
    # hundreds of damped Newton steps (the cap of 100 fell back silently to unrelated weights).
    rng = np.random.default_rng(num_tasks)
    jacobian = rng.standard_normal((num_tasks, 20))
    combination = rng.uniform(0.5, 2.0, num_tasks - 1) @ jacobian[:-1]
    noise = 1e-4 * rng.standard_normal(20) * np.linalg.norm(combination) / math.sqrt(20)
    jacobian[-1] = noise - combination
    gramian = torch.from_numpy(jacobian @ jacobian.T)
    weights = nash_mtl(gramian, max_norm=0.0).numpy()
    assert weights.max() > 100
    np.testing.assert_allclose(weights * (gramian.numpy() @ weights), 1.0, rtol=1e-5)


def test_a_zero_gradient_falls_back_to_the_previous_weights():
    # No solution (no alpha_2 (G alpha)_2 = 1): seen on the diagonal, before any Newton step.
    jacobian = torch.randn(5, 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    jacobian[2] = 0.0
    gramian = jacobian @ jacobian.T
    previous = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    weights = nash_mtl(gramian, previous, max_norm=0.0)
    scale = weights / previous
    torch.testing.assert_close(scale, scale[:1].expand(5))  # the previous, rescaled
    torch.testing.assert_close(weights @ gramian @ weights, torch.tensor(5.0, dtype=torch.float64))


@pytest.mark.parametrize("small", [1e-6, 1e-8, 1e-10])
def test_orthogonal_gradients_of_very_different_norms_have_their_solution(small: float) -> None:
    # w_k = 1 / ||g_k||: a weight of 1e10 is a solution, not a divergence.
    norms = torch.tensor([1.0, 2.0, small], dtype=torch.float64)
    weights = nash_mtl(torch.diag(norms**2), max_norm=0.0)
    torch.testing.assert_close(weights, 1 / norms, rtol=1e-6, atol=0)
