"""CAGrad on real fits: the functional method on the Gramian made by hand; argument checks."""

import pytest

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
