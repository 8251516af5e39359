import math

import pytest
import torch
from torch.testing import assert_close
from torchjd.scalarization import FAMO

from lightning_lossagg.functional.famo import famo_logit_gradient, famo_weights


def _torchjd_famo(logits: torch.Tensor, min_losses: torch.Tensor) -> FAMO:
    scalarizer = FAMO(logits.shape[0], min_losses=min_losses.clone())
    (scalarizer_logits,) = scalarizer.parameters()
    with torch.no_grad():
        scalarizer_logits.copy_(logits)
    return scalarizer


def test_weights_match_torchjd_famo_gradient():
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(4, generator=generator)
    min_losses = torch.rand(4, generator=generator) * 0.1
    losses = torch.rand(4, generator=generator) * 3 + 0.2
    values = losses.clone().requires_grad_()
    _torchjd_famo(logits, min_losses)(values).backward()
    assert_close(famo_weights(logits, losses, min_losses), values.grad)


def test_logit_gradient_with_adam_reproduces_torchjd_famo_updates():
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(3, generator=generator)
    min_losses = torch.zeros(3)
    scalarizer = _torchjd_famo(logits, min_losses)
    ours = logits.clone().requires_grad_()
    optimizer = torch.optim.Adam([ours], lr=0.025, weight_decay=1e-3)
    for _ in range(3):
        before = torch.rand(3, generator=generator) + 0.5
        after = before * (torch.rand(3, generator=generator) * 0.5 + 0.5)
        ours.grad = famo_logit_gradient(ours, before, after, min_losses)
        optimizer.step()
        scalarizer(before)
        scalarizer.update(after)
    assert_close(ours.detach(), next(scalarizer.parameters()).detach())


@pytest.mark.parametrize(
    ("logits", "weights"),
    [
        # z = [1/2, 1/2]: z / L = [1/2, 1/6], normalised [3/4, 1/4].
        ([0.0, 0.0], [0.75, 0.25]),
        # z = [3/4, 1/4]: z / L = [3/4, 1/12], normalised [9/10, 1/10].
        ([math.log(3), 0.0], [0.9, 0.1]),
    ],
)
def test_weights_hand_worked_example(logits, weights):
    result = famo_weights(torch.tensor(logits), torch.tensor([1.0, 3.0]), eps=0.0)
    assert_close(result, torch.tensor(weights))


def test_logit_gradient_hand_worked_example():
    # z = [1/2, 1/2], δ = [1, 0]: g = z ⊙ (δ - z·δ) = [1/4, -1/4].
    before = torch.tensor([1.0, 1.0])
    after = torch.tensor([math.exp(-1), 1.0])
    gradient = famo_logit_gradient(torch.zeros(2), before, after, eps=0.0)
    assert_close(gradient, torch.tensor([0.25, -0.25]))


def test_min_losses_shift_the_losses():
    logits, losses, bounds = (
        torch.tensor([0.2, -0.4]),
        torch.tensor([1.5, 2.5]),
        torch.tensor([0.5, 1.0]),
    )
    assert_close(
        famo_weights(logits, losses, bounds, eps=0.0),
        famo_weights(logits, losses - bounds, eps=0.0),
    )


def test_outputs_sum_to_one_and_zero_and_are_detached():
    logits = torch.tensor([0.1, -0.3, 0.8], requires_grad=True)
    losses = torch.tensor([0.4, 1.0, 2.2], requires_grad=True)
    weights = famo_weights(logits, losses)
    gradient = famo_logit_gradient(logits, losses, losses * 0.9)
    assert_close(weights.sum(), torch.tensor(1.0))
    assert_close(gradient.sum(), torch.tensor(0.0), atol=1e-7, rtol=0)
    assert not weights.requires_grad and not gradient.requires_grad


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: famo_weights(torch.zeros(2), torch.tensor([1.0, -1.0])), r"indices \[1\]"),
        (
            lambda: famo_weights(torch.zeros(2), torch.ones(2), torch.tensor([2.0, 0.0])),
            r"above `min_losses`.*indices \[0\]",
        ),
        (lambda: famo_weights(torch.zeros(2), torch.tensor([math.nan, 1.0])), r"indices \[0\]"),
        (lambda: famo_weights(torch.tensor([0.0, math.inf]), torch.ones(2)), "`logits`"),
        (lambda: famo_weights(torch.zeros(3), torch.ones(2)), "shape"),
        (lambda: famo_weights(torch.zeros(2), torch.ones(2), torch.zeros(3)), "`min_losses`"),
        (lambda: famo_weights(torch.zeros(2), torch.ones(2), eps=-1.0), "`eps`"),
        (
            lambda: famo_logit_gradient(torch.zeros(2), torch.ones(2), torch.tensor([1.0, -2.0])),
            r"`losses_after`.*indices \[1\]",
        ),
        (
            lambda: famo_logit_gradient(torch.zeros(2), torch.ones(2), torch.ones(3)),
            "`losses_after` must have the shape",
        ),
    ],
)
def test_invalid_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("losses", "min_losses", "eps"),
    [
        ([0.0, 1.0], None, 0.0),  # L - b + eps = 0 exactly: log(0) = -inf
        ([2.0, 1.0], [2.0, 0.0], 0.0),  # a loss exactly at its bound
    ],
    ids=["zero loss, eps=0", "loss at its bound"],
)
def test_a_loss_exactly_at_its_bound_minus_eps_is_refused(losses, min_losses, eps):
    # The docs promise L > b - eps: at equality the logarithm is -inf and the weights NaN/inf.
    losses = torch.tensor(losses)
    bounds = None if min_losses is None else torch.tensor(min_losses)
    with pytest.raises(ValueError, match=r"indices \[0\]"):
        famo_weights(torch.zeros(2), losses, bounds, eps=eps)
    with pytest.raises(ValueError, match=r"indices \[0\]"):
        famo_logit_gradient(torch.zeros(2), torch.full((2,), 3.0), losses, bounds, eps=eps)
