import math

import pytest
import torch
from torch.testing import assert_close
from torchjd.scalarization import UW

from lightning_lossagg.functional.uncertainty import uncertainty_objective, uncertainty_weights


def test_matches_torchjd_uw_value_and_gradients():
    generator = torch.Generator().manual_seed(0)
    losses = torch.rand(4, generator=generator) * 3 + 0.1
    log_vars = torch.randn(4, generator=generator)
    scalarizer = UW(4)
    with torch.no_grad():
        scalarizer.log_var.copy_(log_vars)
    reference_losses = losses.clone().requires_grad_()
    reference = scalarizer(reference_losses)
    reference.backward()

    ours_log_vars = log_vars.clone().requires_grad_()
    ours = uncertainty_objective(losses, ours_log_vars)
    ours.backward()

    assert_close(ours, reference.detach())
    assert_close(uncertainty_weights(log_vars), reference_losses.grad)
    assert_close(ours_log_vars.grad, scalarizer.log_var.grad)


@pytest.mark.parametrize(
    ("classification", "weights", "objective"),
    [
        # 1/2·e^0·2 + 0 + 1/2·e^(-ln 2)·4 + 1/2·ln 2
        (None, [0.5, 0.25], 2.0 + 0.5 * math.log(2)),
        # 1/2·e^0·2 + 0 + e^(-ln 2)·4 + 1/2·ln 2
        ([False, True], [0.5, 0.5], 3.0 + 0.5 * math.log(2)),
    ],
)
def test_hand_worked_example(classification, weights, objective):
    log_vars = torch.tensor([0.0, math.log(2)])
    losses = torch.tensor([2.0, 4.0])
    mask = None if classification is None else torch.tensor(classification)
    assert_close(uncertainty_weights(log_vars, mask), torch.tensor(weights))
    assert_close(uncertainty_objective(losses, log_vars, mask), torch.tensor(objective))


def test_libmtl_initial_log_variance_gives_half_e_to_the_half():
    assert_close(uncertainty_weights(torch.full((3,), -0.5)), torch.full((3,), math.exp(0.5) / 2))


def test_weights_are_the_objective_gradient_in_the_losses():
    losses = torch.tensor([0.3, 2.0, 5.0], requires_grad=True)
    log_vars = torch.tensor([0.4, -1.0, 2.0])
    mask = torch.tensor([True, False, True])
    uncertainty_objective(losses, log_vars, mask).backward()
    assert_close(losses.grad, uncertainty_weights(log_vars, mask))


@pytest.mark.parametrize(
    ("is_classification", "optimum"), [(False, math.log(3.0)), (True, math.log(6.0))]
)
def test_objective_is_stationary_at_the_paper_optimum(is_classification, optimum):
    # d/ds (c e^(-s) L + s/2) = 0  <=>  s = log(2 c L); here L = 3.
    log_vars = torch.tensor([optimum], requires_grad=True)
    mask = torch.tensor([is_classification])
    uncertainty_objective(torch.tensor([3.0]), log_vars, mask).backward()
    assert_close(log_vars.grad, torch.zeros(1))


def test_weights_are_detached_and_objective_is_differentiable():
    log_vars = torch.zeros(2, requires_grad=True)
    assert not uncertainty_weights(log_vars).requires_grad
    assert uncertainty_objective(torch.ones(2), log_vars).requires_grad


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: uncertainty_weights(torch.zeros(2, 2)), "1-D floating"),
        (lambda: uncertainty_weights(torch.tensor([0.0, math.inf])), r"indices \[1\]"),
        (lambda: uncertainty_weights(torch.zeros(2), torch.tensor([1, 0])), "bool tensor"),
        (lambda: uncertainty_weights(torch.zeros(2), torch.tensor([True])), "bool tensor"),
        (lambda: uncertainty_objective(torch.ones(3), torch.zeros(2)), "shape of `log_vars`"),
        (lambda: uncertainty_objective(torch.tensor([1.0, math.nan]), torch.zeros(2)), r"\[1\]"),
    ],
)
def test_invalid_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
