"""The model's loss records as the logging callbacks take them: each once, and one per
optimizer step."""

from __future__ import annotations

import lightning as L
import torch

from lightning_lossagg.weighting import LossRecord


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


def optimizer_step_record(records: list[LossRecord]) -> LossRecord:
    """One training record of an optimizer step's micro-batches: per task the sample-weighted
    mean of their losses (NaN without a sample), the sum of their counts, and the mean of its
    weights over the micro-batches where it had a sample."""
    if len(records) == 1:
        return records[0]
    counts = torch.stack([record.counts for record in records])
    valid = counts > 0
    losses = torch.where(valid, torch.stack([record.losses for record in records]), 0.0)
    weights = torch.where(valid, torch.stack([record.weights for record in records]), 0.0)
    total = counts.sum(0)
    mean_losses = (losses * counts).sum(0) / total
    mean_weights = weights.sum(0) / valid.sum(0).clamp(min=1)
    return LossRecord("train", records[-1].names, mean_losses, mean_weights, total)
