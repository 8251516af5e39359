"""Exact, distributed-safe multi-task loss aggregation and adaptive loss weighting for Lightning."""

from lightning_lossagg.aggregation import GlobalTaskLosses, global_task_losses
from lightning_lossagg.mixin import MultiTaskMixin, NonFiniteLossError
from lightning_lossagg.padding import PaddedForRanks
from lightning_lossagg.tasks import LOSSES, MaskedLoss, Task
from lightning_lossagg.weighting import LossRecord, WeightingCallback

__version__ = "0.1.0"

__all__ = [
    "LOSSES",
    "GlobalTaskLosses",
    "LossRecord",
    "MaskedLoss",
    "MultiTaskMixin",
    "NonFiniteLossError",
    "PaddedForRanks",
    "Task",
    "WeightingCallback",
    "global_task_losses",
]
