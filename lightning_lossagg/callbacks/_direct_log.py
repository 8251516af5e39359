"""Writing per-step figures straight to the trainer's loggers, as Lightning's LearningRateMonitor
does: one call per logger, instead of ``LightningModule.log``'s bookkeeping for every key (which
costs more than a training step's own math when a record has dozens of keys)."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning logs the current training batch's metrics at."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def write_metrics(trainer: L.Trainer, metrics: Mapping[str, float]) -> None:
    """Write ``metrics`` to every logger at the current training batch's logging step, from rank
    zero only (the other ranks' loggers write nothing anyway)."""
    if not trainer.is_global_zero:
        return
    step = logging_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)
