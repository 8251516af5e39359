"""PCGrad on real fits: projections of the Gramian made by hand, in the seeded per-step order."""

import pytest
import torch

from lightning_lossagg.callbacks import PCGrad
from lightning_lossagg.functional import pcgrad
from tests.callbacks._gradient_based import (
    METHODS,
    STATIC_WEIGHTS,
    HandStep,
    check_fit_against_hand,
    fit,
    reference_weights,
    training_batches,
)

# Seed 2's first batch: all three pairs conflict, so the projections depend on the order.
BATCHES_SEED = 2


@pytest.mark.parametrize("rep_grad", [False, True])
def test_weights_and_update_follow_the_gradients_by_hand_in_the_seeded_order(rep_grad):
    callback = METHODS["pcgrad"](rep_grad=rep_grad)
    steps = check_fit_against_hand(
        callback,
        reference_weights("pcgrad", callback),
        batches=training_batches(seed=BATCHES_SEED),
    )
    # The first step's weights depend on the order: another order would have failed the check.
    first = HandStep(steps[0]["before"], steps[0]["batch"], rep_grad)
    draws = {
        tuple(pcgrad(first.gramian, torch.Generator().manual_seed(seed)).tolist())
        for seed in range(10)
    }
    assert len(draws) > 1
    assert (steps[0]["weights"] != STATIC_WEIGHTS).any()  # something was projected


def test_the_orders_come_from_the_seed_and_the_step_not_the_global_generator():
    batches = training_batches(seed=BATCHES_SEED)
    torch.manual_seed(1)
    first, _ = fit(PCGrad(seed=5), batches, max_epochs=2)
    torch.manual_seed(2)
    second, _ = fit(PCGrad(seed=5), batches, max_epochs=2)
    for a, b in zip(first.steps, second.steps, strict=True):
        assert torch.equal(a["weights"], b["weights"])


def test_the_seed_is_the_state():
    callback = PCGrad(seed=7)
    assert callback.state_dict() == {"seed": 7}
    restored = PCGrad(seed=7)
    restored.load_state_dict({"seed": 7})
    assert restored.seed == 7
    assert restored.state_key == callback.state_key != PCGrad(seed=1).state_key


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_a_bad_seed_is_refused(seed):
    with pytest.raises(ValueError, match="`seed` must be an int >= 0"):
        PCGrad(seed=seed)
