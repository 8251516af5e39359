"""An optimizer step that is refused (a non-finite loss, a loss the method cannot take), skipped
or cut short by an exception leaves nothing behind, also across a checkpoint saved amid it: the
state of every method whose state moves within a step (a level, a period's sums, an accumulated
gradient, its own optimizer's update) and the model's evaluation weights are as after the step
before, so that a fit started again with the same callback (a notebook's second ``trainer.fit``)
goes on from there."""

import functools
import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lossagg import NonFiniteLossError
from lightning_lossagg.callbacks import (
    DBMTL,
    DWA,
    FAMO,
    GLS,
    IMTLL,
    MGDA,
    GradNorm,
    GradVac,
    LossScaling,
    NashMTL,
    UncertaintyWeighting,
)
from tests.callbacks._fits import SignedPriceNet, signed_price_batches, trainer
from tests.callbacks._loss_based import assert_nested_equal

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STATEFUL = {
    "DWA": lambda: DWA(window_steps=1),
    "LossScaling": lambda: LossScaling(decay=0.5),
    "UncertaintyWeighting": lambda: UncertaintyWeighting(lr=0.1),
    "IMTLL": lambda: IMTLL(lr=0.1),
    "FAMO": FAMO,
    "GradNorm": lambda: GradNorm(lr=0.1),
    "NashMTL": NashMTL,
    "GradVac": GradVac,
    "DBMTL": DBMTL,
}
# Methods without a state of their own that refuse some losses: what they put back is the model's
# evaluation weights.
STATELESS_BUT_BOUNDED = {
    'MGDA(normalization="loss")': lambda: MGDA(normalization="loss"),
    "GLS": GLS,  # stateless but for its queue of losses to check
}
# nonfinite policy of the model, and its max_consecutive_skips (1: the skip is an error)
POLICIES = {"raise": ("raise", 10), "skip": ("skip", 10), "a run of skips": ("skip", 1)}


def _fit(
    name: str,
    batches: list,
    nonfinite: str = "raise",
    max_skips: int = 10,
    extra_callbacks: tuple[L.Callback, ...] = (),
    model_class: type[SignedPriceNet] = SignedPriceNet,
    ckpt_path: Path | None = None,
) -> tuple:
    """The method's state and the model's evaluation weights after a fit of ``batches``, two
    micro-batches per optimizer step, and what the fit raised (``None``: nothing)."""
    method = {**STATEFUL, **STATELESS_BUT_BOUNDED}[name]()
    torch.manual_seed(0)
    model = model_class().double()
    model.nonfinite, model.max_consecutive_skips = nonfinite, max_skips
    raised = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "The step was skipped"
            trainer([method, *extra_callbacks], max_epochs=1, accumulate_grad_batches=2).fit(
                model, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path
            )
    except (NonFiniteLossError, ValueError, MemoryError) as error:
        raised = error
    return method.state_dict(), model._fold_step_weights(), raised


@functools.cache
def _after_the_first_step(name: str) -> tuple:
    return _fit(name, signed_price_batches(2, negative_at=-1))


def _assert_as_after_the_first_step(name: str, state: dict, weights: torch.Tensor) -> None:
    """The method's state and the evaluation weights are those of a fit of step 0 alone."""
    expected_state, expected_weights, _ = _after_the_first_step(name)
    assert_nested_equal(state, expected_state)
    torch.testing.assert_close(weights, expected_weights, rtol=0, atol=0)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("bad", [2, 3], ids=["first micro-batch", "second micro-batch"])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_step_with_a_non_finite_loss_leaves_the_state_of_the_step_before(name, bad, policy):
    # Batches 2 and 3 make optimizer step 1; one of them has an infinite price loss. Raised or
    # skipped, the step's finite micro-batch (and, raised, the method's update at the optimizer
    # step) must leave no trace.
    batches = signed_price_batches(4, negative_at=-1)
    batches[bad][1]["price"][:] = torch.inf
    state, weights, raised = _fit(name, batches, *POLICIES[policy])
    if policy == "skip":
        assert raised is None
    else:
        assert isinstance(raised, NonFiniteLossError) and "global step 1" in str(raised)
    _assert_as_after_the_first_step(name, state, weights)


BOUNDED = [
    *(name for name in STATEFUL if name not in ("GradNorm", "NashMTL", "GradVac")),
    *STATELESS_BUT_BOUNDED,
]


@pytest.mark.parametrize("name", BOUNDED)
def test_a_step_with_a_loss_the_method_cannot_take_leaves_the_state_of_the_step_before(name):
    # Micro-batch 3, the second of optimizer step 1, has a price loss < 0, which each of these
    # methods refuses (at the optimizer step; MGDA in its backward), after the step's first
    # micro-batch moved the state and the evaluation weights.
    state, weights, raised = _fit(name, signed_price_batches(4, negative_at=3))
    assert isinstance(raised, ValueError)
    assert re.search(r"price.* at global step 1", str(raised))
    _assert_as_after_the_first_step(name, state, weights)


class SaveAt(L.Callback):
    """Saves a checkpoint after batch ``batch_index``."""

    def __init__(self, batch_index: int, path: Path) -> None:
        self.batch_index, self.path = batch_index, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_index:
            trainer.save_checkpoint(self.path)


def _saved_amid_step_one(name: str, tmp_path: Path, bad: int = 3, nonfinite: str = "raise"):
    """Four batches, an infinite price loss in batch ``bad``, and the checkpoint of a fit with
    ``name`` saved after batch 2, the first micro-batch of step 1."""
    batches = signed_price_batches(4, negative_at=-1)
    batches[bad][1]["price"][:] = torch.inf
    path = tmp_path / "amid.ckpt"
    _fit(name, batches, nonfinite, extra_callbacks=(SaveAt(2, path),))
    return batches, path


@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_step_refused_after_a_resume_amid_it_leaves_the_state_of_the_step_before(
    name, policy, tmp_path
):
    # Saved after micro-batch 2, the first of step 1 (a time-based checkpoint, say): the fit
    # resumed from there meets the non-finite micro-batch 3. What step 1's first micro-batch moved
    # must go as well, though this fit never saw it.
    batches, path = _saved_amid_step_one(name, tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["lossagg"]["before_step"]["weighting"] is not None
    state, weights, raised = _fit(name, batches[3:], policy, ckpt_path=path)
    assert isinstance(raised, NonFiniteLossError) == (policy == "raise")
    _assert_as_after_the_first_step(name, state, weights)


# MGDA refuses a loss in that micro-batch's backward, before any checkpoint after it.
REFUSED_AT_THE_OPTIMIZER_STEP = [name for name in BOUNDED if not name.startswith("MGDA")]


@pytest.mark.parametrize("name", REFUSED_AT_THE_OPTIMIZER_STEP)
def test_a_loss_the_method_cannot_take_before_a_checkpoint_amid_the_step_is_refused_after_it(
    name, tmp_path
):
    # Micro-batch 2, the first of step 1, has a price loss < 0, refused at the optimizer step;
    # the checkpoint comes right after it. The fit resumed from there never sees that loss, yet
    # must refuse step 1 as the uninterrupted fit does, and leave the state of step 0.
    batches, path = signed_price_batches(4, negative_at=2), tmp_path / "amid.ckpt"
    *_, uninterrupted = _fit(name, batches, extra_callbacks=(SaveAt(2, path),))
    state, weights, resumed = _fit(name, batches[3:], ckpt_path=path)
    for raised in (uninterrupted, resumed):
        assert isinstance(raised, ValueError)
        assert re.search(r"'price' \(-[0-9.]+\).* at global step 1", str(raised))
    _assert_as_after_the_first_step(name, state, weights)


def test_a_resume_amid_a_step_with_another_method_takes_its_first_batch_as_the_start(tmp_path):
    # The state kept is DWA's: LossScaling starts afresh, and a refused step puts back what the
    # resumed fit's first batch found.
    batches, path = _saved_amid_step_one("DWA", tmp_path)
    state, _, raised = _fit("LossScaling", batches[3:], ckpt_path=path)
    assert isinstance(raised, NonFiniteLossError)
    fresh = LossScaling(decay=0.5).state_dict()
    assert_nested_equal(state, fresh)


@pytest.mark.parametrize("name", ["DWA", "UncertaintyWeighting"])
def test_a_step_skipped_before_a_checkpoint_amid_it_is_skipped_after_the_resume(name, tmp_path):
    # Micro-batch 2, the first of step 1, is non-finite; the checkpoint comes right after it.
    batches, path = _saved_amid_step_one(name, tmp_path, bad=2, nonfinite="skip")
    state, weights, _ = _fit(name, batches[3:], "skip", ckpt_path=path)
    _assert_as_after_the_first_step(name, state, weights)


class SkipCounts(L.Callback):
    """The model's count of skipped steps and of consecutive ones at the fit's end."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.counts = (pl_module.skipped_steps, pl_module._consecutive_skips)


@pytest.mark.parametrize("bad", [(2,), (2, 3)], ids=["first micro-batch", "both micro-batches"])
def test_a_resume_amid_a_skipped_step_counts_it_once_as_an_uninterrupted_fit(bad, tmp_path):
    # Step 1 is skipped for its non-finite micro-batch 2 (and 3); the checkpoint comes right
    # after micro-batch 2. The resumed fit must know the step is already a non-finite one: not
    # count it again at micro-batch 3, nor take it for a finite step that ends the run of skips.
    batches = signed_price_batches(4, negative_at=-1)
    for index in bad:
        batches[index][1]["price"][:] = torch.inf
    path, uninterrupted, resumed = tmp_path / "amid.ckpt", SkipCounts(), SkipCounts()
    _fit("DWA", batches, "skip", extra_callbacks=(SaveAt(2, path), uninterrupted))
    _fit("DWA", batches[3:], "skip", extra_callbacks=(resumed,), ckpt_path=path)
    assert uninterrupted.counts == (1, 1)
    assert resumed.counts == uninterrupted.counts


def test_a_resume_amid_a_step_without_the_methods_saved_state_starts_it_afresh(tmp_path):
    # The error for a checkpoint of other tasks advises deleting the method's state from it: the
    # method then starts afresh, and a refused step must not load the state kept from before it.
    batches, path = _saved_amid_step_one("LossScaling", tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["callbacks"][LossScaling(decay=0.5).state_key]
    torch.save(checkpoint, path)
    state, _, raised = _fit("LossScaling", batches[3:], ckpt_path=path)
    assert isinstance(raised, NonFiniteLossError)
    assert_nested_equal(state, LossScaling(decay=0.5).state_dict())


def test_a_weights_only_checkpoint_amid_a_step_holds_no_method_state(tmp_path):
    # It cannot resume a fit: DB-MTL's buffer (K x the shared parameters) has no place in it.
    path = tmp_path / "weights.ckpt"

    class SaveWeightsAt(SaveAt):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == self.batch_index:
                trainer.save_checkpoint(self.path, weights_only=True)

    _fit(
        "DBMTL", signed_price_batches(4, negative_at=-1), extra_callbacks=(SaveWeightsAt(2, path),)
    )
    saved = torch.load(path, weights_only=True)["lossagg"]
    assert "latest_weights" in saved and "before_step" not in saved


class OutOfMemoryAt(L.Callback):
    """Raises ``MemoryError`` in hook ``hook`` of batch ``batch_index``, as an allocation that
    fails there would (the error a notebook user meets before trying a smaller batch)."""

    def __init__(self, batch_index: int, hook: str) -> None:
        self.batch_index, self.hook = batch_index, hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.current = batch_idx

    def on_after_backward(self, trainer, pl_module) -> None:
        self._fail_in("on_after_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._fail_in("on_before_optimizer_step")

    def _fail_in(self, hook: str) -> None:
        if self.current == self.batch_index and hook == self.hook:
            raise MemoryError(f"out of memory in {hook} (raised by the test)")


@pytest.mark.parametrize(
    ("failing", "hook"),
    [(2, "on_after_backward"), (3, "on_after_backward"), (3, "on_before_optimizer_step")],
    ids=["backward of micro-batch 1", "backward of micro-batch 2", "after the method's update"],
)
@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_step_cut_short_by_an_exception_leaves_the_state_of_the_step_before(name, failing, hook):
    # The last case fails in a callback after the method's own on_before_optimizer_step (UW's,
    # IMTL-L's and GradNorm's update of their learned values), before the optimizer's step.
    batches = signed_price_batches(4, negative_at=-1)
    failure = OutOfMemoryAt(failing, hook)
    state, weights, raised = _fit(name, batches, extra_callbacks=(failure,))
    assert isinstance(raised, MemoryError)
    _assert_as_after_the_first_step(name, state, weights)


class FailsBeforeItsOptimizerSteps(SignedPriceNet):
    def on_before_optimizer_step(self, optimizer) -> None:  # measures the gradients, say
        super().on_before_optimizer_step(optimizer)
        if self.trainer.global_step == 1:
            raise MemoryError("out of memory in on_before_optimizer_step (raised by the test)")


@pytest.mark.parametrize("name", list(STATEFUL))
def test_an_exception_in_the_modules_hook_before_the_optimizer_steps_leaves_the_step_before(name):
    # The module's own on_before_optimizer_step runs after the mixin's part of it and every
    # callback's, but the optimizer has not stepped: the model has not moved, nor may the method.
    batches = signed_price_batches(4, negative_at=-1)
    state, weights, raised = _fit(name, batches, model_class=FailsBeforeItsOptimizerSteps)
    assert isinstance(raised, MemoryError)
    _assert_as_after_the_first_step(name, state, weights)


def test_an_exception_after_the_optimizer_step_keeps_the_step():
    # The model moved: so does the method's state (DWA closed its first period at step 1).
    batches = signed_price_batches(4, negative_at=-1)

    class FailsAtTheEnd(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 3:
                raise MemoryError("raised by the test after the optimizer step")

    state, weights, raised = _fit("DWA", batches, extra_callbacks=(FailsAtTheEnd(),))
    assert isinstance(raised, MemoryError)
    complete_state, complete_weights, _ = _fit("DWA", batches)
    assert_nested_equal(state, complete_state)
    torch.testing.assert_close(weights, complete_weights, rtol=0, atol=0)
    with pytest.raises(AssertionError):
        assert_nested_equal(state, _after_the_first_step("DWA")[0])


class OwnAfterBackward(SignedPriceNet):
    def on_after_backward(self) -> None:  # logs something, say, and forgets super()
        pass


@pytest.mark.parametrize("name", list(STATEFUL))
def test_an_on_after_backward_without_super_still_leaves_the_state_of_the_step_before(name):
    # The check then runs in the module's on_before_optimizer_step, after the callbacks': what
    # a method moved there (UW's, IMTL-L's and GradNorm's own update) is put back with the rest.
    batches = signed_price_batches(4, negative_at=-1)
    batches[3][1]["price"][:] = torch.inf
    state, weights, raised = _fit(name, batches, model_class=OwnAfterBackward)
    assert isinstance(raised, NonFiniteLossError)
    _assert_as_after_the_first_step(name, state, weights)


def test_an_on_after_backward_without_super_is_warned_of():
    batches = signed_price_batches(2, negative_at=-1)
    batches[1][1]["price"][:] = torch.inf
    with (
        pytest.warns(UserWarning, match=r"super\(\).on_after_backward\(\)"),
        pytest.raises(NonFiniteLossError),
    ):
        trainer([], max_epochs=1).fit(
            OwnAfterBackward().double(), DataLoader(batches, batch_size=None)
        )


def test_no_callback_sees_the_optimizer_step_of_a_step_with_a_non_finite_loss():
    # The error comes right after the backward: gradient clipping, a method's own update, any
    # callback's on_before_optimizer_step never meet the step.
    class OptimizerSteps(L.Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.steps.append(trainer.global_step)

    batches = signed_price_batches(3, negative_at=-1)
    batches[1][1]["price"][:] = torch.inf
    seen = OptimizerSteps()
    with pytest.raises(NonFiniteLossError, match=r"task 'price' on rank\(s\) 0"):
        trainer([seen], max_epochs=1).fit(
            SignedPriceNet().double(), DataLoader(batches, batch_size=None)
        )
    assert seen.steps == [0]
