"""What validation and test weigh the tasks with: each task's weight of the latest training step
that had a valid sample of it, kept in checkpoints."""

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_lossagg import WeightingCallback
from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks import MGDA, UPGrad
from tests.models import ThreeTaskNet, make_batch, quiet_trainer


class CountingWeights(WeightingCallback):
    """Weights (n, 2n, 3n) at the n-th training step: each step's are told apart."""

    def __init__(self) -> None:
        self.calls = 0

    def task_weights(self, pl_module: L.LightningModule, step: GlobalTaskLosses) -> Tensor:
        self.calls += 1
        return torch.tensor([1.0, 2.0, 3.0], dtype=step.losses.dtype) * self.calls


class RecordedWeights(L.Callback):
    """Every training step's effective weights and valid tasks, once the step is done."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[float], list[bool]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = pl_module.loss_record
        self.steps.append((record.weights.tolist(), (record.counts > 0).tolist()))


def _fit(
    steps: int = 3, callbacks: list[L.Callback] | None = None
) -> tuple[ThreeTaskNet, L.Trainer]:
    batches = [make_batch(6, seed=seed) for seed in range(steps)]
    batches[-1][1]["price"][:] = torch.nan  # the last training step has no price label
    model = ThreeTaskNet()
    trainer = quiet_trainer(1, steps=steps, callbacks=callbacks or [CountingWeights()])
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    return model, trainer


def _validation_weights(trainer: L.Trainer, model: ThreeTaskNet, **kwargs) -> list[float]:
    loader = torch.utils.data.DataLoader([make_batch(6, seed=100)], batch_size=None)
    trainer.validate(model, loader, verbose=False, **kwargs)
    assert model.loss_record is not None and model.loss_record.stage == "val"
    return model.loss_record.weights.tolist()


def test_evaluation_weighs_each_task_as_the_latest_training_step_that_had_it():
    model, trainer = _fit()
    # Static weights (2, 1, 1) times the method's: price last had labels at step 2 (2 * 2),
    # kind and sold at step 3 (2 * 3, 3 * 3). Not 0 for price: its validation loss counts.
    assert _validation_weights(trainer, model) == [4.0, 6.0, 9.0]


def test_each_task_keeps_its_latest_weight_over_more_steps_than_are_folded_together():
    # 75 steps: the weights of up to 32 steps are folded in together. Static weights (2, 1, 1)
    # times the method's (n, 2n, 3n) at step n: price last had labels at step 40 (in the
    # second block), kind at step 70, sold at step 75 (no label at step 33 alone).
    batches = [make_batch(6, seed=seed) for seed in range(75)]
    for index, batch in enumerate(batches):
        targets = batch[1]
        if index >= 40:
            targets["price"][:] = torch.nan
        if index >= 70:
            targets["kind"][:] = -100
        if index == 32:
            targets["sold"][:] = torch.nan
    model = ThreeTaskNet()
    trainer = quiet_trainer(1, steps=75, callbacks=[CountingWeights()])
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    assert _validation_weights(trainer, model) == [80.0, 140.0, 225.0]


def test_a_task_no_training_step_had_is_evaluated_with_its_static_weight():
    # price (Task.weight 2) has no label in the one training step: no method weight of its own
    # yet, so its static weight, not 1 (and not the method's weight of a step without it).
    batch = make_batch(6, seed=0)
    batch[1]["price"][:] = torch.nan
    model = ThreeTaskNet()
    trainer = quiet_trainer(1, steps=1, callbacks=[CountingWeights()])
    trainer.fit(model, torch.utils.data.DataLoader([batch], batch_size=None))
    assert _validation_weights(trainer, model) == [2.0, 2.0, 3.0]


@pytest.mark.parametrize("steps", [3, 34])
@pytest.mark.parametrize(
    "method", [lambda: MGDA(rep_grad=True), lambda: UPGrad()], ids=["MGDA rep", "UPGrad param"]
)
def test_gradient_methods_weights_are_kept_once_their_backward_wrote_them(method, steps):
    # MGDA with rep_grad writes its weights during backward, after the training step returned.
    # At 34 steps, the 32 steps before the 33rd (the last with a price label) are folded in
    # together during its training step, before its backward.
    recorded = RecordedWeights()
    model, trainer = _fit(steps, callbacks=[method(), recorded])
    assert recorded.steps[-1][1] == [False, True, True]
    expected = [recorded.steps[-2][0][0], *recorded.steps[-1][0][1:]]
    assert recorded.steps[-2][1][0] and expected[0] > 0
    assert _validation_weights(trainer, model) == pytest.approx(expected, rel=1e-6)


def test_a_checkpoint_keeps_the_evaluation_weights_beside_an_unchanged_state_dict(tmp_path):
    _, trainer = _fit()
    path = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(path)
    # Another model and trainer, without the weighting callback, weigh as the fit did.
    fresh = ThreeTaskNet()
    assert _validation_weights(quiet_trainer(1), fresh, ckpt_path=path) == [4.0, 6.0, 9.0]
    assert set(torch.load(path, weights_only=False)["state_dict"]) == set(fresh.state_dict())
    assert ThreeTaskNet.load_from_checkpoint(path)._latest_weights.tolist() == [4.0, 6.0, 9.0]


def test_a_checkpoints_evaluation_weights_follow_the_task_names_not_their_order(tmp_path):
    _, trainer = _fit()
    path = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(path)
    reordered = ThreeTaskNet(task_order=("sold", "price", "kind"))
    assert _validation_weights(quiet_trainer(1), reordered, ckpt_path=path) == [9.0, 4.0, 6.0]
    with pytest.warns(UserWarning, match=r"for the tasks \['price', 'kind', 'sold'\], not this"):
        other_tasks = ThreeTaskNet.load_from_checkpoint(path, task_order=("price", "kind"))
    assert other_tasks._latest_weights is None  # evaluation weighs with the static weights


def test_a_new_fit_without_a_method_evaluates_with_the_static_weights_again():
    model, _ = _fit()
    trainer = quiet_trainer(1, steps=1)
    trainer.fit(model, torch.utils.data.DataLoader([make_batch(6, seed=7)], batch_size=None))
    assert _validation_weights(trainer, model) == [2.0, 1.0, 1.0]


def test_a_fit_resumed_without_a_method_evaluates_with_the_static_weights(tmp_path):
    _, trainer = _fit()
    path = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(path)
    model, trainer = ThreeTaskNet(), quiet_trainer(1, steps=4)
    batches = [make_batch(6, seed=seed) for seed in range(4)]
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None), ckpt_path=path)
    assert trainer.global_step == 4  # one step without the method after the checkpoint's three
    assert _validation_weights(trainer, model) == [2.0, 1.0, 1.0]


@pytest.mark.parametrize("stage", ["validate", "test"])
@pytest.mark.parametrize(
    "model_options",
    [{}, {"sold_loss": "mse"}, {"rank_weighting": "uniform"}],
    ids=["three losses", "stacked tasks", "uniform ranks"],
)
@pytest.mark.parametrize("method", [None, UPGrad], ids=["static", "UPGrad"])
def test_a_fit_after_a_validate_or_test_trains_as_one_without(stage, model_options, method):
    # Evaluation runs under torch.inference_mode: nothing it leaves behind may be an inference
    # tensor that training saves for backward.
    batches = DataLoader([make_batch(6, seed=seed) for seed in range(3)], batch_size=None)
    parameters = []
    for evaluate_first in (False, True):
        torch.manual_seed(0)
        model = ThreeTaskNet(**model_options).double()
        callbacks = [method()] if method else []
        if evaluate_first:
            evaluate = getattr(quiet_trainer(1, callbacks=callbacks), stage)
            evaluate(model, batches, verbose=False)
        quiet_trainer(1, steps=3, callbacks=callbacks).fit(model, batches)
        parameters.append(list(model.parameters()))
    for without, after_evaluation in zip(*parameters, strict=True):
        torch.testing.assert_close(after_evaluation, without, rtol=0, atol=0)
