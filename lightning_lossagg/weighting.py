"""The interface between the mixin and adaptive weighting methods.

A weighting method is a Lightning callback that, once per training step, turns the step's global
task losses into a weight vector ``w`` (length K, identical on every rank). The mixin multiplies it
by the static ``Task.weight`` preferences and hands ``sum_k w_k t_k`` to backward. Callbacks keep
their own state (histories, learnable log-variances and their optimizer) and save it in
``state_dict``: the model's own ``state_dict`` never depends on how it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning as L
from torch import Tensor

if TYPE_CHECKING:
    from lightning_lossagg.aggregation import GlobalTaskLosses


class WeightingCallback(L.Callback):
    """Base class of adaptive task-weighting methods.

    Subclasses implement :meth:`task_weights`. It runs inside ``training_step``, after the step's
    one all-reduce, with the global figures of the step; whatever it computes from them alone is
    identical on every rank. Tasks with ``step.valid[k] == False`` (no valid sample anywhere this
    step) have a NaN loss: leave them out of any state update; their weight is ignored.
    """

    def task_weights(self, pl_module: L.LightningModule, step: GlobalTaskLosses) -> Tensor:
        """The weights ``w`` (shape ``[K]``, detached) for this training step."""
        raise NotImplementedError

    def backward_objective(
        self, pl_module: L.LightningModule, step: GlobalTaskLosses, weights: Tensor, static: Tensor
    ) -> Tensor:
        """The scalar handed to backward. Default: ``sum_k w_k t_k`` (``weights`` already include
        the static preferences ``static``). Gradient methods override it to send the weighted
        combination to the shared part and each head its own task's gradient."""
        return (weights * step.local_terms).sum()

    def state_to_log(self) -> dict[str, Tensor]:
        """Method state worth seeing, per task: ``{"log_var": tensor[K]}`` for example."""
        return {}

    @property
    def method_arguments(self) -> dict[str, Any]:
        """The method's arguments, for the run config and ``state_key``."""
        return {}


@dataclass(frozen=True)
class LossRecord:
    """A detached record of one step, kept on the module for loggers and monitors.

    Attributes:
        stage: ``"train"``, ``"val"`` or ``"test"``.
        names: task names.
        losses: global task losses (NaN where a task had no valid sample).
        weights: the effective weights ``w_k`` (adaptive times static).
        weighted: ``w_k * L_k`` (0 where a task had no valid sample).
        objective: ``sum_k w_k L_k``, the global objective.
        counts: the step's weight per task in an epoch mean (global valid samples).
        method_state: per-task method state to log, e.g. ``{"log_var": tensor[K]}``.
    """

    stage: str
    names: tuple[str, ...]
    losses: Tensor
    weights: Tensor
    weighted: Tensor
    objective: Tensor
    counts: Tensor
    method_state: dict[str, Tensor]
