"""One callback instance used for two fits: the second, resumed from a checkpoint, continues
exactly as a fresh instance resumed from it does. Lightning loads the checkpoint's state into the
instance it is given; whatever the instance derived from its earlier state (cached weights, the
weights of the current period, pending losses) must not outlive the load."""

import re
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.callbacks._fits import assert_nested_equal, loader, trainer, training_batches
from tests.callbacks.test_checkpoint_task_order import CALLBACKS, STATEFUL
from tests.callbacks.test_every_method import METHODS, WeightsSeen
from tests.models import PriceKindNet, ThreeTaskNet, without_sold

CHECKPOINT_STEP, STEPS = 5, 7


def _fit(callbacks: list, seed: int = 0, **kwargs) -> ThreeTaskNet:
    torch.manual_seed(0)
    model = ThreeTaskNet().double()
    run = trainer(callbacks, max_epochs=1, **kwargs.pop("trainer", {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.fit(model, loader(training_batches(STEPS, seed=seed)), **kwargs)
    return model


def _resumed(callback: L.Callback, path: str) -> tuple:
    seen = WeightsSeen()
    model = _fit([callback, seen], ckpt_path=path)
    return seen.weights, callback.state_dict(), model.state_dict()


@pytest.mark.parametrize("name", STATEFUL)
def test_a_used_instance_resumes_as_a_fresh_one(tmp_path, name):
    saving = ModelCheckpoint(tmp_path, "step", every_n_train_steps=CHECKPOINT_STEP)
    options = {"max_steps": CHECKPOINT_STEP, "enable_checkpointing": True}
    _fit([CALLBACKS[name](), saving], trainer=options)
    expected = _resumed(CALLBACKS[name](), saving.best_model_path)
    used = CALLBACKS[name]()
    _fit([used], seed=50)  # other batches: other state, other cached weights
    actual = _resumed(used, saving.best_model_path)
    assert actual[0], "the resumed fit trained no step"
    assert_nested_equal(actual, expected)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_an_instance_used_again_for_other_tasks_trains_or_says_to_create_a_new_one(name):
    # A sweep over task subsets with one callbacks list: the second fit either trains with the
    # new tasks or is refused at its start with the fix, never fails inside a step.
    used = METHODS[name]()
    _fit([used])
    model, seen = PriceKindNet().double(), WeightsSeen()
    run = trainer([used, seen], max_epochs=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run.fit(model, loader(without_sold(training_batches(STEPS))))
    except ValueError as error:
        method = type(used).__name__
        assert re.search(f"This {method} (already )?holds .*create a new {method}", str(error))
        assert not seen.weights  # refused before any step
    else:
        assert len(seen.weights) == STEPS and all(w.shape == (2,) for w in seen.weights)
