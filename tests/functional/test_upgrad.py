"""UPGrad against torchjd (quadprog) and, for two tasks, the projection worked out by hand."""

import numpy as np
import pytest
import torch
from torch import Tensor
from torchjd.aggregation import UPGradWeighting

from lightning_lossagg.functional._qp import active_set_qps
from lightning_lossagg.functional.upgrad import KKT_TOL, upgrad, upgrad_weights
from tests.functional._jacobians import as_params, degenerate_jacobians, random_jacobians

ALL_CASES = as_params(random_jacobians() + degenerate_jacobians())
TORCHJD_NORM_EPS = 1e-4


def assert_weights_close(weights: Tensor, reference: Tensor) -> None:
    torch.testing.assert_close(weights, reference, rtol=1e-7, atol=1e-9 * reference.abs().max())


@pytest.mark.parametrize("jacobian", ALL_CASES)
def test_weights_match_torchjd(jacobian: Tensor) -> None:
    """Same scale (mean of the projections) and, with torchjd's norm_eps, the same weights."""
    gramian = jacobian @ jacobian.T
    weights = upgrad(gramian, norm_eps=TORCHJD_NORM_EPS)
    assert_weights_close(weights, UPGradWeighting()(gramian))


@pytest.mark.parametrize("jacobian", as_params(random_jacobians(seeds=[0])))
def test_weights_match_torchjd_with_a_preference_vector(jacobian: Tensor) -> None:
    gramian = jacobian @ jacobian.T
    preferences = torch.linspace(0.5, 2.0, jacobian.shape[0], dtype=torch.float64)
    weights = upgrad(gramian, pref_vector=preferences)
    assert_weights_close(weights, UPGradWeighting(pref_vector=preferences)(gramian))


def test_small_gradients_are_projected_not_treated_as_zero() -> None:
    """The documented difference from torchjd: norm_eps defaults to 0, so scale does not matter."""
    jacobian = dict(degenerate_jacobians())["tiny"]
    unit_scale = jacobian / jacobian.norm(dim=1).max()
    weights = upgrad(jacobian @ jacobian.T)
    assert_weights_close(weights, upgrad(unit_scale @ unit_scale.T))
    mean = torch.full_like(weights, 1 / len(weights))
    torch.testing.assert_close(UPGradWeighting()(jacobian @ jacobian.T), mean)
    assert not torch.allclose(weights, mean)


def project_onto_two_gradient_cone(gradient: Tensor, other: Tensor) -> Tensor:
    """For two gradients the projection of g_1 onto {x : <x, g_1> >= 0, <x, g_2> >= 0} is g_1 if it
    agrees with g_2, else its projection onto the hyperplane <x, g_2> = 0 (which keeps
    <x, g_1> = ||g_1||^2 - <g_1, g_2>^2 / ||g_2||^2 >= 0 by Cauchy-Schwarz)."""
    inner_product = gradient @ other
    if inner_product >= 0:
        return gradient
    return gradient - inner_product / (other @ other) * other


@pytest.mark.parametrize(
    "jacobian",
    [
        [[1.0, 0.0], [-1.0, 1.0]],
        [[2.0, 1.0, 0.0], [-3.0, 0.5, 1.0]],
        [[1.0, 2.0], [2.0, -0.5]],  # orthogonal: nothing to project
        [[1.0, 0.5], [3.0, 1.0]],  # agreeing: nothing to project
    ],
)
def test_two_tasks_by_hand(jacobian: list[list[float]]) -> None:
    matrix = torch.tensor(jacobian, dtype=torch.float64)
    expected = (
        project_onto_two_gradient_cone(matrix[0], matrix[1])
        + project_onto_two_gradient_cone(matrix[1], matrix[0])
    ) / 2
    weights = upgrad(matrix @ matrix.T, reg_eps=1e-12)
    torch.testing.assert_close(weights @ matrix, expected)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("reg_eps", 0.0),
        ("norm_eps", -1.0),
        ("max_iter", 0),
        ("pref_vector", torch.ones(3)),
        ("pref_vector", torch.tensor([1.0, float("nan")])),
        ("pref_vector", torch.zeros(2)),
        ("pref_vector", torch.tensor([1.0, -0.5])),
    ],
)
def test_rejects_bad_arguments(keyword: str, value: object) -> None:
    with pytest.raises(ValueError, match=keyword):
        upgrad(torch.eye(2), **{keyword: value})


@pytest.mark.parametrize("jacobian", ALL_CASES)
def test_guessed_supports_change_nothing_but_the_start(jacobian: Tensor) -> None:
    # The callback passes each step's supports to the next; from right, wrong or empty guesses
    # the weights are the same, to the bit (a fit resumed from a checkpoint, which holds no
    # supports, weighs exactly as the uninterrupted one), and the guesses come back as this
    # call's supports.
    num_tasks = jacobian.shape[0]
    gramian = jacobian @ jacobian.T
    cold = upgrad(gramian)
    wrong = [
        torch.rand(num_tasks, generator=torch.Generator().manual_seed(k)).numpy() < 0.5
        for k in range(num_tasks)
    ]
    empty = [np.zeros(num_tasks, bool) for _ in range(num_tasks)]
    for guesses in (wrong, empty):
        assert torch.equal(upgrad(gramian, guesses=guesses), cold)
    # Both came back as this call's supports, the same from either start.
    assert all(np.array_equal(a, b) for a, b in zip(wrong, empty, strict=True))
    supports = [guess.copy() for guess in wrong]
    assert torch.equal(upgrad(gramian, guesses=wrong), cold)  # from the last call's supports
    assert all(np.array_equal(a, b) for a, b in zip(wrong, supports, strict=True))


def test_guesses_come_back_as_the_projections_supports() -> None:
    # g_1 = (1, 0) and g_2 = (-1, 1) conflict: each projection raises the other's coordinate above
    # its bound; g_3 = (0, 1) conflicts with neither and is its own projection.
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    guesses = [np.zeros(3, bool) for _ in range(3)]
    upgrad(jacobian @ jacobian.T, guesses=guesses)
    expected = [[False, True, False], [True, False, False], [False, False, False]]
    np.testing.assert_array_equal(np.stack(guesses), expected)


def test_a_trace_at_most_norm_eps_counts_as_zero() -> None:
    # Opposite gradients of trace exactly norm_eps: zero, so the weights are the preferences (the
    # projections of opposite gradients would be 0, at weights of about 1 each).
    opposite = torch.tensor([[0.5, -0.5], [-0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(upgrad(opposite, norm_eps=1.0), torch.full((2,), 0.5).double())
    assert upgrad(opposite, norm_eps=0.999)[0] > 0.9


@pytest.mark.parametrize("seed", range(5))
def test_two_task_closed_form_equals_the_active_set_solver(seed: int) -> None:
    # Two tasks skip the solver; negative and zero preferences included (their projection is 0).
    generator = np.random.default_rng(seed)
    for case in range(200):
        jacobian = generator.normal(size=(2, 4)) * 10.0 ** generator.integers(-3, 4)
        if case % 4 == 0:
            jacobian[1] = -generator.uniform(0.1, 2.0) * jacobian[0]  # opposite
        matrix = jacobian @ jacobian.T
        preferences = generator.normal(size=2) if case % 3 else np.array([0.0, 0.5])
        hessian = matrix / matrix.trace() + 1e-4 * np.eye(2)
        tol = KKT_TOL * np.abs(preferences).max()
        lowers = np.diag(preferences)
        projections = active_set_qps(hessian, np.zeros(2), lowers, 250, tol, np.zeros((2, 2), bool))
        weights, supports = upgrad_weights(matrix, preferences, reg_eps=1e-4)
        np.testing.assert_allclose(weights, projections.sum(0), rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(supports, projections > lowers)


# UPGrad's projections are positively homogeneous in the preference vector: projecting p_i e_i onto
# {x : G x >= 0}-dual cone commutes with scaling p by s > 0, so upgrad(G, s p) = s upgrad(G, p) for
# every s (validated_preferences accepts any p >= 0 with a positive entry). The KKT tolerance must
# therefore scale with p: an absolute 1e-12 stops the active-set search early for small preferences.
# The unscaled weights are checked against torchjd's UPGradWeighting (quadprog).
PREFERENCE_CASES = as_params(
    random_jacobians(num_tasks=[3, 5, 8, 11])
    + [case for case in degenerate_jacobians() if case[0] in ("crowded", "rank-deficient")]
)


@pytest.mark.parametrize("scale", [1e-14, 1e-9, 1e6])
@pytest.mark.parametrize("jacobian", PREFERENCE_CASES)
def test_weights_scale_with_the_preferences(jacobian: torch.Tensor, scale: float) -> None:
    gramian = jacobian @ jacobian.T
    preferences = torch.linspace(0.5, 2.0, jacobian.shape[0], dtype=torch.float64)
    reference = UPGradWeighting(pref_vector=preferences)(gramian)
    weights = upgrad(gramian, pref_vector=preferences)
    torch.testing.assert_close(weights, reference, rtol=1e-7, atol=1e-9 * reference.abs().max())
    scaled = upgrad(gramian, pref_vector=scale * preferences)
    torch.testing.assert_close(scaled / scale, weights, rtol=1e-7, atol=1e-9 * weights.abs().max())
