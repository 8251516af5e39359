"""``LossLogger``: every component of the objective, in every Lightning logger."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.weighting import LossRecord

STAGES = ("train", "val", "test")


class _EpochAccumulator:
    """Device-side sums of one epoch's records: no host sync until the epoch ends."""

    def __init__(self) -> None:
        self.loss_sum: Tensor | None = None
        self.weighted_sum: Tensor | None = None
        self.weight_sum: Tensor | None = None
        self.count: Tensor | None = None
        self.steps = 0

    def add(self, record: LossRecord) -> None:
        valid = record.counts > 0
        counts = record.counts.to(record.losses.dtype)
        loss_sum = torch.where(valid, record.losses * counts, 0.0)
        weighted_sum = torch.where(valid, record.weighted * counts, 0.0)
        if self.steps == 0:
            self.loss_sum, self.weighted_sum = loss_sum, weighted_sum
            self.weight_sum, self.count = record.weights.clone(), counts
        else:
            self.loss_sum = self.loss_sum + loss_sum
            self.weighted_sum = self.weighted_sum + weighted_sum
            self.weight_sum = self.weight_sum + record.weights
            self.count = self.count + counts
        self.steps += 1

    def means(self) -> tuple[list[float], list[float], list[float]] | None:
        """Sample-weighted epoch means of losses and weighted losses, and the mean weights."""
        if self.steps == 0:
            return None
        count = self.count.clamp(min=torch.finfo(self.count.dtype).tiny)
        packed = torch.stack(
            [
                torch.where(self.count > 0, self.loss_sum / count, torch.nan),
                self.weighted_sum / count,
                self.weight_sum / self.steps,
            ]
        )
        losses, weighted, weights = packed.tolist()  # one host transfer per epoch
        return losses, weighted, weights


class LossLogger(L.Callback):
    """Logs each task's global loss, weight, weighted loss and share, and the objective.

    Per training step (at the trainer's ``log_every_n_steps``): ``train/loss/<task>``,
    ``train/weight/<task>``, ``train/weighted/<task>``, ``train/share/<task>`` (the task's share
    of the objective), ``train/loss`` (also on the progress bar) and the weighting method's state
    (``train/<state>/<task>``, e.g. ``train/log_var/<task>``). Per epoch, as global
    sample-weighted means: the same keys under ``train_epoch/``, ``val/`` and ``test/``.

    Every figure is already global (the mixin's one all-reduce per step made it so), so nothing
    here issues a collective; loggers write on rank zero only.

    Args:
        prog_bar: show ``train/loss`` and ``val/loss`` on the progress bar.
    """

    def __init__(self, prog_bar: bool = True) -> None:
        self.prog_bar = prog_bar
        self._epochs: dict[str, _EpochAccumulator] = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "loss_record"):
            raise TypeError(
                f"LossLogger needs a MultiTaskMixin model; {type(pl_module).__name__} is not one. "
                "Add MultiTaskMixin to the model's bases."
            )

    # --------------------------------------------------------------------- per batch
    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        record = self._take(pl_module, "train")
        if record is None:
            return
        pl_module.log("train/loss", record.objective, prog_bar=self.prog_bar, batch_size=1)
        if trainer._logger_connector.should_update_logs:
            pl_module.log_dict(_step_metrics(record), batch_size=1)

    @override
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        i: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._take(pl_module, "val")

    @override
    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        i: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._take(pl_module, "test")

    def _take(self, pl_module: L.LightningModule, stage: str) -> LossRecord | None:
        record: LossRecord | None = pl_module.loss_record  # type: ignore[assignment]
        if record is None or record.stage != stage:
            return None
        self._epochs.setdefault(stage, _EpochAccumulator()).add(record)
        return record

    # --------------------------------------------------------------------- per epoch
    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epochs["train"] = _EpochAccumulator()

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epochs["val"] = _EpochAccumulator()

    @override
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epochs["test"] = _EpochAccumulator()

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch(pl_module, "train", "train_epoch")

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_epoch(pl_module, "val", "val")

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_epoch(pl_module, "test", "test")

    def _log_epoch(self, pl_module: L.LightningModule, stage: str, prefix: str) -> None:
        accumulator = self._epochs.pop(stage, None)
        means = accumulator.means() if accumulator is not None else None
        if means is None:
            return
        losses, weighted, weights = means
        names = pl_module.task_names  # type: ignore[attr-defined]
        objective = sum(weighted)
        metrics = {}
        for name, loss, weight, part in zip(names, losses, weights, weighted, strict=True):
            metrics[f"{prefix}/loss/{name}"] = loss
            metrics[f"{prefix}/weight/{name}"] = weight
            metrics[f"{prefix}/weighted/{name}"] = part
            metrics[f"{prefix}/share/{name}"] = part / objective if objective else 0.0
        pl_module.log_dict(metrics, batch_size=1)
        prog_bar = self.prog_bar and stage == "val"
        pl_module.log(f"{prefix}/loss", objective, prog_bar=prog_bar, batch_size=1)


def _step_metrics(record: LossRecord) -> dict[str, Tensor]:
    """The per-task figures of one record, under ``<stage>/<figure>/<task>``."""
    objective = record.objective
    share = record.weighted / torch.where(objective != 0, objective, 1.0)
    figures = {"loss": record.losses, "weight": record.weights, "weighted": record.weighted}
    figures["share"] = share
    figures.update(record.method_state)
    return {
        f"{record.stage}/{figure}/{name}": values[index]
        for figure, values in figures.items()
        for index, name in enumerate(record.names)
    }
