"""CAGrad on real fits: the functional method on the Gramian made by hand; argument checks."""

import numpy as np
import pytest
import torch

from lightning_lossagg.callbacks import CAGrad
from lightning_lossagg.functional import cagrad
from tests.callbacks._gradient_based import (
    METHODS,
    check_fit_against_hand,
    on_valid,
    reference_weights,
)


@pytest.mark.parametrize("rep_grad", [False, True])
def test_weights_and_update_follow_the_gradients_by_hand(rep_grad):
    callback = METHODS["cagrad"](rep_grad=rep_grad)
    assert (callback.c, callback.rescale) == (0.5, 1)  # LibMTL's defaults
    check_fit_against_hand(callback, reference_weights("cagrad", callback))


@pytest.mark.parametrize(("c", "rescale"), [(0.2, 0), (1.0, 2)])
def test_the_radius_and_the_rescaling_reach_the_method(c, rescale):
    def weights(hand, global_step):
        return on_valid(lambda g: cagrad(g, c=c, rescale=rescale), hand.valid, hand.gramian)

    check_fit_against_hand(CAGrad(c=c, rescale=rescale), weights)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"c": -0.1}, "`c` must be a finite number >= 0"),
        ({"c": float("nan")}, "`c` must be a finite number >= 0"),
        ({"c": "0.5"}, "`c` must be a finite number >= 0"),
        ({"rescale": 3}, "`rescale` must be 0, 1 or 2"),
        ({"rescale": True}, "`rescale` must be 0, 1 or 2"),
        ({"sync": "params"}, "'gradients' or 'gramian'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CAGrad(**kwargs)


# Two of three gradients nearly collinear: from the guess [True, True, False] and from none the
# search ends in the last bits apart (where it meets near-singular supports).
NEARLY_COLLINEAR = [
    [-2.264389272269148, 0.27613553549872516, -0.3029168692678301],
    [-1.4558299543006787, 0.17753413262699397, -0.19475250392474316],
    [0.7385810475760275, 1.6395821782157807, -0.4548851431271364],
]


def test_the_previous_steps_support_is_saved_and_restored():
    # A fit resumed from a checkpoint starts its first search where the uninterrupted one does.
    jacobian = torch.tensor(NEARLY_COLLINEAR, dtype=torch.float64)
    gramian = jacobian @ jacobian.T
    uninterrupted = CAGrad(c=0.9)
    uninterrupted.load_state_dict({"support": torch.tensor([True, True, False])})
    resumed = CAGrad(c=0.9)
    resumed.load_state_dict(uninterrupted.state_dict())
    expected = uninterrupted.weights_from_gramian(gramian)
    assert torch.equal(resumed.weights_from_gramian(gramian), expected)
    assert not torch.equal(CAGrad(c=0.9).weights_from_gramian(gramian), expected)  # it matters
    assert torch.equal(resumed.state_dict()["support"], uninterrupted.state_dict()["support"])
    CAGrad().load_state_dict({})  # a checkpoint of an earlier version: a cold start


def test_a_step_that_leaves_no_trace_puts_the_support_back():
    method = CAGrad(c=0.9)
    method.load_state_dict({"support": torch.tensor([True, True, False])})
    before = method.step_state()
    jacobian = torch.tensor(NEARLY_COLLINEAR, dtype=torch.float64)
    method.weights_from_gramian(jacobian @ jacobian.T)
    assert not np.array_equal(method.step_state(), before)
    method.put_back_step_state(before)
    assert method.state_dict()["support"].tolist() == [True, True, False]
