import math

import pytest
import torch
from torch.optim.swa_utils import get_ema_avg_fn
from torch.testing import assert_close

from lightning_lossagg.functional.loss_scaling import loss_scaling_weights, update_loss_levels


def test_levels_follow_torchs_ema_convention():
    steps = torch.rand(6, 3, generator=torch.Generator().manual_seed(5)) + 0.1
    ema = get_ema_avg_fn(decay=0.8)
    expected = steps[0]
    for step_losses in steps[1:]:
        expected = ema(expected, step_losses, None)
    levels = None
    for step_losses in steps:
        levels = update_loss_levels(levels, step_losses, decay=0.8)
    assert_close(levels, expected)


def test_hand_worked_example():
    levels = update_loss_levels(None, torch.tensor([2.0, 4.0]), decay=0.5)
    levels = update_loss_levels(levels, torch.tensor([4.0, 0.0]), decay=0.5)
    assert_close(levels, torch.tensor([3.0, 2.0]))
    assert_close(loss_scaling_weights(levels), torch.tensor([1 / 3, 1 / 2]))


def test_first_levels_are_a_detached_copy_of_the_losses():
    losses = torch.tensor([1.0, 2.0], requires_grad=True)
    levels = update_loss_levels(None, losses, decay=0.9)
    assert not levels.requires_grad
    with torch.no_grad():
        losses.mul_(10)
    assert_close(levels, torch.tensor([1.0, 2.0]))


def test_zero_decay_tracks_the_current_loss():
    levels = update_loss_levels(torch.tensor([5.0, 5.0]), torch.tensor([1.0, 2.0]), decay=0.0)
    assert_close(levels, torch.tensor([1.0, 2.0]))


def test_zero_level_gets_the_finite_weight_one_over_eps():
    weights = loss_scaling_weights(torch.tensor([0.0, 4.0]), eps=1e-4)
    assert_close(weights, torch.tensor([1e4, 0.25]))


@pytest.mark.parametrize("decay", [1.0, -0.1, math.nan, 1.5])
def test_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ValueError, match=r"`decay` must be in \[0, 1\)"):
        update_loss_levels(None, torch.ones(2), decay=decay)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: update_loss_levels(torch.ones(3), torch.ones(2), 0.9), "same shape"),
        (lambda: update_loss_levels(None, torch.ones(2, 2), 0.9), "1-D"),
        (lambda: update_loss_levels(None, torch.tensor([1.0, math.nan]), 0.9), r"\[1\]"),
        (lambda: loss_scaling_weights(torch.tensor([-1.0, 1.0])), r">= 0.*indices \[0\]"),
        (lambda: loss_scaling_weights(torch.tensor([1.0, math.inf])), r"indices \[1\]"),
        (lambda: loss_scaling_weights(torch.ones(2, 1)), "1-D"),
        (lambda: loss_scaling_weights(torch.ones(2), eps=0.0), "`eps`"),
    ],
)
def test_invalid_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
