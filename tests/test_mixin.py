"""MultiTaskMixin on one process: steps, weighting interface, bad input and non-finite losses."""

import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lossagg import MultiTaskMixin, NonFiniteLossError, Task, WeightingCallback
from lightning_lossagg.tasks import StackedLosses
from tests.models import (
    ThreeTaskNet,
    make_batch,
    one_batch_loader,
    quiet_trainer,
    reference_task_losses,
)


class HalvingWeights(WeightingCallback):
    """A real weighting callback for the interface tests: w_k = 0.5 for every task."""

    def task_weights(self, pl_module, step):
        return torch.full_like(step.losses, 0.5)


def _fit(model, callbacks=(), batch=None, **trainer_kwargs):
    batch = batch if batch is not None else make_batch(6, seed=0, dtype=torch.float32)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **trainer_kwargs,
    )
    trainer.fit(
        model, train_dataloaders=one_batch_loader(batch), val_dataloaders=one_batch_loader(batch)
    )
    return trainer


def test_static_weights_multiply_the_global_losses():
    model = ThreeTaskNet()
    batch = make_batch(6, seed=0, dtype=torch.float32)
    expected = reference_task_losses(model, batch)
    objective = model.training_step(batch, 0)
    record = model.loss_record
    assert record.stage == "train" and record.names == ("price", "kind", "sold")
    torch.testing.assert_close(record.losses, torch.stack(list(expected.values())).detach())
    assert record.weights.tolist() == [2.0, 1.0, 1.0]
    torch.testing.assert_close(record.weighted, record.weights * record.losses)
    torch.testing.assert_close(objective.detach(), record.objective)


def test_a_weighting_callback_multiplies_the_static_weights_and_evaluation_reuses_them():
    model = ThreeTaskNet()
    _fit(model, callbacks=[HalvingWeights()])
    assert model.weighting is not None
    record = model.loss_record  # the validation step after the training step
    assert record.stage == "val"
    assert record.weights.tolist() == [1.0, 0.5, 0.5]


def test_two_weighting_callbacks_are_refused_naming_both():
    with pytest.raises(
        ValueError, match=r"2 weighting callbacks \(HalvingWeights, HalvingWeights\)"
    ):
        _fit(ThreeTaskNet(), callbacks=[HalvingWeights(), HalvingWeights()])


def test_a_setup_override_without_super_is_refused_not_trained_with_static_weights():
    class OwnSetup(ThreeTaskNet):
        def setup(self, stage: str) -> None:
            self.prepared = stage

    with pytest.raises(RuntimeError, match=r"HalvingWeights .*Call super\(\).setup\(stage\)"):
        _fit(OwnSetup(), callbacks=[HalvingWeights()])


class GivenWeights(WeightingCallback):
    def __init__(self, weights) -> None:
        self.weights = weights

    def task_weights(self, pl_module, step):
        return self.weights


@pytest.mark.parametrize(
    ("weights", "got"),
    [
        (torch.ones(2), r"shape \[2\]"),
        (torch.ones(3, 1), r"shape \[3, 1\]"),
        ([1.0, 1.0, 1.0], r"a list of 3 item\(s\)"),
        (1.0, "a float"),
    ],
    ids=["too few", "a column", "a list", "a float"],
)
def test_a_weighting_callbacks_weights_of_another_shape_name_the_callback_and_the_tasks(
    weights, got
):
    model = ThreeTaskNet()
    before = [parameter.clone() for parameter in model.parameters()]
    with pytest.raises(TypeError, match=rf"GivenWeights.task_weights returned {got}.*shape \[3\]"):
        _fit(model, callbacks=[GivenWeights(weights)])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


def test_an_override_that_leaves_the_first_batch_out_is_not_warned_of():
    class SkipsTheFirstBatch(ThreeTaskNet):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 0 else super().training_step(batch, batch_idx)

    batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(2)]
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(val_dataloader|num_workers|returned `None`)")
        trainer.fit(SkipsTheFirstBatch(), DataLoader(batches, batch_size=None))


def test_a_training_step_override_that_skips_the_mixins_is_warned_of():
    class OwnStep(ThreeTaskNet):
        def training_step(self, batch, batch_idx):
            return self(batch[0])["price"].nan_to_num().mean()

    with pytest.warns(UserWarning, match=r"OwnStep.training_step did not call MultiTaskMixin"):
        _fit(OwnStep(), callbacks=[HalvingWeights()])


def test_validation_and_test_steps_record_global_losses():
    model = ThreeTaskNet()
    batch = make_batch(7, seed=4, dtype=torch.float32)
    model.validation_step(batch, 0)
    assert model.loss_record.stage == "val"
    model.test_step(batch, 0)
    expected = reference_task_losses(model, batch)
    torch.testing.assert_close(
        model.loss_record.losses, torch.stack(list(expected.values())).detach()
    )


def test_a_task_with_no_label_in_the_batch_gets_no_weight_and_no_nan():
    model = ThreeTaskNet()
    inputs, targets = make_batch(4, seed=0, dtype=torch.float32)
    targets["price"][:] = torch.nan
    objective = model.training_step((inputs, targets), 0)
    assert torch.isfinite(objective)
    assert torch.isnan(model.loss_record.losses[0]) and model.loss_record.weights[0] == 0
    objective.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class InverseLosses(WeightingCallback):
    """w_k = 1 / L_k: NaN for a task without a valid label in the batch."""

    def task_weights(self, pl_module, step):
        return 1.0 / step.losses


def test_a_methods_nan_weight_for_a_task_without_labels_does_not_reach_the_objective():
    class TrainingLoss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.loss = outputs["loss"]

    model, seen = ThreeTaskNet(), TrainingLoss()
    inputs, targets = make_batch(6, seed=0, dtype=torch.float32)
    targets["price"][:] = torch.nan
    _fit(model, callbacks=[InverseLosses(), seen], batch=(inputs, targets), limit_val_batches=0)
    assert torch.isfinite(seen.loss)
    assert model.loss_record.stage == "train" and model.loss_record.weights[0] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("bad", [torch.nan, torch.inf])
def test_a_methods_non_finite_weight_for_a_valid_task_refuses_the_step_naming_it(bad, nonfinite):
    # A NaN weight made every gradient NaN, and the optimizer wrote them into the parameters.
    model = ThreeTaskNet()
    model.nonfinite = nonfinite
    before = [parameter.clone() for parameter in model.parameters()]
    with pytest.raises(
        FloatingPointError, match=rf"GivenWeights.task_weights .* step 0: task 'kind' {bad}\."
    ):
        _fit(model, callbacks=[GivenWeights(torch.tensor([1.0, bad, 1.0]))])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


class LearnedInTheGraph(WeightingCallback):
    """w = exp(-s) with s a parameter of the callback's own: weights that carry a gradient."""

    def __init__(self) -> None:
        self.log_scales = torch.nn.Parameter(torch.zeros(3))

    def task_weights(self, pl_module, step):
        return torch.exp(-self.log_scales)


def test_weights_that_carry_a_gradient_are_detached_from_the_objective():
    # The model's backward must not reach a method's own parameters: its weights are constants
    # of the step (WeightingCallback.task_weights returns them detached, or the mixin does).
    callback = LearnedInTheGraph()
    _fit(ThreeTaskNet(), [callback])
    assert callback.log_scales.grad is None


class NanForNonFinite(WeightingCallback):
    """A weight of NaN for a task whose loss is not finite, 1 for the others."""

    def task_weights(self, pl_module, step):
        return torch.where(step.losses.isfinite(), 1.0, torch.nan)


def test_a_fit_after_a_refused_step_checks_only_its_own_steps():
    # The first fit stops on the infinite loss, the step's NaN weight left unread; the same
    # model fitted again on clean data must not meet it.
    model = ThreeTaskNet()
    inputs, targets = make_batch(6, seed=0, dtype=torch.float32)
    targets["sold"][2] = torch.inf
    with pytest.raises(NonFiniteLossError):
        _fit(model, [NanForNonFinite()], batch=(inputs, targets))
    _fit(model, [NanForNonFinite()], batch=make_batch(6, seed=1, dtype=torch.float32))
    assert model.loss_record.weights.isfinite().all()


def test_the_validation_step_returns_the_objective_at_the_weights_of_the_fit():
    model = ThreeTaskNet()
    _fit(model, callbacks=[HalvingWeights()])
    objective = model.validation_step(make_batch(6, seed=1, dtype=torch.float32), 0)
    assert model.loss_record.weights.tolist() == [1.0, 0.5, 0.5]  # not Task.weight's 2, 1, 1
    torch.testing.assert_close(objective.detach(), model.loss_record.objective)


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (
            lambda t: t.update(colour=torch.zeros(4)),
            KeyError,
            r"Unknown task name\(s\) \['colour'\] in the targets",
        ),
        (lambda t: t.pop("sold"), KeyError, r"targets lack\(s\) task\(s\) \['sold'\]"),
        (lambda t: t.update(price=torch.zeros(5)), ValueError, "Task 'price'.*does not match"),
        (
            lambda t: t.update(price=t["price"].reshape(2, 2)),  # 4 elements, not [4] or [4, 1]
            ValueError,
            "Task 'price'.*does not match",
        ),
        (lambda t: t.update(kind=t["kind"].float()), TypeError, "Task 'kind'.*integer class"),
    ],
)
def test_bad_targets_name_the_task_and_the_fix(mutate, error, message):
    model = ThreeTaskNet()
    model.training_step(make_batch(4, seed=1, dtype=torch.float32), 0)  # a good layout first
    inputs, targets = make_batch(4, seed=0, dtype=torch.float32)
    mutate(targets)
    with pytest.raises(error, match=message):
        model.training_step((inputs, targets), 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: p.pop("kind"),
            r"forward returned no prediction for task\(s\) \['kind'\]\. forward must return a "
            r"prediction for every task",
        ),
        (
            lambda p: p.update(colour=p["price"]),
            r"forward returned predictions named \['colour'\], which are not among the model's "
            r"tasks \['price', 'kind', 'sold'\]",
        ),
    ],
)
def test_a_forward_missing_a_task_or_naming_another_is_told_what_forward_must_return(
    change, message
):
    class Forgetful(ThreeTaskNet):
        def forward(self, inputs):
            predictions = super().forward(inputs)
            change(predictions)
            return predictions

    with pytest.raises(KeyError, match=message) as info:
        Forgetful().training_step(make_batch(4, seed=0, dtype=torch.float32), 0)
    assert "label" not in str(info.value)  # the targets' advice does not apply to predictions


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"x": torch.zeros(2)}, "got dict"),
        ((torch.zeros(2, 5), torch.zeros(2)), "a pair whose targets are a Tensor, not a dict"),
        ((torch.zeros(2, 5), torch.zeros(2), torch.zeros(2)), "3 items"),
    ],
    ids=["dict", "pair-of-tensors", "triple"],
)
def test_a_batch_of_another_layout_says_what_it_is_and_asks_to_override_task_losses(batch, message):
    with pytest.raises(TypeError, match=rf"{message}.*override task_losses"):
        ThreeTaskNet().training_step(batch, 0)


def test_task_losses_can_be_overridden_with_per_sample_values_and_masks():
    class Custom(MultiTaskMixin, L.LightningModule):
        def __init__(self):
            super().__init__(tasks={"a": "mse", "b": "mse"})
            self.scale = torch.nn.Parameter(torch.ones(()))

        def task_losses(self, batch):
            return {"a": self.scale * batch, "b": (self.scale * batch, batch > 1)}

    model = Custom()
    model.training_step(torch.tensor([1.0, 2.0, 3.0]), 0)
    assert model.loss_record.losses.tolist() == [2.0, 2.5]


@pytest.mark.parametrize("nonfinite", ["raise", "drop_task"])
def test_a_nan_value_under_a_false_mask_is_a_nonfinite_loss_not_a_nan_gradient(nonfinite):
    # The natural override on targets with NaN for a missing label: finite masked losses, but
    # the gradient there, 0 times 2 (p - NaN), was NaN and reached the parameters unseen.
    class NanAtMissing(MultiTaskMixin, L.LightningModule):
        def __init__(self):
            super().__init__(tasks={"a": "mse", "b": "mse"}, nonfinite=nonfinite)
            self.head = torch.nn.Linear(2, 2)

        def task_losses(self, batch):
            inputs, targets = batch
            predictions = self.head(inputs)
            return {
                name: ((predictions[:, k] - targets[:, k]).square(), ~targets[:, k].isnan())
                for k, name in enumerate("ab")
            }  # the values NaN where the target is

    model = NanAtMissing()
    inputs, targets = torch.randn(4, 2), torch.randn(4, 2)
    targets[1, 0] = torch.nan
    objective = model.training_step((inputs, targets), 0)
    if nonfinite == "raise":
        with pytest.raises(NonFiniteLossError, match="task 'a' on rank"):
            model.check_nonfinite_losses()
        return
    # drop_task: the task is left out, the other trains as it would alone.
    assert model.loss_record.losses[0].isnan() and model.loss_record.weights[0] == 0
    weight_gradient, bias_gradient = torch.autograd.grad(objective, list(model.head.parameters()))
    predictions = model.head(inputs)
    alone = torch.autograd.grad(
        (predictions[:, 1] - targets[:, 1]).square().mean(), list(model.head.parameters())
    )
    torch.testing.assert_close(weight_gradient, alone[0])
    torch.testing.assert_close(bias_gradient, alone[1])


@pytest.mark.parametrize(
    ("output", "error", "message"),
    [
        (lambda v: 1.0, TypeError, r"returned a float\."),
        (lambda v: None, TypeError, r"returned None\."),
        (lambda v: (v, None), TypeError, r"a tuple of 2 item\(s\) \(Tensor, NoneType\)"),
        (lambda v: [v, v, v], TypeError, r"a list of 3 item\(s\) \(Tensor, Tensor, Tensor\)"),
        (lambda v: (v, v), ValueError, r"mask must be a bool tensor of the values' shape"),
        (lambda v: (v, v[:2] > 0), ValueError, r"mask must be a bool tensor of the values' shape"),
    ],
)
def test_a_bad_task_losses_output_names_the_task_what_it_got_and_the_accepted_forms(
    output, error, message
):
    model = _LossesOf(lambda values: {"a": output(values), "b": values})
    with pytest.raises(error, match=rf"Task 'a': .*{message}") as info:
        model.training_step(torch.tensor([1.0, 2.0, 3.0]), 0)
    if error is TypeError:
        assert "a tensor (every sample valid), a MaskedLoss(values, mask) or a pair" in str(
            info.value
        )


@pytest.mark.parametrize(
    ("output", "error", "message"),
    [
        (lambda v: {"a": v}, KeyError, r"task_losses returned no losses for task\(s\) \['b'\]"),
        (
            lambda v: {"a": v, "b": v, "c": v},
            KeyError,
            r"task_losses returned losses named \['c'\], which are not among the model's tasks",
        ),
        (lambda v: [v, v], TypeError, r"task_losses must return a dict \{task: per-sample"),
    ],
)
def test_a_task_losses_output_missing_or_naming_other_tasks_is_told_what_to_return(
    output, error, message
):
    with pytest.raises(error, match=message):
        _LossesOf(output).training_step(torch.tensor([1.0, 2.0, 3.0]), 0)


class _LossesOf(MultiTaskMixin, L.LightningModule):
    """Tasks "a" and "b"; task_losses returns ``output(scale * batch)``."""

    def __init__(self, output) -> None:
        super().__init__(tasks={"a": "mse", "b": "mse"})
        self.output = output
        self.scale = torch.nn.Parameter(torch.ones(()))

    def task_losses(self, batch):
        return self.output(self.scale * batch)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tasks": {}}, ValueError, "at least one task"),
        (
            {"tasks": ["a", "b"]},
            TypeError,
            r"tasks must be a dict \{name: Task or loss name\}.*got list",
        ),
        ({"tasks": {"a": Task("mse", weight=0.0)}}, ValueError, "All task weights are zero"),
        ({"tasks": {"a": 3}}, TypeError, "Task 'a' must be a Task"),
        ({"tasks": {"a": "mse"}, "rank_weighting": "ranks"}, ValueError, "'samples' or 'uniform'"),
    ],
)
def test_bad_mixin_arguments_fail_at_construction(kwargs, error, message):
    class Net(MultiTaskMixin, L.LightningModule):
        pass

    with pytest.raises(error, match=message):
        Net(**kwargs)


def test_predict_returns_each_tasks_prediction_of_the_default_batches_and_of_bare_inputs():
    model = ThreeTaskNet()
    batch = make_batch(5, seed=3, dtype=torch.float32)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with_targets, bare = trainer.predict(
        model, [one_batch_loader(batch), torch.utils.data.DataLoader([batch[0]], batch_size=None)]
    )
    with torch.no_grad():
        expected = model(batch[0])
    for predictions in (with_targets[0], bare[0]):
        assert predictions.keys() == expected.keys()
        assert all(torch.equal(predictions[task], expected[task]) for task in expected)


def test_a_class_with_the_mixin_after_lightning_module_is_told_the_order_of_the_bases():
    with pytest.raises(TypeError, match=r"Net: put MultiTaskMixin before LightningModule"):

        class Net(L.LightningModule, MultiTaskMixin):
            pass

    class Right(MultiTaskMixin, L.LightningModule):
        pass

    class Subclass(Right):  # a subclass of a right one inherits the right order
        pass

    assert Subclass(tasks={"a": "mse"}).task_names == ("a",)


def test_a_nonfinite_loss_raises_naming_task_step_and_rank_before_the_weights_change():
    model = ThreeTaskNet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs, targets = make_batch(6, seed=0, dtype=torch.float32)
    targets["sold"][2] = torch.inf
    with pytest.raises(NonFiniteLossError, match=r"global step 0: task 'sold' on rank\(s\) 0"):
        _fit(model, batch=(inputs, targets), num_sanity_val_steps=0, limit_val_batches=0)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


class StackingNet(MultiTaskMixin, L.LightningModule):
    """a, b: MSE on [B] (stacked together); c: cross-entropy; d: MSE on [B, 2]; e: MAE on [B]."""

    def __init__(self):
        super().__init__(
            tasks={
                "a": "mse",
                "b": Task("mse", weight=3.0),
                "c": "cross_entropy",
                "d": "mse",
                "e": "mae",
            }
        )
        self.trunk = torch.nn.Linear(4, 6)
        self.heads = torch.nn.ModuleDict(
            {"a": torch.nn.Linear(6, 1), "b": torch.nn.Linear(6, 1), "c": torch.nn.Linear(6, 3),
             "d": torch.nn.Linear(6, 2), "e": torch.nn.Linear(6, 1)}
        )  # fmt: skip

    def forward(self, inputs):
        shared = self.trunk(inputs)
        squeeze = {"a", "b", "e"}
        return {
            n: h(shared).squeeze(-1) if n in squeeze else h(shared) for n, h in self.heads.items()
        }


def test_tasks_stacked_by_loss_and_shape_give_each_task_its_own_masked_loss_and_gradient():
    inputs, targets = _stacking_batch()
    targets["a"][[0, 3]] = torch.nan
    targets["b"][:] = torch.nan  # a stacked task with no label at all
    targets["d"][1, 0] = torch.nan
    targets["c"][2] = -100
    model = StackingNet()
    stacked = model.per_sample_losses(model(inputs), targets)
    assert isinstance(stacked, StackedLosses)
    assert [rows for rows, _ in stacked.groups] == [[0, 1], [2], [3], [4]]
    objective = model.training_step((inputs, targets), 0)
    grads = torch.autograd.grad(objective, list(model.parameters()))

    reference_model = StackingNet()
    reference_model.load_state_dict(model.state_dict())
    predictions = reference_model(inputs)
    expected = {}
    for name in ("a", "d"):
        valid = ~torch.isnan(targets[name])
        expected[name] = torch.nn.functional.mse_loss(
            predictions[name][valid], targets[name][valid]
        )
    expected["c"] = torch.nn.functional.cross_entropy(
        predictions["c"], targets["c"], ignore_index=-100
    )
    expected["e"] = torch.nn.functional.l1_loss(predictions["e"], targets["e"])
    record = model.loss_record
    for index, name in enumerate(record.names):
        if name == "b":
            assert torch.isnan(record.losses[index]) and record.weights[index] == 0
        else:
            torch.testing.assert_close(record.losses[index], expected[name].detach(), msg=name)
    reference_objective = sum(expected.values())
    expected_grads = torch.autograd.grad(
        reference_objective, list(reference_model.parameters()), allow_unused=True
    )
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(
            grad, torch.zeros_like(grad) if expected_grad is None else expected_grad
        )


def _stacking_batch():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(7, 4, generator=generator)
    targets = {name: torch.randn(7, generator=generator) for name in ("a", "b", "e")}
    targets["c"] = torch.randint(0, 3, (7,), generator=generator)
    targets["d"] = torch.randn(7, 2, generator=generator)
    return inputs, targets


def test_a_target_with_a_trailing_dimension_of_one_trains_like_the_prediction_shaped_one():
    model = StackingNet()
    inputs, targets = _stacking_batch()
    model.training_step((inputs, targets), 0)  # a and b stacked
    expected = model.loss_record.losses
    model.training_step((inputs, {**targets, "a": targets["a"][:, None]}), 0)  # a new layout
    torch.testing.assert_close(model.loss_record.losses, expected)


def test_a_transposed_target_is_refused_in_a_new_layout_of_the_batch():
    model = StackingNet()
    inputs, targets = _stacking_batch()
    model.training_step((inputs, targets), 0)  # a good layout first: its plan is kept
    transposed = {**targets, "d": targets["d"].T.contiguous()}  # [2, 7] for a [7, 2] prediction
    with pytest.raises(ValueError, match=r"Task 'd'.*\(2, 7\) does not match.*\(7, 2\)"):
        model.training_step((inputs, transposed), 0)


class MaskNet(MultiTaskMixin, L.LightningModule):
    """Binary masks with logits: ``mask`` (and ``edge``, stacked with it) and a regression."""

    def __init__(self, masks: tuple[str, ...], loss: str = "bce_with_logits"):
        super().__init__(tasks={**dict.fromkeys(masks, loss), "size": "mse"})
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(4, 1) for name in self.tasks})

    def forward(self, inputs):
        return {name: head(inputs).squeeze(-1) for name, head in self.heads.items()}


@pytest.mark.parametrize("masks", [("mask",), ("mask", "edge")], ids=["alone", "stacked"])
def test_a_0_255_mask_is_refused_after_a_first_batch_without_a_label(masks):
    # The range check of a layout waits for a batch with a label of the task: a first batch with
    # none (a sparsely labelled task) passed it for the layout's every later batch.
    model = MaskNet(masks)
    inputs = torch.randn(6, 4)

    def targets(mask):
        return {"size": torch.randn(6), **{name: mask for name in masks}}

    model.training_step((inputs, targets(torch.full((6,), torch.nan))), 0)
    with pytest.raises(ValueError, match=r"Task 'mask'.*targets in \[0, 1\].*0 to 255"):
        model.training_step((inputs, targets(torch.tensor([0.0, 255, 0, 255, 0, 255]))), 1)


def test_a_stacked_tasks_failing_loss_names_that_task_and_its_own_shapes():
    class ForgotOneSigmoid(MaskNet):
        def forward(self, inputs):
            predictions = super().forward(inputs)
            return {**predictions, "mask": predictions["mask"].sigmoid()}  # edge: logits

    model = ForgotOneSigmoid(("mask", "edge"), loss="bce")  # the two stacked
    inputs = torch.randn(6, 4) * 5
    targets = {"size": torch.randn(6), "mask": torch.ones(6), "edge": torch.zeros(6)}
    with pytest.raises(ValueError, match=r"^Task 'edge': .* shape \(6,\).*apply a sigmoid"):
        model.training_step((inputs, targets), 0)


def test_the_record_and_the_pending_flags_do_not_keep_the_steps_graph_alive():
    import gc
    import weakref

    class Watched(ThreeTaskNet):
        def forward(self, inputs):
            predictions = super().forward(inputs)
            self.watched = weakref.ref(predictions["price"])  # saved by the MSE's backward
            return predictions

    model = Watched()
    objective = model.training_step(make_batch(6, seed=0, dtype=torch.float32), 0)
    assert model.watched() is not None
    del objective
    gc.collect()
    assert model.watched() is None, "something still holds the step's autograd graph"
    assert torch.isfinite(model.loss_record.objective)  # the record still reads its figures


def test_a_fit_fixes_whether_figures_cross_ranks_and_asks_again_after_it():
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            seen.append(pl_module._reducer.across_ranks)

    model = ThreeTaskNet()
    _fit(model, callbacks=[Spy()])
    assert seen == [False]  # one process: set at setup, no torch.distributed query per step
    assert model._reducer.across_ranks is None  # outside the fit: asked at every call again
    model.compute_global_losses(make_batch(6, seed=0, dtype=torch.float32))


def test_a_task_whose_losses_carry_no_gradient_is_named_at_the_first_step():
    """A loss through NumPy is logged but would never train: said, once, naming the task."""

    class NumpyPrice(ThreeTaskNet):
        def task_losses(self, batch):
            losses = dict(super().task_losses(batch))
            losses["price"] = losses["price"]._replace(values=losses["price"].values.detach())
            return losses

    batches = [make_batch(6, seed=s) for s in range(2)]
    with pytest.warns(UserWarning, match=r"task\(s\) \['price'\] carry no gradient") as record:
        quiet_trainer(1, steps=2).fit(
            NumpyPrice().double(), torch.utils.data.DataLoader(batches, batch_size=None)
        )
    assert sum("carry no gradient" in str(w.message) for w in record) == 1


def test_per_sample_losses_returned_as_a_bare_tensor_count_every_sample_even_zero_or_negative():
    class BareLosses(MultiTaskMixin, L.LightningModule):
        def __init__(self):
            super().__init__(tasks={"a": "mse"})
            self.scale = torch.nn.Parameter(torch.ones(()))

        def task_losses(self, batch):
            return {"a": self.scale * batch}  # a tensor: every sample valid

    model = BareLosses()
    batch = torch.tensor([0.0, 2.0, -1.0, 0.0, 4.0])
    objective = model.training_step(batch, 0)
    torch.testing.assert_close(model.loss_record.losses, batch.mean()[None])
    assert model.loss_record.counts.tolist() == [5.0]
    (grad,) = torch.autograd.grad(objective, [model.scale])
    torch.testing.assert_close(grad, batch.mean())
