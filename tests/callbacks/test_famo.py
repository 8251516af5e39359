"""FAMO: its arguments, its re-evaluation (without gradients; one extra forward per optimizer
step; its one extra all-reduce is counted in the 2-process test of test_loss_based_common), the
tasks a logit update leaves out, and a restored state."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_lossagg.callbacks import FAMO
from tests.callbacks._fits import (
    OwnOptimizerStep,
    ParametersAfterEachStep,
    SignedPriceNet,
    signed_price_batches,
)
from tests.callbacks._loss_based import at_step, global_losses, trainer, training_batches
from tests.callbacks.test_every_method import WeightsSeen
from tests.models import PriceKindNet, ThreeTaskNet, make_batch, without_sold

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"lr": 0.0}, "`lr` must be > 0"),
        ({"lr": float("inf")}, "`lr` must be a finite number"),
        ({"weight_decay": -1e-3}, "`weight_decay` must be a finite number >= 0"),
        ({"weight_decay": "0"}, "`weight_decay` must be a number >= 0"),
        ({"eps": float("nan")}, "`eps` must be a finite number >= 0"),
    ],
)
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        FAMO(**arguments)


@pytest.mark.parametrize("name", ["weight_decay", "eps"])
def test_an_argument_of_0_is_accepted_where_0_is_allowed(name):
    assert FAMO(**{name: 0}).method_arguments[name] == 0.0


class CountingNet(ThreeTaskNet):
    def __init__(self) -> None:
        super().__init__()
        self.forward_calls = 0
        self.grad_enabled: list[bool] = []

    def forward(self, inputs):
        self.forward_calls += 1
        self.grad_enabled.append(torch.is_grad_enabled())
        return super().forward(inputs)


@pytest.mark.parametrize(("accumulate", "expected_forwards"), [(1, 8), (2, 4 + 2)])
def test_one_extra_forward_per_optimizer_step(accumulate, expected_forwards):
    model, callback = CountingNet().double(), FAMO()
    run = trainer([callback], max_epochs=1, accumulate_grad_batches=accumulate)
    run.fit(model, DataLoader(training_batches(4), batch_size=None))
    assert run.global_step == 4 // accumulate
    assert model.forward_calls == expected_forwards
    assert not torch.equal(callback.state_to_log()["logit"], torch.zeros(3, dtype=torch.float64))


def test_a_checkpoint_keeps_the_losses_after_the_step_still_to_be_checked(tmp_path):
    # Saved at the epoch's end, before the fit's end checked them: the resumed fit checks them
    # before its first step moves the model.
    batches = DataLoader(signed_price_batches(1, negative_at=99), batch_size=None)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = trainer([FAMO(), checkpoint], max_epochs=1, enable_checkpointing=True)
    with pytest.raises(ValueError, match="after the step at global step 0"):
        first.fit(PriceNegativeWhenEvaluatedAgain().double(), batches)
    model, after_step = PriceNegativeWhenEvaluatedAgain().double(), ParametersAfterEachStep()
    resumed = trainer([FAMO(), after_step], max_epochs=2)
    with pytest.raises(ValueError, match="after the step at global step 0"):
        resumed.fit(model, batches, ckpt_path=tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert after_step.parameters == []  # no step taken: the model is the checkpoint's
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())


def test_a_step_whose_last_micro_batch_is_left_out_gives_the_logits_no_update():
    # The last micro-batch is the one evaluated again: left out (drop_task, no task left in it:
    # price's loss infinite, no label of the others), it has no losses before the step.
    first, last = make_batch(6, seed=0), make_batch(6, seed=1)
    last[1]["price"][:] = torch.inf
    last[1]["kind"][:] = -100
    last[1]["sold"][:] = torch.nan
    model, famo, after_step = ThreeTaskNet().double(), FAMO(), ParametersAfterEachStep()
    model.nonfinite = "drop_task"
    before = {name: value.clone() for name, value in model.state_dict().items()}
    run = trainer([famo, after_step], max_epochs=1, accumulate_grad_batches=2)
    with pytest.warns(UserWarning, match="no task left"):
        run.fit(model, DataLoader([first, last], batch_size=None))
    assert run.global_step == 1 and not torch.equal(
        after_step.parameters[-1]["trunk.0.weight"], before["trunk.0.weight"]
    )
    assert famo.state_dict()["logits"]["steps"].tolist() == [0.0, 0.0, 0.0]


class OwnBeforeOptimizerStep(ThreeTaskNet):
    def on_before_optimizer_step(self, optimizer) -> None:  # logs gradient norms, say
        pass


def _logits_after_fit(model_class: type[ThreeTaskNet]) -> torch.Tensor:
    callback = FAMO()
    torch.manual_seed(0)
    model = model_class().double()
    trainer([callback], max_epochs=1).fit(model, DataLoader(training_batches(3), batch_size=None))
    return callback.state_dict()["logits"]["values"]


class OwnOptimizerStepToo(OwnOptimizerStep, OwnBeforeOptimizerStep):
    pass


def test_famo_learns_under_a_module_whose_on_before_optimizer_step_skips_super():
    # The steps FAMO learns from are known from the optimizer's own step(), not the module's hook.
    with pytest.warns(UserWarning, match=r"on_before_optimizer_step does not call super"):
        logits = _logits_after_fit(OwnBeforeOptimizerStep)
    assert bool(logits.ne(0.0).all())
    torch.testing.assert_close(logits, _logits_after_fit(ThreeTaskNet), rtol=0, atol=0)


def test_famo_learns_under_a_module_with_its_own_optimizer_step_too():
    logits = _logits_after_fit(OwnOptimizerStepToo)
    torch.testing.assert_close(logits, _logits_after_fit(ThreeTaskNet), rtol=0, atol=0)


def test_a_loss_at_or_below_minus_eps_is_refused_before_the_optimizer_step():
    # log(L + eps) has no value there: the weights would turn around and the logits become NaN.
    batches = signed_price_batches(3, negative_at=2)
    model, after_step, famo = SignedPriceNet().double(), ParametersAfterEachStep(), FAMO()
    with pytest.raises(ValueError, match=r"FAMO .* 'price' \(-[0-9.]+\).*global step 2"):
        trainer([famo, after_step], max_epochs=1).fit(model, DataLoader(batches, batch_size=None))
    assert len(after_step.parameters) == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, after_step.parameters[-1][name]), name  # step 2 never applied
    assert torch.isfinite(famo.state_to_log()["logit"]).all()


class PriceNegativeWhenEvaluatedAgain(SignedPriceNet):
    """The "price" loss is its target in training, minus its target in FAMO's re-evaluation
    (which runs without gradients)."""

    def per_sample_losses(self, predictions, targets):
        losses = super().per_sample_losses(predictions, targets)
        if not torch.is_grad_enabled():
            losses["price"] = losses["price"]._replace(values=-losses["price"].values)
        return losses


@pytest.mark.parametrize("num_batches", [3, 1], ids=["at the next step", "at the fit's end"])
def test_a_loss_at_or_below_minus_eps_after_the_step_is_refused_too(num_batches):
    # Left out of the step's logit update, refused before the next step moves the model.
    batches = signed_price_batches(num_batches, negative_at=99)
    model, after_step = PriceNegativeWhenEvaluatedAgain().double(), ParametersAfterEachStep()
    famo, seen = FAMO(), WeightsSeen()
    message = (
        r"evaluated again after .* 'price' \(-[0-9.]+\) was <= -eps after the step at global step 0"
    )
    with pytest.raises(ValueError, match=message):
        trainer([famo, after_step, seen], max_epochs=1).fit(model, DataLoader(batches, None))
    assert len(after_step.parameters) == 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, after_step.parameters[0][name]), name  # step 1 never applied
    assert famo.state_dict()["logits"]["steps"].tolist() == [0.0, 1.0, 1.0]
    assert torch.equal(model._fold_step_weights(), seen.weights[0])  # step 0's: it was taken


def _optimizer_step(callback, module, losses_before, batch=None):
    """One optimizer step of the hooks as Lightning calls them, the model's own update aside."""
    trainer = SimpleNamespace(
        global_step=0, precision_plugin=SimpleNamespace(train_step_context=contextlib.nullcontext)
    )
    callback.on_train_batch_start(trainer, module, batch, 0)
    callback.task_weights(module, losses_before)
    callback.on_before_optimizer_step(trainer, module, None)
    callback.on_train_batch_end(trainer, module, None, batch, 0)


@pytest.mark.parametrize(
    ("valid_before", "after"),
    [([True, True, True], [-0.5, 0.8, 0.9]), ([False, True, True], [0.5, 0.8, 0.9])],
    ids=["re-evaluated below -eps", "no valid sample before the step"],
)
def test_a_task_left_out_of_the_logit_update_keeps_its_logit_and_moments(valid_before, after):
    callback = FAMO()
    callback.setup(None, ThreeTaskNet(), "fit")
    module = at_step(0)
    module.compute_global_losses = lambda batch: global_losses(after)
    _optimizer_step(callback, module, global_losses([1.0, 1.0, 1.0], valid_before))
    state = callback.state_dict()["logits"]
    assert state["steps"].tolist() == [0.0, 1.0, 1.0]
    assert state["values"][0] == 0.0 and bool(state["values"][1:].ne(0.0).all())
    assert state["exp_avg"][0] == 0.0 and state["exp_avg_sq"][0] == 0.0


def test_with_eps_0_a_loss_of_exactly_0_is_refused_before_the_optimizer_step():
    callback = FAMO(eps=0.0)
    callback.setup(None, ThreeTaskNet(), "fit")
    module = at_step(1)
    callback.task_weights(module, global_losses([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"FAMO .* 'price' \(0\).*global step 1"):
        callback.on_before_optimizer_step(module.trainer, module, None)


def test_the_re_evaluation_runs_without_gradients():
    model = CountingNet().double()
    trainer([FAMO()], max_epochs=1).fit(model, DataLoader([make_batch(6, seed=0)], batch_size=None))
    assert model.grad_enabled == [True, False]


def test_a_state_saved_in_float32_resumes_in_the_dtype_of_the_losses():
    module = at_step(0)
    module.compute_global_losses = lambda batch: global_losses([0.5, 0.8, 0.9])
    saved = FAMO()
    saved.setup(None, ThreeTaskNet(), "fit")
    _optimizer_step(saved, module, global_losses([1.0, 1.0, 1.0]))
    logits = {name: value.float() for name, value in saved.state_dict()["logits"].items()}
    resumed = FAMO()
    resumed.setup(None, ThreeTaskNet(), "fit")
    resumed.load_state_dict({"logits": logits})
    weights = resumed.task_weights(module, global_losses([1.0, 2.0, 3.0]))
    assert weights.dtype == torch.float64
    assert torch.equal(resumed.state_to_log()["logit"], logits["values"].double())


def test_the_re_evaluation_runs_in_the_steps_precision():
    # With a learning rate of 0 the model does not move, so the losses after the step are the
    # losses before it, if both are computed alike: the decreases are 0 and (without weight
    # decay) the logits stay at 0. Re-evaluated outside the step's autocast, the after-losses
    # were float32 ones against bf16 ones before, and the logits moved on rounding.
    batches = [make_batch(8, seed=seed, dtype=torch.float32) for seed in range(3)]
    callback = FAMO(weight_decay=0.0)
    run = trainer([callback], max_epochs=1, precision="bf16-mixed")
    run.fit(ThreeTaskNet(lr=0.0), DataLoader(batches, batch_size=None))
    logits = callback.state_dict()["logits"]["values"]
    assert torch.equal(logits, torch.zeros_like(logits)), logits


def _famo_fit(model: ThreeTaskNet) -> tuple[FAMO, torch.Tensor, ThreeTaskNet]:
    callback, seen = FAMO(lr=0.5), WeightsSeen()
    batches = [make_batch(8, seed=seed) for seed in range(4)]
    if "sold" not in model.task_names:
        batches = without_sold(batches)
    trainer([callback, seen], max_epochs=3).fit(model, DataLoader(batches, batch_size=None))
    return callback, torch.stack(seen.weights), model


def test_a_task_of_weight_0_has_no_say_in_famos_weights_or_logits():
    # Task(weight=0) only watches a task: it takes no gradient, so its loss would hardly fall
    # and FAMO, which moves weight towards the tasks whose loss falls least, would hand it the
    # others' share. FAMO weighs the others as if it were not there.
    torch.manual_seed(0)
    watched = _famo_fit(ThreeTaskNet(sold_weight=0.0).double())
    torch.manual_seed(0)
    without = _famo_fit(PriceKindNet().double())
    (callback, weights, model), (callback_2, weights_2, model_2) = watched, without
    assert (weights[:, 2] == 0).all()
    assert len({tuple(w.tolist()) for w in weights_2}) > 1  # FAMO adapted
    torch.testing.assert_close(weights[:, :2], weights_2, rtol=1e-12, atol=0)
    logits = callback.state_to_log()["logit"]
    torch.testing.assert_close(logits[:2], callback_2.state_to_log()["logit"], rtol=1e-12, atol=0)
    assert logits[2] == 0  # never updated
    torch.testing.assert_close(model.trunk[0].weight, model_2.trunk[0].weight, rtol=1e-12, atol=0)
