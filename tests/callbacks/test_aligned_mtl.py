"""Aligned-MTL on real fits: the functional method on the Gramian made by hand, every scale mode
and a preference vector; argument checks."""

import lightning as L
import pytest
import torch

from lightning_lossagg.callbacks import AlignedMTL
from lightning_lossagg.functional import aligned_mtl
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
    callback = METHODS["aligned_mtl"](rep_grad=rep_grad)
    check_fit_against_hand(callback, reference_weights("aligned_mtl", callback))


@pytest.mark.parametrize("scale_mode", ["median", "rmse"])
def test_the_scale_mode_and_the_preferences_reach_the_method(scale_mode):
    preferences = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)

    def weights(hand, global_step):
        return on_valid(
            lambda g, p: aligned_mtl(g, p, scale_mode=scale_mode),
            hand.valid,
            hand.gramian,
            preferences,
        )

    callback = AlignedMTL(pref_vector=preferences.tolist(), scale_mode=scale_mode)
    check_fit_against_hand(callback, weights)


def test_a_preference_vector_of_the_wrong_length_is_refused_at_setup():
    trainer = L.Trainer(
        callbacks=[AlignedMTL(pref_vector=[1.0] * 4)],
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(ValueError, match="4 entries for the model's 3 tasks"):
        trainer.fit(ThreeTaskNet(), loader(training_batches(1)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale_mode": "max"}, "'min', 'median' or 'rmse'"),
        ({"pref_vector": [1.0, float("nan"), 1.0]}, "one finite number per task"),
        ({"pref_vector": [0.0, 0.0]}, "a preference per task: every entry must be >= 0 and at"),
        ({"pref_vector": [2.0, -1.0]}, "a preference per task: every entry must be >= 0"),
        ({"sync": "params"}, "'gradients' or 'gramian'"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlignedMTL(**kwargs)
