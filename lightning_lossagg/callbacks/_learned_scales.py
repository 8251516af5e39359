"""The machinery of UW and IMTL-L: per-task log-scales learned by their own Adam."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks._checks import check_positive, require_multitask, usable_tasks
from lightning_lossagg.callbacks._task_parameters import TaskParameters
from lightning_lossagg.weighting import WeightingCallback


class LearnedScalesWeighting(WeightingCallback):
    """Weights from learnable per-task values ``s`` that minimise an objective of the losses.

    Every training step returns ``self._weights(s)`` and keeps the step's global losses; once per
    optimizer step of the model (``on_before_optimizer_step``, after the backward of every
    accumulated micro-batch) one Adam step moves ``s`` along ``self._gradient(w, mean_losses)``,
    the gradient of the method's objective at the current weights ``w = self._weights(s)``, where
    ``mean_losses`` averages each task's global loss over the micro-batches in which it had a
    valid sample. A task with none is not stepped.
    Every input is global, so ``s`` stays identical on every rank; nothing leaves the device.

    Subclasses set :attr:`state_name` and implement :meth:`_weights` and :meth:`_gradient`.
    """

    state_name = "scale"

    def __init__(self, lr: float) -> None:
        self.lr = check_positive("lr", lr, "Use e.g. lr=1e-2 for the log-scales' own Adam.")
        self._scales = TaskParameters(self.lr)
        self._loss_sum: Tensor | None = None
        # Per task, the micro-batches with a usable loss: a bool mask after the first one.
        self._loss_count: Tensor | None = None
        self._weights_now: Tensor | None = None  # self._weights(s) until s moves

    def _weights(self, scales: Tensor) -> Tensor:
        raise NotImplementedError

    def _gradient(self, weights: Tensor, losses: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"lr": self.lr}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        task_names = require_multitask(self, pl_module)
        self._scales.set_num_tasks(len(task_names), type(self).__name__)

    @override
    def task_weights(self, pl_module: L.LightningModule, step: GlobalTaskLosses) -> Tensor:
        scales = self._scales.values(step.losses)
        usable = usable_tasks(step)
        losses = torch.where(usable, step.losses, 0.0).to(scales.dtype)
        if self._loss_sum is None or self._loss_count is None:
            # One micro-batch so far: its mask stands for the counts (no conversion, no division).
            self._loss_sum, self._loss_count = losses, usable
        else:
            self._loss_sum = self._loss_sum.to(scales.device) + losses
            self._loss_count = self._loss_count.to(scales.device, scales.dtype) + usable
        self._weights_now = self._weights(scales)
        return self._weights_now

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._loss_sum is None or self._loss_count is None:
            return
        weights = self._weights_now
        if weights is None:  # a pending accumulation restored from a checkpoint
            weights = self._weights(self._scales.values(self._loss_sum))
        mean_losses, stepped = self._loss_sum, self._loss_count
        if stepped.dtype != torch.bool:  # counts of several micro-batches
            mean_losses, stepped = mean_losses / stepped.clamp(min=1), stepped > 0
        self._scales.step(self._gradient(weights, mean_losses), stepped)
        self._loss_sum = self._loss_count = self._weights_now = None

    @override
    def state_to_log(self) -> dict[str, Tensor]:
        scales = self._scales.snapshot()
        return {} if scales is None else {self.state_name: scales}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "scales": self._scales.state_dict(),
            "loss_sum": self._loss_sum,
            "loss_count": self._loss_count,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._scales.load_state_dict(state_dict["scales"])
        self._loss_sum, self._loss_count = state_dict["loss_sum"], state_dict["loss_count"]
        self._weights_now = None
