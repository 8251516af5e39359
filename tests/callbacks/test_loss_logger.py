"""LossLogger through real loggers: CSV here, W&B offline in tests/test_cli.py."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_lossagg.callbacks import LossLogger
from lightning_lossagg.demos import PenguinsDataModule, PenguinsNet
from tests.models import ThreeTaskNet, make_batch, one_batch_loader

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
    for row in step_rows:
        shares = sum(float(row[f"train/share/{t}"]) for t in TASKS)
        assert shares == pytest.approx(1.0)
        weighted = sum(float(row[f"train/weighted/{t}"]) for t in TASKS)
        assert weighted == pytest.approx(float(row["train/loss"]), rel=1e-5)


def test_epoch_values_are_sample_weighted_global_means(tmp_path):
    # Two batches of different sizes and label counts: the epoch loss must weight by valid labels,
    # not average the two batch means.
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
