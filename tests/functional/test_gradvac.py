"""GradVac against torchjd over several steps, PCGrad as its zero-target case, hand examples."""

import math

import pytest
import torch
from torch import Tensor
from torchjd.aggregation import GradVacWeighting, PCGradWeighting

from lightning_lossagg.functional.gradvac import gradvac
from tests.functional._jacobians import (
    as_params,
    assert_same_update,
    degenerate_jacobians,
    random_jacobians,
)


@pytest.mark.parametrize("beta", [0.5, 0.1])
@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
def test_weights_and_targets_match_torchjd_over_steps(num_tasks: int, beta: float) -> None:
    """Same global seed, same task order: the weights and the EMA agree at every step (up to
    torchjd's 1e-8 in the cosine denominators)."""
    reference = GradVacWeighting(beta=beta)
    targets = None
    cases = random_jacobians(num_tasks=[num_tasks], seeds=range(4))
    for step, (_, jacobian) in enumerate(cases):
        gramian = jacobian @ jacobian.T
        torch.manual_seed(step)
        expected = reference(gramian)
        torch.manual_seed(step)
        weights, targets = gradvac(gramian, targets, beta=beta)
        assert_same_update(weights, expected, jacobian, tol=1e-6)
        torch.testing.assert_close(targets, reference._phi_t, rtol=0.0, atol=1e-6)


def test_two_tasks_by_hand() -> None:
    # g1 = (1, 0), g2 = (-1, 1): cos = -1/sqrt(2) < 0 = target. Correcting g1 adds
    # ||g1|| (0 - cos) / ||g2|| g2 = 0.5 g2; correcting g2 adds ||g2|| (-cos) / ||g1|| g1 = g1.
    # d = (g1 + 0.5 g2) + (g2 + g1) = 2 g1 + 1.5 g2; both targets become 0.5 * cos.
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    weights, targets = gradvac(jacobian @ jacobian.T, beta=0.5)
    torch.testing.assert_close(weights, torch.tensor([2.0, 1.5], dtype=torch.float64))
    cosine = -1 / math.sqrt(2)
    expected = torch.tensor([[0.0, 0.5 * cosine], [0.5 * cosine, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(targets, expected)


@pytest.mark.parametrize("target", [-0.5, 0.3, 0.9])
@pytest.mark.parametrize("jacobian", as_params(random_jacobians(num_tasks=[2])))
def test_correction_reaches_the_target_cosine(jacobian: Tensor, target: float) -> None:
    """With two tasks, g1^PC = g1 + (w2 - 1) g2 and g2^PC = g2 + (w1 - 1) g1; when the cosine is
    below the target each corrected gradient has exactly the target cosine with the other."""
    targets = torch.full((2, 2), target, dtype=torch.float64)
    weights, _ = gradvac(jacobian @ jacobian.T, targets)
    first, second = jacobian
    corrected = (first + (weights[1] - 1) * second, second + (weights[0] - 1) * first)
    cosine = torch.nn.functional.cosine_similarity
    if cosine(first, second, dim=0) >= target:
        torch.testing.assert_close(weights, torch.ones(2, dtype=torch.float64))
        return
    expected = torch.tensor(target, dtype=torch.float64)
    torch.testing.assert_close(cosine(corrected[0], second, dim=0), expected)
    torch.testing.assert_close(cosine(corrected[1], first, dim=0), expected)


@pytest.mark.parametrize("jacobian", as_params(random_jacobians(num_tasks=[2])))
def test_zero_targets_and_beta_zero_is_pcgrad(jacobian: Tensor) -> None:
    """A target of 0 projects a conflicting gradient onto the normal plane of the other."""
    gramian = jacobian @ jacobian.T
    weights, targets = gradvac(gramian, beta=0.0)
    assert_same_update(weights, PCGradWeighting()(gramian), jacobian, tol=1e-9)
    assert not targets.any()


@pytest.mark.parametrize("jacobian", as_params(degenerate_jacobians()))
def test_degenerate_input_gives_finite_weights(jacobian: Tensor) -> None:
    gramian = jacobian @ jacobian.T
    num_tasks = jacobian.shape[0]
    for target in (0.0, 0.9, 1.0):  # a target of 1 asks for an infinite correction
        targets = torch.full((num_tasks, num_tasks), target, dtype=torch.float64)
        weights, new_targets = gradvac(gramian, targets, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(weights).all() and torch.isfinite(new_targets).all()
        assert (new_targets.abs() <= 1).all()
        zero_rows = ~jacobian.any(dim=1)
        assert (weights[zero_rows] == 1).all()  # nothing is added along a zero gradient
    weights, _ = gradvac(gramian, generator=torch.Generator().manual_seed(0))
    for factor in (1e-8, 1e6):
        rescaled, _ = gradvac(factor * gramian, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(rescaled, weights)


def test_a_gradient_at_rounding_noise_of_the_largest_counts_as_zero() -> None:
    # ||g_1|| = 1e-9 ||g_0||, squared 1e-18 < K * 2.2e-16: g_0 is not pulled towards the
    # opposite g_1 (that would add 1e9 g_1), and the cosines enter the EMA as 0.
    jacobian = torch.tensor([[1.0, 0.0], [-1e-9, 0.0]], dtype=torch.float64)
    targets = torch.full((2, 2), 0.5, dtype=torch.float64)
    weights, new_targets = gradvac(jacobian @ jacobian.T, targets, beta=0.5)
    torch.testing.assert_close(weights, torch.ones(2, dtype=torch.float64), rtol=0, atol=0)
    expected = 0.5 * targets
    expected.fill_diagonal_(0.5)  # the diagonal (a task towards itself) is never visited
    torch.testing.assert_close(new_targets, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "jacobian",
    [
        torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64),
        # rank 1 at K = 9: gradients along one direction, of either sign
        torch.tensor([1.0, -2.0, 1.0, -1.0, 3.0, -1.0, 1.0, 2.0, -3.0], dtype=torch.float64)[
            :, None
        ]
        * torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64),
    ],
    ids=["opposite", "rank 1"],
)
def test_a_correction_that_cancels_a_gradient_leaves_finite_targets(jacobian: Tensor) -> None:
    # Corrected against an exactly opposite gradient, g_i^PC is 0: its next cosine is 0 / 0.
    gramian = jacobian @ jacobian.T
    for seed in range(4):  # every visiting order
        generator, targets = torch.Generator().manual_seed(seed), None
        for _ in range(3):  # the targets are the state the next call starts from
            weights, targets = gradvac(gramian, targets, generator=generator)
            assert torch.isfinite(weights).all() and torch.isfinite(targets).all(), seed


def test_generator_fixes_the_task_order() -> None:
    jacobian = random_jacobians(num_tasks=[6], seeds=[0])[0][1]
    gramian = jacobian @ jacobian.T
    targets = torch.full((6, 6), 0.5, dtype=torch.float64)
    runs = [gradvac(gramian, targets, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1])
    other_seed = [
        gradvac(gramian, targets, generator=torch.Generator().manual_seed(s))[0]
        for s in range(4, 10)
    ]
    assert any(not torch.allclose(weights, runs[0][0]) for weights in other_seed)


def test_dtype_and_device_follow_the_gramian() -> None:
    weights, targets = gradvac(torch.eye(3, dtype=torch.float32))
    assert weights.dtype == targets.dtype == torch.float32
    assert weights.device == targets.device == torch.device("cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.5}, "beta must be in"),
        ({"targets": torch.zeros(3, 3)}, "targets must be the"),
        ({"targets": torch.full((2, 2), 1.5)}, "targets must be the"),
        ({"targets": torch.full((2, 2), 1.0 + 1e-4)}, "targets must be the"),  # not rounding
    ],
)
def test_invalid_input_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gradvac(torch.eye(2), **kwargs)


def test_targets_rounded_past_one_are_taken_as_one() -> None:
    # Targets are accepted to 1 + 1e-6 (an EMA of cosines can round past 1); sqrt(1 - target²)
    # of one above 1 is a math domain error, so they are clamped: the same weights as at 1.
    gramian = torch.eye(2, dtype=torch.float64)
    at_one = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    weights, targets = gradvac(gramian, at_one + 5e-7 * at_one)
    expected_weights, expected_targets = gradvac(gramian, at_one)
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=0)
    torch.testing.assert_close(targets, expected_targets, rtol=0, atol=0)
    assert torch.isfinite(weights).all()


# GradVac corrects g_i^PC only when its cosine with g_j is *below* the target (Wang et al., 2021,
# Alg. 1: "if phi_ij < phi_hat_ij"). A cosine already at the target, e.g. identical gradients
# (cosine exactly 1) with the EMA at 1, needs no correction: the weights stay those of plain
# summation. (At target 1 the formula's sine is floored at 1e-8, so a correction applied there would
# remove the whole gradient instead of nothing.)
@pytest.mark.parametrize("num_tasks", [2, 3])
def test_a_cosine_equal_to_the_target_is_not_corrected(num_tasks: int) -> None:
    gradient = torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64)
    jacobian = gradient.repeat(num_tasks, 1)
    gramian = jacobian @ jacobian.T
    targets = torch.ones(num_tasks, num_tasks, dtype=torch.float64)
    weights, new_targets = gradvac(gramian, targets, beta=0.5)
    torch.testing.assert_close(weights, torch.ones(num_tasks, dtype=torch.float64))
    off_diagonal = ~torch.eye(num_tasks, dtype=torch.bool)
    torch.testing.assert_close(
        new_targets[off_diagonal], torch.ones(num_tasks * (num_tasks - 1), dtype=torch.float64)
    )
