import math

import pytest
import torch
from torch.testing import assert_close
from torchjd.scalarization import GeometricMean

from lightning_lossagg.functional.gls import gls, gls_weights


def test_matches_torchjd_geometric_mean_value_and_gradient():
    losses = torch.rand(6, generator=torch.Generator().manual_seed(3)) * 4 + 0.05
    reference_losses = losses.clone().requires_grad_()
    reference = GeometricMean()(reference_losses)
    reference.backward()
    assert_close(gls(losses), reference.detach())
    assert_close(gls_weights(losses), reference_losses.grad)


def test_matches_the_product_formula():
    losses = torch.tensor([0.7, 1.9, 3.2, 0.4], dtype=torch.float64)
    assert_close(gls(losses), losses.prod() ** (1 / 4))


def test_hand_worked_example():
    # G = (2·8·4)^(1/3) = 4 and w_k = G / (3 L_k).
    losses = torch.tensor([2.0, 8.0, 4.0])
    assert_close(gls(losses), torch.tensor(4.0))
    assert_close(gls_weights(losses), torch.tensor([2 / 3, 1 / 6, 1 / 3]))


def test_many_small_losses_do_not_underflow():
    losses = torch.full((50,), 1e-3)
    assert losses.prod() == 0  # the naive product underflows in float32
    assert_close(gls(losses), torch.tensor(1e-3))
    assert_close(gls_weights(losses), torch.full((50,), 1 / 50))


def test_weights_are_the_objective_gradient():
    losses = torch.tensor([0.2, 1.5, 9.0], requires_grad=True)
    gls(losses).backward()
    assert_close(gls_weights(losses), losses.grad)
    assert not gls_weights(losses).requires_grad


def test_single_task_is_the_loss_itself():
    assert_close(gls(torch.tensor([2.5])), torch.tensor(2.5))
    assert_close(gls_weights(torch.tensor([2.5])), torch.tensor([1.0]))


@pytest.mark.parametrize("function", [gls, gls_weights])
@pytest.mark.parametrize(
    ("losses", "message"),
    [
        ([1.0, 0.0, 2.0], r"> 0; found \[0\.0\] at task indices \[1\]"),
        ([-1.0, 1.0], r"at task indices \[0\]"),
        ([1.0, math.nan], r"at task indices \[1\]"),
        ([math.inf, 1.0], r"at task indices \[0\]"),
    ],
)
def test_non_positive_or_non_finite_losses_are_refused_by_index(function, losses, message):
    with pytest.raises(ValueError, match=message):
        function(torch.tensor(losses))


@pytest.mark.parametrize("losses", [torch.ones(2, 2), torch.ones(0), torch.tensor([1, 2])])
def test_bad_shapes_and_dtypes_are_refused(losses):
    with pytest.raises(ValueError, match="non-empty 1-D floating"):
        gls(losses)


def test_weights_over_the_valid_tasks_ignore_the_others():
    losses = torch.tensor([2.0, float("nan"), 0.5, -1.0], dtype=torch.float64)
    valid = torch.tensor([True, False, True, False])
    weights = gls_weights(losses, valid=valid)
    assert_close(weights[valid], gls_weights(losses[valid]))
    with pytest.raises(ValueError, match="must be finite and > 0"):
        gls_weights(losses, valid=torch.tensor([True, True, True, False]))
