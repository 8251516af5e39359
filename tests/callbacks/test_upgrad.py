"""UPGrad on real fits: the functional method on the Gramian made by hand, with and without a
preference vector; argument checks."""

import lightning as L
import pytest
import torch

from lightning_lossagg.callbacks import UPGrad
from lightning_lossagg.functional import upgrad
from tests.callbacks._gradient_based import (
    METHODS,
    check_fit_against_hand,
    loader,
    on_valid,
    reference_weights,
    training_batches,
)
from tests.models import ThreeTaskNet


@pytest.mark.parametrize("rep_grad", [False, True])
def test_weights_and_update_follow_the_gradients_by_hand(rep_grad):
    callback = METHODS["upgrad"](rep_grad=rep_grad)
    check_fit_against_hand(callback, reference_weights("upgrad", callback))


def test_the_preferences_of_the_valid_tasks_reach_the_method():
    preferences = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)

    def weights(hand, global_step):
        return on_valid(
            lambda g, p: upgrad(g, p, reg_eps=1e-3), hand.valid, hand.gramian, preferences
        )

    check_fit_against_hand(UPGrad(pref_vector=[0.5, 0.3, 0.2], reg_eps=1e-3), weights)


def test_norm_eps_reaches_the_method():
    # Every Gramian of the fit counts as zero under norm_eps=1e9: the weights are the
    # (uniform) preferences, where the default solves the QP.
    def weights(hand, global_step):
        assert float(hand.gramian.trace()) < 1e9
        return on_valid(lambda g: upgrad(g, norm_eps=1e9), hand.valid, hand.gramian)

    check_fit_against_hand(UPGrad(norm_eps=1e9), weights)


def test_a_preference_vector_of_the_wrong_length_is_refused_at_setup():
    trainer = L.Trainer(
        callbacks=[UPGrad(pref_vector=[1.0, 2.0])],
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="2 entries for the model's 3 tasks"):
        trainer.fit(ThreeTaskNet(), loader(training_batches(1)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pref_vector": [1.0, float("inf"), 1.0]}, "one finite number per task"),
        ({"pref_vector": []}, "one finite number per task"),
        ({"pref_vector": "1,1,1"}, "a list of numbers"),
        ({"pref_vector": [0, 0, 0]}, "a preference per task: every entry must be >= 0 and at"),
        ({"pref_vector": [1.0, -0.5, 1.0]}, "a preference per task: every entry must be >= 0"),
        ({"reg_eps": 0.0}, "`reg_eps` must be > 0"),
        ({"norm_eps": -1.0}, "`norm_eps` must be a finite number >= 0"),
        ({"sync": "params"}, "'gradients' or 'gramian'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UPGrad(**kwargs)
