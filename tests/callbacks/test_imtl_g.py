"""IMTL-G on real fits: the functional method on the Gramian made by hand; argument checks."""

import pytest

from lightning_lossagg.callbacks import IMTLG
from tests.callbacks._gradient_based import (
    METHODS,
    STATIC_WEIGHTS,
    check_fit_against_hand,
    reference_weights,
)


@pytest.mark.parametrize("rep_grad", [False, True])
def test_weights_and_update_follow_the_gradients_by_hand(rep_grad):
    callback = METHODS["imtl_g"](rep_grad=rep_grad)
    steps = check_fit_against_hand(callback, reference_weights("imtl_g", callback))
    for step in steps:  # alpha sums to 1 (times Task.weight)
        assert (step["weights"] / STATIC_WEIGHTS).sum().item() == pytest.approx(1.0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="'gradients' or 'gramian'"):
        IMTLG(sync="params")
    assert IMTLG(rep_grad=True).method_arguments == {"rep_grad": True, "sync": "gradients"}
