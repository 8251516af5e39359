"""CAGrad against torchjd, an independent cvxpy solve of the primal problem, and hand examples."""

import cvxpy as cp
import numpy as np
import pytest
import torch
from torch import Tensor
from torchjd.aggregation import CAGradWeighting

from lightning_lossagg.functional.cagrad import (
    _general_cagrad_weights,
    _on_support_in_floats,
    _on_support_in_numpy,
    cagrad,
    cagrad_weights,
)
from tests.functional._jacobians import (
    as_params,
    assert_same_update,
    degenerate_jacobians,
    random_jacobians,
)

pytestmark = pytest.mark.filterwarnings("ignore:Solution may be inaccurate")  # cvxpy, tight tols
# Clarabel's defaults leave errors of about 1e-5 in the update; SLSQP in cagrad gets about 1e-6.
TIGHT_CLARABEL = {"tol_gap_abs": 1e-13, "tol_gap_rel": 1e-13, "tol_feas": 1e-13}


def primal_optimum_by_cvxpy(jacobian: Tensor, c: float) -> tuple[Tensor, float]:
    """``max_d min_i <g_i, d>`` s.t. ``||d - g0|| <= c ||g0||``, solved on the Jacobian itself.

    Returns the optimal ``d`` and value, for gradients rescaled to a largest norm of 1."""
    matrix = (jacobian / jacobian.norm(dim=1).max()).numpy()
    mean = matrix.mean(axis=0)
    update, worst = cp.Variable(matrix.shape[1]), cp.Variable()
    constraints = [matrix @ update >= worst, cp.norm(update - mean) <= c * np.linalg.norm(mean)]
    cp.Problem(cp.Maximize(worst), constraints).solve(solver=cp.CLARABEL, **TIGHT_CLARABEL)
    return torch.from_numpy(update.value), float(worst.value)


@pytest.mark.parametrize("c", [0.2, 0.5, 2.0])
@pytest.mark.parametrize("jacobian", as_params(random_jacobians()))
def test_update_solves_the_primal_problem(jacobian: Tensor, c: float) -> None:
    """For independent gradients the primal optimum is unique: ours lies in the ball, is as good
    as cvxpy's and close to it."""
    scaled = jacobian / jacobian.norm(dim=1).max()
    update = cagrad(scaled @ scaled.T, c=c, rescale=0) @ scaled
    reference, optimal_value = primal_optimum_by_cvxpy(jacobian, c)
    mean = scaled.mean(dim=0)
    assert (update - mean).norm() <= c * mean.norm() + 1e-12
    assert (scaled @ update).min() >= optimal_value - 1e-6
    torch.testing.assert_close(update, reference, rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("jacobian", as_params(random_jacobians()))
def test_weights_match_torchjd(jacobian: Tensor) -> None:
    """torchjd's weights are LibMTL's with ``rescale=0``; ``rescale=1`` divides by 1 + c²."""
    gramian = jacobian @ jacobian.T
    reference = CAGradWeighting(c=0.5)(gramian)
    assert_same_update(cagrad(gramian, c=0.5, rescale=0), reference, jacobian, tol=1e-4)
    assert_same_update(cagrad(gramian), reference / 1.25, jacobian, tol=1e-4)
    assert_same_update(cagrad(gramian, rescale=2), reference / 1.5, jacobian, tol=1e-4)


@pytest.mark.parametrize("c", [0.5, 2.0])
@pytest.mark.parametrize("jacobian", as_params(degenerate_jacobians()))
def test_degenerate_update_is_primal_optimal(jacobian: Tensor, c: float) -> None:
    """Finite weights, and an update in the ball that is as good as the cvxpy optimum."""
    scaled = jacobian / jacobian.norm(dim=1).max().clamp(min=1e-300)
    weights = cagrad(scaled @ scaled.T, c=c, rescale=0)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    for factor in (1e-8, 1e6):
        rescaled = cagrad(factor * scaled @ scaled.T, c=c, rescale=0)
        assert_same_update(rescaled, weights, scaled, tol=1e-6)
    if not jacobian.any():
        return
    update, mean = weights @ scaled, scaled.mean(dim=0)
    assert (update - mean).norm() <= c * mean.norm() + 1e-9
    _, optimal_value = primal_optimum_by_cvxpy(jacobian, c)
    assert (scaled @ update).min() >= optimal_value - 1e-6


def test_hand_worked_examples() -> None:
    # Orthogonal unit gradients: g0 = (1/2, 1/2), the inner solution is w = (1/2, 1/2) and
    # d = g0 + (c ||g0|| / ||g_w||) g_w = (1 + c) g0.
    assert torch.allclose(cagrad(torch.eye(2), c=0.5, rescale=0), torch.tensor([0.75, 0.75]))
    # One task: d = (1 + c) g whatever its norm, divided by 1 + c².
    assert torch.allclose(cagrad(torch.tensor([[9.0]]), c=2.0), torch.tensor([3.0 / 5.0]))
    # Opposite gradients: g0 = 0 so the ball is a point, d = g0 = 0, weights 1 / (K (1 + c²)).
    opposite = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert torch.allclose(cagrad(opposite, c=0.5), torch.tensor([0.4, 0.4]))
    assert torch.allclose(cagrad(torch.zeros(3, 3), c=0.5, rescale=0), torch.full((3,), 1 / 3))


def test_pareto_stationary_returns_the_optimum_closest_to_the_mean() -> None:
    # g1 = -g2 = e1, g3 = (-0.1, 1): 0 is in the hull; every optimal d has d1 = 0 and d2 >= 0.
    # The mean is (-0.1/3, 1/3); the optimum closest to it is (0, 1/3) = g0 + (0.1/3) g1.
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-0.1, 1.0]], dtype=torch.float64)
    weights = cagrad(jacobian @ jacobian.T, c=0.5, rescale=0)
    expected = torch.tensor([0.0, 1.0 / 3.0], dtype=torch.float64)
    torch.testing.assert_close(weights @ jacobian, expected, atol=1e-7, rtol=0.0)


def test_dtype_and_device_follow_the_gramian() -> None:
    weights = cagrad(torch.eye(3, dtype=torch.float32))
    assert weights.dtype == torch.float32 and weights.device == torch.device("cpu")


@pytest.mark.parametrize(
    ("gramian", "kwargs", "message"),
    [
        (torch.eye(2), {"c": -0.1}, "c must be"),
        (torch.eye(2), {"rescale": 3}, "rescale must be"),
        (torch.ones(2, 3), {}, "square"),
        (torch.tensor([[1.0, 0.5], [0.0, 1.0]]), {}, "symmetric"),
        (torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]), {}, "NaN"),
    ],
)
def test_invalid_input_is_rejected(gramian: Tensor, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cagrad(gramian, **kwargs)


@pytest.mark.parametrize("jacobian", as_params(random_jacobians() + degenerate_jacobians()))
def test_a_guessed_support_changes_nothing_but_the_start(jacobian: Tensor) -> None:
    # The callback starts each step's search from the previous step's support: from a right,
    # wrong, full or empty guess the weights are the same, to the bit (a fit resumed from a
    # checkpoint, which holds no support, weighs exactly as the uninterrupted one).
    gramian = (jacobian @ jacobian.T).numpy()
    cold, support = cagrad_weights(gramian, c=0.5)
    num_tasks = len(gramian)
    right = np.zeros(num_tasks, bool) if support is None else support
    for guess in (right, ~right, np.ones(num_tasks, bool), np.zeros(num_tasks, bool)):
        weights, _ = cagrad_weights(gramian, c=0.5, support=guess)
        np.testing.assert_array_equal(weights, cold)


@pytest.mark.parametrize("size", range(3, 9))
@pytest.mark.parametrize("seed", range(3))
def test_python_floats_search_the_supports_like_numpy(size: int, seed: int) -> None:
    # A training step searches from the previous support in Python floats, step for step as
    # NumPy: from any start, the same inner minimiser, or nothing where NumPy finds nothing
    # (the search from the best vertex then decides).
    rng = np.random.default_rng(seed)
    jacobian = rng.normal(size=(size, size + 3)) + rng.normal(size=size + 3)
    gram = jacobian @ jacobian.T
    gram /= np.trace(gram)
    lin = gram.mean(axis=1)
    radius = 0.5 * float(np.sqrt(lin.mean()))
    reference = _on_support_in_numpy(gram, lin, radius)
    assert reference is not None
    right = reference > 0
    one_off = [right ^ (np.arange(size) == task) for task in range(size)]  # a task in or out
    starts = [right, np.ones(size, bool), *one_off, *(rng.random((4, size)) < 0.5)]
    for start in starts:
        if not start.any():
            continue
        expected = _on_support_in_numpy(gram, lin, radius, start)
        found = _on_support_in_floats(gram.tolist(), lin.tolist(), radius, start.tolist())
        assert (found is None) == (expected is None)
        if found is not None:
            np.testing.assert_allclose(found, expected, rtol=1e-9, atol=1e-12)
    assert _on_support_in_floats(gram.tolist(), lin.tolist(), radius, right.tolist())


def cagrad_pairs(generator: np.random.Generator) -> list[tuple[str, np.ndarray, float]]:
    """``(case, jacobian, rtol)``: random pairs with norms and conflicts of every kind, then
    degenerate pairs at scales 1e-3 to 1e3."""
    cases = []
    for _ in range(100):
        jacobian = generator.normal(size=(2, 4)) * 10.0 ** generator.integers(-3, 4)
        jacobian[1] *= 10.0 ** generator.uniform(-2, 2)
        jacobian[1] += generator.uniform(-2, 2) * jacobian[0]
        cases.append(("random", jacobian, 1e-9))
    gradient, noise = generator.normal(size=4), 1e-4 * generator.normal(size=4)
    degenerate = [
        ("zero", np.zeros((2, 4)), 1e-9),
        ("one zero gradient", np.stack([gradient, 0 * gradient]), 1e-9),
        ("one zero gradient", np.stack([0 * gradient, gradient]), 1e-9),
        ("identical", np.stack([gradient, gradient]), 1e-9),
        ("opposite", np.stack([gradient, -gradient]), 1e-9),
        ("opposite, unequal", np.stack([gradient, -3.0 * gradient]), 1e-9),
        ("opposite, unequal", np.stack([gradient, -1e-3 * gradient]), 1e-9),
        ("same direction, unequal", np.stack([gradient, 0.2 * gradient]), 1e-9),
        ("orthogonal", np.eye(2, 4), 1e-9),
        ("orthogonal", np.diag([1.0, 10.0]), 1e-9),
        # Both solvers lose about eps / angle² of relative accuracy (the general one more).
        ("nearly collinear", np.stack([gradient, gradient + noise]), 1e-6),
        ("nearly collinear", np.stack([gradient, -2.0 * gradient + noise]), 1e-6),
    ]
    for scale in 10.0 ** np.arange(-3, 4):
        cases += [(case, scale * jacobian, rtol) for case, jacobian, rtol in degenerate]
    return cases


@pytest.mark.parametrize("seed", range(3))
def test_two_task_closed_form_equals_the_general_solver(seed: int) -> None:
    # Two tasks skip the search; the Pareto-stationary ones (a zero gradient, opposite gradients
    # with c > 1) still take the projection. With a zero gradient the general search fails and
    # SLSQP leaves ~1e-16 on the other task: the closed form's support is the exact one.
    for case, jacobian, rtol in cagrad_pairs(np.random.default_rng(seed)):
        matrix = jacobian @ jacobian.T
        for c in (0.0, 0.1, 0.5, 1.0, 5.0):
            for rescale in (0, 1, 2):
                weights, support = cagrad_weights(matrix, c, rescale)
                expected, expected_support = _general_cagrad_weights(matrix, c, rescale)
                np.testing.assert_allclose(weights, expected, rtol=rtol, atol=0.0, err_msg=case)
                if expected_support is None or case != "one zero gradient":
                    np.testing.assert_array_equal(support, expected_support, err_msg=case)
                else:
                    np.testing.assert_array_equal(support, ~jacobian.any(axis=1))
                    assert (expected_support | ~support).all()


@pytest.mark.parametrize("smaller", [1e-5, 1e-7, 1e-9])
@pytest.mark.parametrize("num_tasks", [2, 3])
def test_a_much_smaller_task_gradient_is_not_taken_for_pareto_stationarity(
    num_tasks: int, smaller: float
) -> None:
    # Relative to the largest gradient, a task gradient 1e-7 times smaller passed for g_w = 0,
    # and the projection that replaced CAGrad's update conflicted with it (cosine -0.05).
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(num_tasks, 50, generator=generator, dtype=torch.float64)
    jacobian[-1] *= smaller
    update = cagrad(jacobian @ jacobian.T, c=0.5, rescale=0) @ jacobian
    cosines = (jacobian @ update) / (jacobian.norm(dim=1) * update.norm())
    assert (cosines > 0.1).all(), cosines
    mean = jacobian.mean(dim=0)
    assert (update - mean).norm() <= 0.5 * mean.norm() * (1 + 1e-9)


@pytest.mark.parametrize("gap", [1e-3, 1e-4])
@pytest.mark.parametrize("num_tasks", [2, 3])
def test_nearly_pareto_stationary_gradients_take_the_primal_optimum(
    num_tasks: int, gap: float
) -> None:
    # g_1 = e_1 and g_2 = -e_1 + gap e_2 nearly cancel (the hull passes gap / 2 from 0), but are
    # independent: the primal optimum is unique; for K = 2, d -> (1 + c) g0 as gap -> 0 (0.6 each
    # at rescale 1). Taken for Pareto-stationary, they were given d = g0 (0.4 each).
    rows = [[1.0, 0.0, 0.0], [-1.0, gap, 0.0], [0.0, 0.0, 1.0]][:num_tasks]
    jacobian = torch.tensor(rows, dtype=torch.float64)
    update = cagrad(jacobian @ jacobian.T, c=0.5, rescale=0) @ jacobian
    reference, optimal_value = primal_optimum_by_cvxpy(jacobian, c=0.5)
    assert (jacobian @ update).min() >= optimal_value - 1e-9
    torch.testing.assert_close(update, reference, rtol=0.0, atol=1e-6)


def test_a_search_that_fails_from_the_best_vertex_is_polished_from_slsqps_support() -> None:
    # A well-conditioned Gramian (eigenvalue ratio 3e-4) on which the search from the best
    # vertex gives up: SLSQP's answer (within 1e-8) is made exact from its support, the same to
    # the bit as the search from the right guess.
    gramian = np.array(
        [
            [5.543307295809741, -4.097778050110076, -0.22886525759344165],
            [-4.097778050110076, 3.4541886524445067, 0.5988742138356347],
            [-0.22886525759344165, 0.5988742138356347, 0.4503750692597774],
        ]
    )
    cold, support = cagrad_weights(gramian, c=0.9)
    warm, _ = cagrad_weights(gramian, c=0.9, support=np.array([True, True, False]))
    np.testing.assert_array_equal(cold, warm)
    assert support is not None
