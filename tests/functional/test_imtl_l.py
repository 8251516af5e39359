import math

import pytest
import torch
from torch.testing import assert_close
from torchjd.scalarization import IMTLL

from lightning_lossagg.functional.imtl_l import imtl_l_objective, imtl_l_weights
from lightning_lossagg.functional.uncertainty import uncertainty_objective


def test_matches_torchjd_imtll_value_and_gradients():
    generator = torch.Generator().manual_seed(4)
    losses = torch.rand(3, generator=generator) * 2 + 0.1
    log_scales = torch.randn(3, generator=generator)
    scalarizer = IMTLL(3)
    with torch.no_grad():
        scalarizer.log_scale.copy_(log_scales)
    reference_losses = losses.clone().requires_grad_()
    reference = scalarizer(reference_losses)
    reference.backward()

    ours_log_scales = log_scales.clone().requires_grad_()
    ours = imtl_l_objective(losses, ours_log_scales)
    ours.backward()

    assert_close(ours, reference.detach())
    assert_close(imtl_l_weights(log_scales), reference_losses.grad)
    assert_close(ours_log_scales.grad, scalarizer.log_scale.grad)


def test_hand_worked_example():
    # s = [0, ln 2], L = [3, 1]: weights e^s = [1, 2]; objective 3 + 2 - ln 2.
    log_scales = torch.tensor([0.0, math.log(2)])
    assert_close(imtl_l_weights(log_scales), torch.tensor([1.0, 2.0]))
    assert_close(
        imtl_l_objective(torch.tensor([3.0, 1.0]), log_scales), torch.tensor(5.0 - math.log(2))
    )


def test_optimum_scales_every_loss_to_one():
    losses = torch.tensor([0.25, 1.0, 8.0])
    optimum = (-torch.log(losses)).requires_grad_()
    imtl_l_objective(losses, optimum).backward()
    assert_close(optimum.grad, torch.zeros(3))
    assert_close(imtl_l_weights(optimum) * losses, torch.ones(3))


def test_is_twice_uncertainty_weighting_at_the_negated_parameter():
    losses = torch.tensor([0.5, 2.0, 3.0])
    log_scales = torch.tensor([0.3, -1.2, 0.7])
    assert_close(
        imtl_l_objective(losses, log_scales), 2 * uncertainty_objective(losses, -log_scales)
    )


def test_weights_are_detached():
    assert not imtl_l_weights(torch.zeros(2, requires_grad=True)).requires_grad


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: imtl_l_weights(torch.zeros(1, 2)), "1-D floating"),
        (lambda: imtl_l_weights(torch.tensor([math.nan, 0.0])), r"indices \[0\]"),
        (lambda: imtl_l_objective(torch.ones(2), torch.zeros(3)), "shape of `log_scales`"),
        (lambda: imtl_l_objective(torch.tensor([1.0, math.inf]), torch.zeros(2)), r"\[1\]"),
    ],
)
def test_invalid_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
