"""PCGrad against torchjd (draw for draw) and against projecting the gradient vectors themselves."""

import numpy as np
import pytest
import torch
from torch import Tensor
from torchjd.aggregation import PCGradWeighting

from lightning_lossagg.functional.pcgrad import _general_pcgrad_weights, pcgrad, pcgrad_weights
from tests.functional._jacobians import as_params, degenerate_jacobians, random_jacobians

ALL_CASES = as_params(random_jacobians() + degenerate_jacobians())


def projected_gradient_sum(jacobian: Tensor, generator: torch.Generator) -> Tensor:
    """PCGrad on the gradient vectors (Yu et al., Algorithm 1), drawing one order per task."""
    gradients = list(jacobian)
    update = torch.zeros_like(jacobian[0])
    for task, gradient in enumerate(gradients):
        projected = gradient.clone()
        for other in torch.randperm(len(gradients), generator=generator).tolist():
            inner_product = projected @ gradients[other]
            if other != task and inner_product < 0:
                projected -= (
                    inner_product / (gradients[other] @ gradients[other]) * gradients[other]
                )
        update += projected
    return update


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("jacobian", ALL_CASES)
def test_weights_match_torchjd_with_the_same_seed(jacobian: Tensor, seed: int) -> None:
    """Same scale (sum of projections) and, seeded alike, the same random orders."""
    gramian = jacobian @ jacobian.T
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        reference = PCGradWeighting()(gramian)
    weights = pcgrad(gramian, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(weights, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("jacobian", as_params(random_jacobians()))
def test_update_equals_projecting_the_vectors(jacobian: Tensor, seed: int) -> None:
    weights = pcgrad(jacobian @ jacobian.T, generator=torch.Generator().manual_seed(seed))
    expected = projected_gradient_sum(jacobian, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(weights @ jacobian, expected, rtol=1e-10, atol=1e-12)


def test_order_comes_from_the_generator_only() -> None:
    jacobian = dict(random_jacobians(num_tasks=[6], seeds=[0]))["K6-seed0"]
    gramian = jacobian @ jacobian.T
    first = pcgrad(gramian, generator=torch.Generator().manual_seed(5))
    torch.rand(17)  # moves the global generator, which must not matter
    second = pcgrad(gramian, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, second, rtol=0.0, atol=0.0)


def test_order_changes_the_result_with_three_conflicting_tasks() -> None:
    """Projection order matters once a gradient conflicts with two others (why PCGrad draws it)."""
    jacobian = torch.tensor([[1.0, 0.0], [-0.8, 1.0], [-0.5, -1.0]], dtype=torch.float64)
    gramian = jacobian @ jacobian.T
    results = {
        tuple(pcgrad(gramian, generator=torch.Generator().manual_seed(seed)).tolist())
        for seed in range(20)
    }
    assert len(results) > 1


@pytest.mark.parametrize(
    ("case_id", "expected"),
    [
        ("single-task", [1.0]),
        ("zero", [1.0, 1.0, 1.0]),
        ("zero-pair", [1.0, 1.0]),
        ("identical", [1.0, 1.0, 1.0]),  # no conflict: plain sum
        ("opposite", [2.0, 2.0]),  # each projection g_i + g_j is zero, with coefficients [1, 1]
    ],
)
def test_degenerate_results(case_id: str, expected: list[float]) -> None:
    jacobian = dict(degenerate_jacobians())[case_id]
    weights = pcgrad(jacobian @ jacobian.T, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(3))
def test_two_task_closed_form_equals_the_general_solver(seed: int) -> None:
    """The same weights to the bit, and the generator (given or global) left in the same state."""
    generator = np.random.default_rng(seed)
    jacobians = [
        generator.normal(size=(2, 4)) * 10.0 ** generator.integers(-3, 4, size=(2, 1))
        for _ in range(200)
    ]
    gradient, noise = generator.normal(size=4), 1e-4 * generator.normal(size=4)
    degenerate = [
        np.zeros((2, 4)),
        np.stack([gradient, 0 * gradient]),  # one zero gradient
        np.stack([0 * gradient, gradient]),
        np.stack([gradient, -1e-9 * gradient]),  # one negligible gradient
        np.stack([gradient, gradient]),  # identical
        np.stack([gradient, -gradient]),  # opposite
        np.stack([gradient, -3.0 * gradient]),  # opposite, unequal
        np.stack([gradient, -gradient + noise]),  # nearly collinear
        np.eye(2, 4),  # orthogonal
        np.diag([1.0, 10.0]),
    ]
    jacobians += [scale * jacobian for jacobian in degenerate for scale in 10.0 ** np.arange(-3, 4)]
    for index, jacobian in enumerate(jacobians):
        matrix = jacobian @ jacobian.T
        closed, general = torch.Generator(), torch.Generator()
        closed.manual_seed(index), general.manual_seed(index)
        weights = pcgrad_weights(matrix, closed)
        np.testing.assert_array_equal(weights, _general_pcgrad_weights(matrix, general))
        assert torch.equal(closed.get_state(), general.get_state())
        with torch.random.fork_rng():
            torch.manual_seed(index)
            pcgrad_weights(matrix)
            state = torch.get_rng_state()
            torch.manual_seed(index)
            _general_pcgrad_weights(matrix)
            assert torch.equal(state, torch.get_rng_state())


# PCGrad's two-task closed form with either gradient negligible. Reference: the documented
# algorithm run on the vectors themselves in NumPy (project g_i away from each conflicting g_j,
# skipping any g_j whose squared norm is below K * eps * max ||g||^2), independent of the
# Gramian-coefficient implementation.
EPS = float(np.finfo(np.float64).eps)


def _reference_update(jacobian: np.ndarray) -> np.ndarray:
    squared = (jacobian**2).sum(1)
    negligible = len(jacobian) * EPS * squared.max()
    update = np.zeros(jacobian.shape[1])
    for i in range(2):  # two tasks: one other each, the order does not matter
        projected = jacobian[i].copy()
        j = 1 - i
        inner = projected @ jacobian[j]
        if inner < 0 and squared[j] > negligible:
            projected -= inner / squared[j] * jacobian[j]
        update += projected
    return update


@pytest.mark.parametrize("order", ["negligible-first", "negligible-second"])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_nothing_is_projected_onto_a_negligible_gradient(order: str, scale: float) -> None:
    gradient = np.random.default_rng(0).normal(size=6) * scale
    rows = [gradient, -1e-9 * gradient]
    jacobian = np.stack(rows if order == "negligible-second" else rows[::-1])
    weights = pcgrad(torch.from_numpy(jacobian @ jacobian.T)).numpy()
    assert np.isfinite(weights).all()
    expected = _reference_update(jacobian)
    np.testing.assert_allclose(weights @ jacobian, expected, rtol=1e-9, atol=1e-12 * scale)
