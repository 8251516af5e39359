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
from tests.models import IN_FEATURES, ThreeTaskNet, make_batch


class NarrowThreeTaskNet(ThreeTaskNet):
    """A representation of 2 for 3 tasks: the task Jacobian has rank 2 at most."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, 2), torch.nn.Tanh())
        outputs = {"price": 1, "kind": 3, "sold": 1}
        self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(2, o) for n, o in outputs.items()})


class SeesGramians(AlignedMTL):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def weights_from_gramian(self, gramian):
        weights = super().weights_from_gramian(gramian)
        self.seen.append((gramian.clone(), weights.clone()))
        return weights


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


def test_a_float32_gramian_drops_its_rounding_eigenvalue():
    # K = 3 tasks, one sample, a 2-wide representation: the Gramian's third eigenvalue is float32
    # rounding, about 1e-7 of the largest. Cut at float64's eps it was kept as the smallest, and
    # the update shrank to that noise (1e-4 of LibMTL's, whose cut-off is the dtype's eps).
    torch.manual_seed(0)
    batches = [make_batch(1, seed=s, dtype=torch.float32) for s in range(12)]
    for step, (_, targets) in enumerate(batches):
        targets["price"][:] = 0.3 * step - 1.0  # every task labelled
    callback = SeesGramians(rep_grad=True)
    trainer = L.Trainer(
        callbacks=[callback],
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(NarrowThreeTaskNet(), loader(batches))
    assert callback.gramian_eps == torch.finfo(torch.float32).eps
    assert len(callback.seen) == len(batches)
    for gramian, weights in callback.seen:
        expected = aligned_mtl(gramian.float()).double()  # the cut-off of float32
        torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-6)
        update_norm = float(expected @ gramian @ expected) ** 0.5
        assert update_norm > 1e-2 * float(gramian.trace()) ** 0.5


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
