"""The model's loss records as the logging callbacks take them: each once, and one per
optimizer step."""

from __future__ import annotations

from typing import Any, NamedTuple

import lightning as L
import torch
from torch import Tensor

from lightning_lossagg.weighting import LossRecord


class SavedRecord(NamedTuple):
    """A training record restored from a checkpoint saved amid an optimizer step."""

    losses: Tensor
    weights: Tensor
    counts: Tensor
    stage: str = "train"

    @classmethod
    def of(cls, record: LossRecord | SavedRecord) -> list[Tensor]:
        """``record``'s figures as a checkpoint keeps them (on the host)."""
        return [record.losses.cpu(), record.weights.cpu(), record.counts.cpu()]

    def to(self, device: torch.device) -> SavedRecord:
        return SavedRecord(self.losses.to(device), self.weights.to(device), self.counts.to(device))


class FreshRecords:
    """The model's ``loss_record`` after each batch, unless it was taken already: a step of the
    model's own that returns without the mixin's (a batch it leaves out, say) leaves the record
    of the batch before in place, which must not count twice."""

    def __init__(self) -> None:
        self._last: LossRecord | None = None

    def take(self, pl_module: L.LightningModule) -> LossRecord | None:
        record: LossRecord | None = getattr(pl_module, "loss_record", None)
        if record is self._last:
            return None
        self._last = record
        return record


class StepRecords:
    """The training records of an optimizer step's micro-batches, each taken once: a logging
    callback counts them once the step is taken (a step skipped for a non-finite loss leaves
    none), and a checkpoint saved amid the step keeps them."""

    def __init__(self) -> None:
        self.fresh = FreshRecords()
        self.pending: list[LossRecord | SavedRecord] = []

    def end_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[LossRecord | None, list[LossRecord | SavedRecord] | None]:
        """After a training batch: its record (``None``: no fresh training record), and at its
        optimizer step's last micro-batch the step's records, forgotten here (``None`` amid the
        step, and for a step skipped for a non-finite loss)."""
        record = self.fresh.take(pl_module)
        if record is None or record.stage != "train":
            record = None
        else:
            self.pending.append(record)
        if trainer.fit_loop._should_accumulate():
            return record, None
        records, self.pending = self.pending, []
        if getattr(pl_module, "skipping_optimizer_step", False):
            return record, None
        return record, records

    def state(self) -> list[list[Tensor]]:
        """The pending records, for a checkpoint (on the host)."""
        return [SavedRecord.of(record) for record in self.pending]

    @staticmethod
    def restored(state: list[Any]) -> list[SavedRecord]:
        """The records :meth:`state` kept."""
        return [SavedRecord(*saved) for saved in state]


def optimizer_step_record(
    records: list[LossRecord | SavedRecord], names: tuple[str, ...]
) -> LossRecord:
    """One training record of an optimizer step's micro-batches (those restored from a
    checkpoint among them): per task the sample-weighted mean of their losses (NaN without a
    sample), the sum of their counts, and the mean of its weights over the micro-batches where
    it had a sample."""
    if len(records) == 1 and isinstance(records[0], LossRecord):
        return records[0]
    device = records[-1].losses.device
    records = [r.to(device) if isinstance(r, SavedRecord) else r for r in records]
    counts = torch.stack([record.counts for record in records])
    valid = counts > 0
    losses = torch.where(valid, torch.stack([record.losses for record in records]), 0.0)
    weights = torch.where(valid, torch.stack([record.weights for record in records]), 0.0)
    total = counts.sum(0)
    mean_losses = (losses * counts).sum(0) / total
    mean_weights = weights.sum(0) / valid.sum(0).clamp(min=1)
    return LossRecord("train", names, mean_losses, mean_weights, total)
