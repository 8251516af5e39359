"""LossLogger through real loggers: CSV here, W&B offline in test_loss_logger_wandb.py and
tests/test_cli.py; under 2-rank DDP with a spy W&B run."""

import csv
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_lossagg import NonFiniteLossError, WeightingCallback, callbacks
from lightning_lossagg.callbacks import RLW, LossBalanceMonitor, LossLogger
from lightning_lossagg.callbacks._trajectory import Trajectory
from lightning_lossagg.callbacks.loss_logger import _EpochAccumulator
from lightning_lossagg.demos import PenguinsDataModule, PenguinsNet
from lightning_lossagg.weighting import LossRecord
from tests.models import (
    ThreeTaskNet,
    make_batch,
    one_batch_loader,
    quiet_trainer,
    reference_task_losses,
)
from tests.process_group import CollectiveCounter

TASKS = ("species", "sex", "body_mass")


def _read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_csv_logger_gets_every_component_per_step_and_per_epoch(tmp_path):
    trainer = L.Trainer(
        max_epochs=2,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path),
        callbacks=[LossLogger()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(PenguinsNet(weights={"body_mass": 2.0}), PenguinsDataModule(batch_size=64))
    rows = _read_csv(trainer.logger.log_dir + "/metrics.csv")
    columns = set(rows[0])
    for prefix in ("train", "train_epoch", "val"):
        assert f"{prefix}/loss" in columns
        for task in TASKS:
            for figure in ("loss", "weight", "weighted", "share"):
                assert f"{prefix}/{figure}/{task}" in columns, (prefix, figure, task)
    step_rows = [r for r in rows if r["train/weight/body_mass"]]
    assert len(step_rows) == trainer.global_step
    assert {float(r["train/weight/body_mass"]) for r in step_rows} == {2.0}
    epoch_rows = [
        (prefix, row) for prefix in ("train_epoch", "val") for row in rows if row[f"{prefix}/loss"]
    ]
    assert len(epoch_rows) == 4  # two epochs of each
    for prefix, row in [("train", row) for row in step_rows] + epoch_rows:
        # Each task's own figures, not only their sums: weighted = weight * loss, share =
        # weighted / objective, objective = the sum of the weighted losses.
        objective = float(row[f"{prefix}/loss"])
        weighted = {t: float(row[f"{prefix}/weighted/{t}"]) for t in TASKS}
        assert sum(weighted.values()) == pytest.approx(objective, rel=1e-5)
        for task in TASKS:
            loss, weight = (
                float(row[f"{prefix}/loss/{task}"]),
                float(row[f"{prefix}/weight/{task}"]),
            )
            assert weighted[task] == pytest.approx(weight * loss, rel=1e-5), (prefix, task)
            share = float(row[f"{prefix}/share/{task}"])
            assert share == pytest.approx(weighted[task] / objective, rel=1e-5), (prefix, task)


@pytest.mark.parametrize("chunk", [None, 1], ids=["one chunk", "a chunk per step"])
def test_epoch_values_are_sample_weighted_global_means(tmp_path, chunk, monkeypatch):
    # Two batches of different sizes and label counts: the epoch loss must weight by valid labels,
    # not average the two batch means. Steps are summed in chunks (of 32): an epoch of several
    # chunks adds them all.
    if chunk is not None:
        monkeypatch.setattr(_EpochAccumulator, "CHUNK", chunk)
    first, second = (
        make_batch(6, seed=1, dtype=torch.float32),
        make_batch(3, seed=2, dtype=torch.float32),
    )
    model = ThreeTaskNet(lr=0.0)  # frozen: both batches see the same model
    trainer = L.Trainer(
        max_epochs=1,
        logger=CSVLogger(tmp_path),
        callbacks=[LossLogger()],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader([first, second], batch_size=None)
    trainer.fit(model, train_dataloaders=loader)
    with torch.no_grad():
        predictions = model(torch.cat([first[0], second[0]]))
        price = torch.cat([first[1]["price"], second[1]["price"]])
        valid = ~torch.isnan(price)
        expected = torch.nn.functional.mse_loss(predictions["price"][valid], price[valid])
    epoch_row = next(
        r for r in _read_csv(trainer.logger.log_dir + "/metrics.csv") if r["train_epoch/loss/price"]
    )
    assert float(epoch_row["train_epoch/loss/price"]) == pytest.approx(expected.item(), rel=1e-5)


class LeavesOutBatchOne(ThreeTaskNet):
    def training_step(self, batch, batch_idx):
        if batch_idx == 1:
            return None  # a batch the model leaves out, as Lightning allows: no record of its own
        return super().training_step(batch, batch_idx)


def test_a_batch_the_model_leaves_out_logs_no_row_and_no_part_of_the_epoch(tmp_path):
    # The mixin's record of the batch before stayed on the model: it was logged again at the
    # left-out batch's step and counted twice in the epoch's figures.
    batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(3)]
    model = LeavesOutBatchOne(lr=0.0)  # frozen: the reference sees the same model
    trainer = _fit_three_tasks(tmp_path, [LossLogger(plot=False)], batches=batches, model=model)
    rows = _read_csv(trainer.logger.log_dir + "/metrics.csv")
    trained = [batches[0], batches[2]]
    with torch.no_grad():
        expected = [reference_task_losses(model, batch)["price"].item() for batch in trained]
    step_losses = [float(r["train/loss/price"]) for r in rows if r["train/loss/price"]]
    assert step_losses == pytest.approx(expected, rel=1e-5)
    epoch = next(float(r["train_epoch/loss/price"]) for r in rows if r["train_epoch/loss/price"])
    price = torch.cat([batch[1]["price"] for batch in trained])
    with torch.no_grad():
        predictions = model(torch.cat([batch[0] for batch in trained]))["price"]
    valid = ~price.isnan()
    exact = torch.nn.functional.mse_loss(predictions[valid], price[valid]).item()
    assert epoch == pytest.approx(exact, rel=1e-5)


class StepNumberWeights(WeightingCallback):
    """Weights (n, 2n, 3n) at the n-th training step: every step weighs differently."""

    def __init__(self) -> None:
        self.calls = 0

    def task_weights(self, pl_module, step):
        self.calls += 1
        return torch.tensor([1.0, 2.0, 3.0], dtype=step.losses.dtype) * self.calls


def test_epoch_weights_and_weighted_losses_follow_each_steps_weights_and_samples(tmp_path):
    # Batches of 6, 3 and 5 samples, the second without a price label, weights changing at every
    # step: by hand, loss = sum_s c_s L_s / sum_s c_s, weighted = sum_s c_s w_s L_s / sum_s c_s,
    # weight = the mean of w_s over the steps with a valid sample, the objective their sum.
    batches = [make_batch(n, seed=n, dtype=torch.float32) for n in (6, 3, 5)]
    batches[1][1]["price"][:] = torch.nan
    model = ThreeTaskNet(lr=0.0)  # frozen: the losses by hand see the same model
    trainer = _fit_three_tasks(
        tmp_path, [LossLogger(), StepNumberWeights()], batches=batches, model=model
    )
    static = {"price": 2.0, "kind": 1.0, "sold": 1.0}
    valid = {
        "price": lambda t: ~torch.isnan(t["price"]),
        "kind": lambda t: t["kind"] != -100,
        "sold": lambda t: ~torch.isnan(t["sold"]),
    }
    row = next(
        r for r in _read_csv(trainer.logger.log_dir + "/metrics.csv") if r["train_epoch/loss"]
    )
    objective = 0.0
    for k, task in enumerate(("price", "kind", "sold")):
        counts, losses, weights = [], [], []
        for n, batch in enumerate(batches, start=1):
            count = int(valid[task](batch[1]).sum())
            if count:
                with torch.no_grad():
                    losses.append(reference_task_losses(model, batch)[task].item())
                counts.append(count)
                weights.append(static[task] * (k + 1) * n)
        total = sum(counts)
        weighted = sum(c * w * loss for c, w, loss in zip(counts, weights, losses, strict=True))
        expected = {
            "loss": sum(c * loss for c, loss in zip(counts, losses, strict=True)) / total,
            "weighted": weighted / total,
            "weight": sum(weights) / len(weights),
        }
        for figure, value in expected.items():
            logged = float(row[f"train_epoch/{figure}/{task}"])
            assert logged == pytest.approx(value, rel=1e-5), (figure, task)
        objective += expected["weighted"]
    assert float(row["train_epoch/loss"]) == pytest.approx(objective, rel=1e-5)


def _validation_metrics(batches) -> dict[str, float]:
    trainer = L.Trainer(logger=False, callbacks=[LossLogger(plot=False)], enable_progress_bar=False)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.validate(ThreeTaskNet(), loader, verbose=False)
    return {key: float(value) for key, value in trainer.callback_metrics.items()}


def test_several_validation_loaders_give_figures_over_all_of_them():
    first, second = (make_batch(6, seed=s, dtype=torch.float32) for s in (1, 2))
    trainer = L.Trainer(logger=False, callbacks=[LossLogger(plot=False)], enable_progress_bar=False)
    loaders = [torch.utils.data.DataLoader([batch], batch_size=None) for batch in (first, second)]
    torch.manual_seed(0)
    trainer.validate(ThreeTaskNet(), loaders, verbose=False)
    apart = {key: float(value) for key, value in trainer.callback_metrics.items()}
    torch.manual_seed(0)
    together = _validation_metrics([first, second])  # one loader of both batches
    for task in ("price", "kind", "sold"):
        assert apart[f"val/loss/{task}"] == pytest.approx(together[f"val/loss/{task}"])


def test_an_epoch_weight_is_the_mean_over_the_steps_that_had_the_task():
    # The second batch has no price label: its record weighs price 0, which is no weight of the
    # method's; the epoch figures stay consistent (weighted = weight * loss, static weights).
    first, second = (make_batch(6, seed=s, dtype=torch.float32) for s in (1, 2))
    second[1]["price"][:] = torch.nan
    metrics = _validation_metrics([first, second])
    assert metrics["val/weight/price"] == 2.0 and metrics["val/weight/kind"] == 1.0
    assert metrics["val/weighted/price"] == pytest.approx(2 * metrics["val/loss/price"])


def test_a_task_without_a_label_all_epoch_logs_no_point_and_no_part_of_the_static_loss():
    # As at the step level: a NaN loss (or weight, or a 0 part) would spoil the loggers'
    # summaries (W&B's min) and stop an EarlyStopping that watches the task.
    batches = [make_batch(6, seed=s, dtype=torch.float32) for s in (1, 2)]
    for batch in batches:
        batch[1]["price"][:] = torch.nan
    metrics = _validation_metrics(batches)
    assert not [key for key in metrics if key.endswith("/price")], list(metrics)
    assert "val/loss/kind" in metrics and "val/weight/sold" in metrics
    # kind and sold have Task.weight 1; price, without a loss, is left out.
    by_hand = metrics["val/loss/kind"] + metrics["val/loss/sold"]
    assert metrics["val/static_loss"] == pytest.approx(by_hand)


def test_a_nan_loss_of_valid_samples_makes_the_epoch_figures_nan():
    # A diverged evaluation must show (EarlyStopping's check_finite reads val/loss), not vanish.
    first, second = (make_batch(6, seed=s, dtype=torch.float32) for s in (1, 2))
    first[0][1, :] = torch.nan  # sample 1: its kind label is missing, price and sold valid
    metrics = _validation_metrics([first, second])
    nan = torch.isnan(torch.tensor([metrics[f"val/loss/{t}"] for t in ("price", "kind", "sold")]))
    # kind too: a non-finite prediction at a missing label of a registry loss is a NaN loss.
    assert nan.tolist() == [True, True, True]
    assert torch.isnan(torch.tensor(metrics["val/loss"]))


def test_the_static_loss_weighs_the_epoch_losses_with_task_weights_alone():
    # RLW's weights are a fresh draw every step: val/loss moves with them, val/static_loss not.
    train = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(3)]
    val = [make_batch(6, seed=10 + seed, dtype=torch.float32) for seed in range(2)]
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        callbacks=[RLW(seed=0), LossLogger(plot=False)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loaders = (torch.utils.data.DataLoader(b, batch_size=None) for b in (train, val))
    trainer.fit(ThreeTaskNet(), *loaders)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    by_hand = 2 * metrics["val/loss/price"] + metrics["val/loss/kind"] + metrics["val/loss/sold"]
    assert metrics["val/static_loss"] == pytest.approx(by_hand)
    assert metrics["val/loss"] != pytest.approx(by_hand)
    assert "train_epoch/static_loss" in metrics


def _epoch_figures(root, ckpt_path=None, checkpoint_every=None) -> dict[tuple[str, str], float]:
    """Each ``train_epoch/`` figure of a 2-epoch fit on one batch seen 5 times per epoch (a
    resumed loader replays the same data), by (epoch, key)."""
    torch.manual_seed(0)
    model = ThreeTaskNet()
    checkpoints = []
    if checkpoint_every:
        checkpoints = [
            ModelCheckpoint(root / "ckpt", every_n_train_steps=checkpoint_every, save_top_k=-1)
        ]
    trainer = L.Trainer(
        max_epochs=2,
        logger=CSVLogger(root),
        callbacks=[RLW(seed=0), LossLogger(plot=False), *checkpoints],
        log_every_n_steps=1,
        enable_checkpointing=bool(checkpoints),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    batch = make_batch(9, seed=0, dtype=torch.float32)
    trainer.fit(
        model, torch.utils.data.DataLoader([batch] * 5, batch_size=None), ckpt_path=ckpt_path
    )
    rows = _read_csv(trainer.logger.log_dir + "/metrics.csv")
    return {
        (row["epoch"], key): float(value)
        for row in rows
        for key, value in row.items()
        if key.startswith("train_epoch/") and value
    }


# Resumed at its last batch, epoch 0 does not end again (Lightning resumes at epoch 1): its
# restored figures must not leak into epoch 1's. Resumed mid-way through epoch 1, they are
# epoch 1's: they must be kept.
@pytest.mark.parametrize(
    ("step", "epochs"),
    [(3, {"0", "1"}), (5, {"1"}), (7, {"1"})],
    ids=["mid-epoch", "last-batch", "mid-epoch-1"],
)
def test_a_resumed_epoch_logs_the_figures_of_an_uninterrupted_one(
    tmp_path, monkeypatch, step, epochs
):
    # Sums of two steps at a time: the checkpoint at step 3 holds a sum and a step not summed.
    monkeypatch.setattr(_EpochAccumulator, "CHUNK", 2)
    uninterrupted = _epoch_figures(tmp_path / "full", checkpoint_every=step)
    (checkpoint,) = (tmp_path / "full" / "ckpt").glob(f"epoch=*-step={step}.ckpt")
    resumed = _epoch_figures(tmp_path / "resumed", ckpt_path=checkpoint)
    assert {epoch for epoch, _ in resumed} == epochs
    assert len(resumed) == 3 * 4 * len(epochs) + 2 * len(epochs)  # 3 tasks, 4 figures, 2 totals
    assert resumed == {key: uninterrupted[key] for key in resumed}


class CheckpointAmidAStep(L.Callback):
    """Saves a full checkpoint after the given batch (the first micro-batch of a step)."""

    def __init__(self, batch_index: int, path) -> None:
        self.batch_index, self.path = batch_index, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_index:
            trainer.save_checkpoint(self.path)


class BatchOfIndex(ThreeTaskNet):
    """Trains on ``batches[batch_idx]`` whatever the loader yields: a resumed fit, whose plain
    loader starts again from its first batch, sees the batches an uninterrupted one does."""

    def __init__(self, batches: list) -> None:
        super().__init__(lr=0.0)
        self.batches = batches

    def training_step(self, batch, batch_idx):
        return super().training_step(self.batches[batch_idx], batch_idx)


def test_a_fit_resumed_amid_an_accumulated_step_logs_the_epoch_figures_of_an_uninterrupted_one(
    tmp_path,
):
    # lr=0: the model stays as it was (the accumulated gradient is not in the checkpoint), so
    # that only the logger's figures can differ. Batch 4 is the first micro-batch of step 2.
    batches = [make_batch(6 + index, seed=index, dtype=torch.float32) for index in range(6)]
    figures = []
    for resume in (False, True):
        root = tmp_path / str(resume)
        checkpoint = tmp_path / "amid.ckpt"
        callbacks: list[L.Callback] = [LossLogger(plot=False)]
        if not resume:
            callbacks.append(CheckpointAmidAStep(4, checkpoint))
        trainer = L.Trainer(
            max_epochs=1,
            logger=CSVLogger(root),
            callbacks=callbacks,
            accumulate_grad_batches=2,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(
            BatchOfIndex(batches),
            torch.utils.data.DataLoader(batches, batch_size=None),
            ckpt_path=checkpoint if resume else None,
        )
        rows = _read_csv(trainer.logger.log_dir + "/metrics.csv")
        figures.append(
            {k: float(v) for r in rows for k, v in r.items() if "train_epoch/" in k and v}
        )
    uninterrupted, resumed = figures
    assert uninterrupted and resumed == pytest.approx(uninterrupted, rel=1e-6)


def test_loss_logger_refuses_a_model_without_the_mixin():
    class Plain(L.LightningModule):
        def training_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return None

    trainer = L.Trainer(
        callbacks=[LossLogger()], logger=False, max_steps=1, enable_progress_bar=False
    )
    with pytest.raises(TypeError, match="needs a MultiTaskMixin model"):
        trainer.fit(Plain(), train_dataloaders=one_batch_loader(make_batch(2, seed=0)))


def test_a_logger_reused_after_an_aborted_fit_starts_its_next_epoch_clean():
    aborted = [make_batch(6, seed=s, dtype=torch.float32) for s in (1, 2)]
    aborted[1][1]["price"][0] = torch.inf  # step 0 reaches the logger, step 1 raises
    logger = LossLogger(plot=False)
    with pytest.raises(NonFiniteLossError):
        quiet_trainer(1, steps=2, precision="32-true", callbacks=[logger]).fit(
            ThreeTaskNet(), torch.utils.data.DataLoader(aborted, batch_size=None)
        )
    model = ThreeTaskNet()
    trainer = quiet_trainer(1, precision="32-true", callbacks=[logger])
    trainer.fit(model, one_batch_loader(make_batch(6, seed=3, dtype=torch.float32)))
    # One step in the epoch: its figures are that step's, nothing of the aborted fit's.
    epoch_loss = float(trainer.callback_metrics["train_epoch/loss/price"])
    assert epoch_loss == pytest.approx(model.loss_record.losses[0].item())


class ZeroWeights(WeightingCallback):
    """Every weight 0: an objective of exactly 0."""

    def task_weights(self, pl_module, step):
        return torch.zeros_like(step.losses)


def test_a_zero_objective_gives_each_task_a_share_of_zero_per_step_and_per_epoch(tmp_path):
    trainer = _fit_three_tasks(tmp_path, [LossLogger(plot=False), ZeroWeights()])
    rows = _read_csv(trainer.logger.log_dir + "/metrics.csv")
    step_rows = [row for row in rows if row["train/loss"]]
    (epoch_row,) = [row for row in rows if row["train_epoch/loss"]]
    assert {float(row["train/loss"]) for row in step_rows} == {0.0}
    assert float(epoch_row["train_epoch/loss"]) == 0.0
    for task in ("price", "kind", "sold"):
        assert {float(row[f"train/share/{task}"]) for row in step_rows} == {0.0}, task
        assert float(epoch_row[f"train_epoch/share/{task}"]) == 0.0, task


def _fit_with_validation(*callbacks: L.Callback, **trainer_kwargs) -> L.Trainer:
    """One training and one validation batch, with the sanity check's validation batch first."""
    batches = one_batch_loader(make_batch(6, seed=0, dtype=torch.float32))
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        callbacks=[LossLogger(plot=False), *callbacks],
        num_sanity_val_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(ThreeTaskNet(), batches, batches)
    return trainer


def test_the_sanity_check_logs_no_validation_figures():
    class ValKeysAfterSanityCheck(L.Callback):
        def on_sanity_check_end(self, trainer, pl_module):
            self.keys = [key for key in trainer.callback_metrics if key.startswith("val/")]

    peek = ValKeysAfterSanityCheck()
    trainer = _fit_with_validation(peek)
    assert peek.keys == []
    assert "val/loss" in trainer.callback_metrics  # the real validation epoch logs them


def test_only_val_loss_of_the_epoch_figures_goes_to_the_progress_bar():
    trainer = _fit_with_validation()
    epoch_keys = {key for key in trainer.progress_bar_metrics if not key.startswith("train/")}
    assert epoch_keys == {"val/loss"}
    assert "train_epoch/loss" in trainer.callback_metrics


def test_with_gradient_accumulation_each_optimizer_step_is_one_row_of_its_last_micro_batch(
    tmp_path,
):
    batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(4)]
    model = ThreeTaskNet()
    with torch.no_grad():
        second = reference_task_losses(model, batches[1])  # the model of the first step
    trainer = _fit_three_tasks(
        tmp_path, [LossLogger(plot=False)], batches=batches, model=model, accumulate_grad_batches=2
    )
    rows = [r for r in _read_csv(trainer.logger.log_dir + "/metrics.csv") if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == [0, 1]
    # The first optimizer step's row holds its second micro-batch's figures (the model has not
    # moved yet); Lightning's own step metrics take the same.
    for task, loss in second.items():
        assert float(rows[0][f"train/loss/{task}"]) == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("bad", [2, 3], ids=["first micro-batch", "last micro-batch"])
def test_a_step_skipped_amid_accumulation_logs_no_row_and_leaves_the_epoch_figures_alone(
    tmp_path, bad
):
    # The model does not move on the skipped step: the fit without its two micro-batches takes
    # the same steps, and its epoch figures are the ones to log.
    batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(6)]
    batches[bad][0][0, :] = torch.nan
    figures = []
    for fitted in (batches, batches[:2] + batches[4:]):
        torch.manual_seed(0)
        model = ThreeTaskNet()
        model.nonfinite = "skip"
        trainer = _fit_three_tasks(
            tmp_path / str(len(figures)),
            [LossLogger(plot=False)],
            batches=fitted,
            model=model,
            accumulate_grad_batches=2,
        )
        rows = _read_csv(trainer.logger.log_dir + "/metrics.csv")
        figures.append(
            {
                "steps": [int(r["step"]) for r in rows if r["train/loss"]],
                "epoch": {
                    k: float(v) for r in rows for k, v in r.items() if "train_epoch/" in k and v
                },
            }
        )
    skipped, without = figures
    assert skipped["steps"] == [0, 2] and without["steps"] == [0, 1]
    assert skipped["epoch"] == pytest.approx(without["epoch"], rel=1e-6)


def test_train_loss_on_the_progress_bar_is_every_steps_own():
    class ProgressBarAfterEachStep(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            shown = trainer.progress_bar_metrics.get("train/loss")
            self.seen.append((shown, pl_module.loss_record.objective.item()))

    seen = ProgressBarAfterEachStep()
    # log_every_n_steps=50 and 4 steps: the loggers get nothing, the bar every step.
    trainer = L.Trainer(
        max_epochs=1,
        log_every_n_steps=50,
        callbacks=[LossLogger(plot=False), seen],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(4)]
    trainer.fit(ThreeTaskNet(), train_dataloaders=torch.utils.data.DataLoader(batches, None))
    assert len(seen.seen) == 4
    for shown, objective in seen.seen:
        assert shown == pytest.approx(objective, rel=1e-6)


def test_a_task_without_a_label_in_a_step_logs_no_point_there(tmp_path):
    """A NaN loss and weights of 0 would spoil the loggers' summaries (W&B's min and last)."""
    batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(3)]
    batches[1][1]["price"][:] = torch.nan
    trainer = _fit_three_tasks(tmp_path, [LossLogger(plot=False)], batches=batches)
    rows = [r for r in _read_csv(trainer.logger.log_dir + "/metrics.csv") if r["train/loss"]]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    for figure in ("loss", "weight", "weighted", "share"):
        assert [bool(r[f"train/{figure}/price"]) for r in rows] == [True, False, True], figure
        assert all(r[f"train/{figure}/kind"] for r in rows), figure
    assert math.isfinite(float(rows[1]["train/loss"]))


def test_each_tasks_row_has_its_own_first_best_last_loss_and_final_weight():
    # The final weight: the last logged step that had the task (b has none at the last step).
    trajectory = Trajectory()
    steps = (((4.0, 1.0), (0.5, 2.0)), ((3.0, 0.5), (0.7, 1.5)), ((3.5, torch.nan), (0.9, 0.0)))
    for losses, weights in steps:
        record = LossRecord(
            "train", ("a", "b"), torch.tensor(losses), torch.tensor(weights), torch.ones(2)
        )
        trajectory.add(len(trajectory.steps), record)
    trajectory.flush()
    assert trajectory.summary_rows(("a", "b")) == [
        ["a", 4.0, 3.0, 3.5, pytest.approx(0.9)],
        ["b", 1.0, 0.5, 0.5, pytest.approx(1.5)],
    ]


# ----------------------------------------------------------------------------- method state
class LearnedLogVar(WeightingCallback):
    """A loss-based stand-in with per-task state: w_k = exp(-s_k), s_k = 0.1 k."""

    def task_weights(self, pl_module, step):
        return self.state_to_log()["log_var"].to(step.losses).neg().exp()

    def state_to_log(self):
        return {"log_var": torch.tensor([0.0, 0.1, 0.2])}


def _fit_three_tasks(
    root, callbacks, log_every_n_steps=1, batches=None, model=None, **trainer_kwargs
) -> L.Trainer:
    if batches is None:
        batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(4)]
    trainer = L.Trainer(
        max_epochs=1,
        log_every_n_steps=log_every_n_steps,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"logger": CSVLogger(root), **trainer_kwargs},
    )
    model = ThreeTaskNet() if model is None else model
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, None))
    return trainer


def test_method_state_is_logged_per_task_and_gradients_only_for_gradient_methods(tmp_path):
    trainer = _fit_three_tasks(tmp_path, [LossLogger(), LearnedLogVar()])
    rows = _read_csv(trainer.logger.log_dir + "/metrics.csv")
    step_rows = [row for row in rows if row["train/loss/price"]]
    assert len(step_rows) == 4
    for row in step_rows:
        for index, task in enumerate(("price", "kind", "sold")):
            assert float(row[f"train/log_var/{task}"]) == pytest.approx(0.1 * index)
    assert not [column for column in rows[0] if "grad_" in column]


@pytest.mark.parametrize(
    "name",
    [
        "GradNorm",
        "MGDA",
        "PCGrad",
        "CAGrad",
        "IMTLG",
        "NashMTL",
        "AlignedMTL",
        "UPGrad",
        "GradVac",
        "DBMTL",
    ],
)
def test_every_gradient_method_logs_each_tasks_gradient_norm_and_cosines(tmp_path, name):
    trainer = _fit_three_tasks(tmp_path, [LossLogger(), getattr(callbacks, name)()])
    rows = _read_csv(trainer.logger.log_dir + "/metrics.csv")
    step_rows = [row for row in rows if row["train/loss/price"]]
    for task in ("price", "kind", "sold"):
        assert all(row[f"train/grad_norm/{task}"] for row in step_rows), task
    assert all(row["train/grad_cos/price~kind"] for row in step_rows)


class StateBeforeEachStep(L.Callback):
    def __init__(self) -> None:
        self.states: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})


@pytest.mark.parametrize("name", ["MGDA", "UPGrad"])
def test_the_logged_gradient_norms_and_cosines_are_those_of_plain_autograd(tmp_path, name):
    # Per step, each task's gradient of the shared trunk by plain autograd from the model as the
    # step found it: the logged norm and every pair's cosine must be theirs.
    batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(3)]
    before = StateBeforeEachStep()
    trainer = _fit_three_tasks(
        tmp_path, [LossLogger(), getattr(callbacks, name)(), before], batches=batches
    )
    step_rows = [
        r for r in _read_csv(trainer.logger.log_dir + "/metrics.csv") if r["train/loss/price"]
    ]
    assert len(step_rows) == len(batches)
    names = ("price", "kind", "sold")
    for row, state, batch in zip(step_rows, before.states, batches, strict=True):
        model = ThreeTaskNet()
        model.load_state_dict(state)
        losses = reference_task_losses(model, batch)
        trunk = list(model.trunk.parameters())
        gradients = [
            torch.cat(
                [g.flatten() for g in torch.autograd.grad(losses[t], trunk, retain_graph=True)]
            )
            for t in names
        ]
        for task, gradient in zip(names, gradients, strict=True):
            logged = float(row[f"train/grad_norm/{task}"])
            assert logged == pytest.approx(gradient.norm().item(), rel=1e-4), task
        for i, j in ((0, 1), (0, 2), (1, 2)):
            cosine = torch.nn.functional.cosine_similarity(gradients[i], gradients[j], dim=0)
            logged = float(row[f"train/grad_cos/{names[i]}~{names[j]}"])
            assert logged == pytest.approx(cosine.item(), abs=1e-4), (names[i], names[j])


def test_no_logger_no_trajectory(tmp_path):
    logger = LossLogger()
    trainer = _fit_three_tasks(tmp_path, [logger], logger=False)
    assert trainer.state.finished and logger._trajectory is None
    assert not list(tmp_path.rglob("*.png"))


# ----------------------------------------------------------------------------- DDP
class SpyRun:
    """Stands in for a W&B run: every call is written to this process's own file."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.id = Path(out_dir), "spy"
        self.dir = str(self.out_dir / "files")
        self.config = self

    def update(self, values, **kwargs) -> None:  # run.config.update
        self._note("config.update", values)

    def _note(self, call: str, what) -> None:
        rank = dist.get_rank() if dist.is_initialized() else "main"
        keys = sorted(what) if isinstance(what, dict) else [what]
        with open(self.out_dir / f"calls-{rank}.txt", "a") as handle:
            handle.write(f"{call} {' '.join(keys)}\n")

    def define_metric(self, name, **kwargs) -> None:
        self._note("define_metric", name)

    def log(self, metrics) -> None:
        self._note("log", metrics)


class SpyWandbLogger(WandbLogger):
    """A WandbLogger whose run is a SpyRun, reachable from EVERY rank (no rank-zero guard), so a
    call made on another rank would show in that rank's file."""

    def __init__(self, out_dir: str) -> None:
        super().__init__(offline=True, save_dir=out_dir)
        self._spy = SpyRun(out_dir)

    @property
    def experiment(self):
        return self._spy


class CollectivesAround(L.Callback):
    """Placed before (``opening``) and after the callbacks under test: counts the collectives
    they issue in each hook, and those of each whole training and validation step; writes them
    per rank."""

    HOOKS = ("on_train_batch_end", "on_train_epoch_end", "on_validation_epoch_end", "on_fit_end")

    def __init__(self, opening: bool, out_dir: str, shared: dict) -> None:
        self.opening, self.out_dir, self.shared = opening, out_dir, shared

    def _bracket(self, hook: str) -> None:
        if self.opening:
            self.shared["hook"] = CollectiveCounter().__enter__()
            return
        self.shared["hook"].__exit__()
        self.shared.setdefault(hook, []).append(self.shared["hook"].calls)

    def on_train_batch_start(self, *args) -> None:
        if self.opening:
            self.shared["step"] = CollectiveCounter().__enter__()

    def on_train_batch_end(self, trainer, *args) -> None:
        self._bracket("on_train_batch_end")
        if not self.opening:
            self.shared["step"].__exit__()
            self.shared.setdefault("step", [])
            self.shared.setdefault("steps", []).append(self.shared["step"].calls)

    def on_train_epoch_end(self, *args) -> None:
        self._bracket("on_train_epoch_end")

    def on_validation_batch_start(self, *args) -> None:
        if self.opening:
            self.shared["val_step"] = CollectiveCounter().__enter__()

    def on_validation_batch_end(self, *args) -> None:
        if not self.opening:
            self.shared["val_step"].__exit__()
            self.shared.setdefault("val_steps", []).append(self.shared["val_step"].calls)

    def on_validation_epoch_end(self, trainer, *args) -> None:
        if not trainer.sanity_checking:
            self._bracket("on_validation_epoch_end")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._bracket("on_fit_end")
        if not self.opening:
            facts = {hook: self.shared[hook] for hook in (*self.HOOKS[1:], "steps", "val_steps")}
            facts["on_train_batch_end"] = self.shared["on_train_batch_end"]
            torch.save(facts, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class TwoRankNet(ThreeTaskNet):
    def train_dataloader(self):
        batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(8)]
        return torch.utils.data.DataLoader(batches, batch_size=None)

    def val_dataloader(self):
        return torch.utils.data.DataLoader([make_batch(4, seed=99, dtype=torch.float32)] * 4, None)


@pytest.mark.ddp
def test_under_ddp_only_rank_zero_writes_and_logging_adds_no_collective(tmp_path):
    shared: dict = {}
    callbacks = [
        CollectivesAround(True, str(tmp_path), shared),
        LossLogger(),
        # raise_on makes every rank evaluate, so that they would raise together.
        LossBalanceMonitor(window=2, raise_on=["nonfinite_loss"]),
        CollectivesAround(False, str(tmp_path), shared),
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_epochs=1,
        log_every_n_steps=1,
        logger=SpyWandbLogger(str(tmp_path)),
        callbacks=callbacks,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TwoRankNet())

    for rank in (0, 1):
        facts = torch.load(tmp_path / f"rank{rank}.pt")
        # Each rank's 4 steps: the mixin's one all-reduce, nothing from logging or monitoring.
        assert facts["steps"] == [["all_reduce"]] * 4, rank
        assert facts["on_train_batch_end"] == [[]] * 4
        # Its two validation batches (the sampler gives each rank two): the evaluation's one
        # all-reduce each, after the mixin's check, at the epoch's first batch only, that every
        # rank has as many.
        assert facts["val_steps"] == [["all_reduce", "all_reduce"], ["all_reduce"]], rank
        assert facts["on_train_epoch_end"] == facts["on_validation_epoch_end"] == [[]]
        assert facts["on_fit_end"] == [[]]
    assert not (tmp_path / "calls-1.txt").exists()
    calls = (tmp_path / "calls-0.txt").read_text().splitlines()
    assert any(call.startswith("define_metric train/loss/price") for call in calls)
    assert "config.update lossagg" in calls
    assert any("lossagg/weights" in call and "lossagg/task_summary" in call for call in calls)
    assert [p.name for p in tmp_path.rglob("*.png")] == ["loss_trajectories.png"]


def test_lightnings_sync_dist_advice_is_silenced_for_the_global_epoch_figures_alone():
    # Under DDP Lightning advises sync_dist=True for every epoch-level figure; LossLogger's are
    # global already (advice that a newcomer running examples/ddp.py would follow for nothing).
    from lightning.pytorch.utilities import rank_zero_warn
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    advice = "It is recommended to use `self.log({!r}, ..., sync_dist=True)` when logging on epoch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # whatever -W or PYTHONWARNINGS say
        LossLogger().setup(trainer, ThreeTaskNet(), "fit")
        for key in ("val/loss/price", "train_epoch/weight/kind", "val/static_loss", "val/acc"):
            rank_zero_warn(advice.format(key), category=PossibleUserWarning)
    assert [str(w.message) for w in caught] == [advice.format("val/acc")]


def test_epoch_figures_keep_a_float64_runs_precision():
    batches = [make_batch(6, seed=1), make_batch(3, seed=2)]
    model = ThreeTaskNet(lr=0.0).double()
    trainer = quiet_trainer(1, steps=2, callbacks=[LossLogger()])
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    with torch.no_grad():
        predictions = model(torch.cat([batch[0] for batch in batches]))
        price = torch.cat([batch[1]["price"] for batch in batches])
        valid = ~torch.isnan(price)
        expected = torch.nn.functional.mse_loss(predictions["price"][valid], price[valid])
    logged = trainer.callback_metrics["train_epoch/loss/price"]
    assert logged.dtype == torch.float64
    assert logged.item() == pytest.approx(expected.item(), rel=1e-12)


def test_the_sanity_checks_batch_is_no_part_of_the_first_validation_epoch():
    # The sanity check's figures are not logged; they must not stay behind either, to count a
    # second time in the real validation epoch's means.
    val = [make_batch(6, seed=s, dtype=torch.float32) for s in (1, 2)]
    model = ThreeTaskNet(lr=0.0)  # frozen: the sanity check and the epoch see the same model
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        callbacks=[LossLogger(plot=False)],
        num_sanity_val_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train = one_batch_loader(make_batch(6, seed=0, dtype=torch.float32))
    trainer.fit(model, train, torch.utils.data.DataLoader(val, batch_size=None))
    price = torch.cat([batch[1]["price"] for batch in val])
    with torch.no_grad():
        predictions = model(torch.cat([batch[0] for batch in val]))["price"]
    valid = ~price.isnan()
    exact = torch.nn.functional.mse_loss(predictions[valid], price[valid]).item()
    assert float(trainer.callback_metrics["val/loss/price"]) == pytest.approx(exact, rel=1e-5)


def test_a_logger_reused_after_a_fit_aborted_amid_an_accumulated_step_starts_clean():
    # Micro-batch 0 reaches the logger (its record waits for the optimizer step), micro-batch 1
    # raises: the waiting record must not join the next fit's first step.
    aborted = [make_batch(6, seed=s, dtype=torch.float32) for s in (1, 2)]
    aborted[1][1]["price"][0] = torch.inf
    logger = LossLogger(plot=False)
    with pytest.raises(NonFiniteLossError):
        quiet_trainer(1, precision="32-true", callbacks=[logger], accumulate_grad_batches=2).fit(
            ThreeTaskNet(), torch.utils.data.DataLoader(aborted, batch_size=None)
        )
    model = ThreeTaskNet()
    trainer = quiet_trainer(1, precision="32-true", callbacks=[logger])
    batch = make_batch(6, seed=3, dtype=torch.float32)
    trainer.fit(model, one_batch_loader(batch))
    # One step in the epoch: its figures are that step's, nothing of the aborted fit's.
    logged = float(trainer.callback_metrics["train_epoch/loss/price"])
    assert logged == pytest.approx(model.loss_record.losses[0].item(), rel=1e-6)


def test_step_figures_keep_a_float64_runs_precision(tmp_path):
    batch = make_batch(6, seed=1)  # float64
    model = ThreeTaskNet(lr=0.0).double()
    trainer = _fit_three_tasks(
        tmp_path, [LossLogger(plot=False)], batches=[batch], model=model, precision="64-true"
    )
    (row,) = [r for r in _read_csv(trainer.logger.log_dir + "/metrics.csv") if r["train/loss"]]
    with torch.no_grad():
        expected = reference_task_losses(model, batch)
    for task, loss in expected.items():
        assert float(row[f"train/loss/{task}"]) == pytest.approx(loss.item(), rel=1e-12), task
    objective = 2 * expected["price"] + expected["kind"] + expected["sold"]
    assert float(row["train/loss"]) == pytest.approx(objective.item(), rel=1e-12)


class LeavesOutValidationBatchZero(ThreeTaskNet):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            return None  # no record of its own: the model still holds its training record
        return super().validation_step(batch, batch_idx, dataloader_idx)


def test_a_training_record_left_on_the_model_is_no_part_of_a_validation_epoch():
    model = LeavesOutValidationBatchZero(lr=0.0)
    quiet_trainer(1, precision="32-true").fit(
        model, one_batch_loader(make_batch(6, seed=0, dtype=torch.float32))
    )
    assert model.loss_record.stage == "train"
    val = [make_batch(6, seed=s, dtype=torch.float32) for s in (1, 2)]
    trainer = L.Trainer(logger=False, callbacks=[LossLogger(plot=False)], enable_progress_bar=False)
    trainer.validate(model, torch.utils.data.DataLoader(val, batch_size=None), verbose=False)
    with torch.no_grad():
        expected = reference_task_losses(model, val[1])
    for task, loss in expected.items():
        logged = float(trainer.callback_metrics[f"val/loss/{task}"])
        assert logged == pytest.approx(loss.item(), rel=1e-5), task


def test_the_first_loss_can_be_the_best():
    trajectory = Trajectory()
    for step, loss in enumerate((1.0, 3.0, 2.0)):
        record = LossRecord("train", ("a",), torch.tensor([loss]), torch.ones(1), torch.ones(1))
        trajectory.add(step, record)
    trajectory.flush()
    assert trajectory.summary_rows(("a",)) == [["a", 1.0, 1.0, 2.0, 1.0]]
