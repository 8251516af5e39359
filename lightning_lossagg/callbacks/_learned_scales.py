"""The machinery of UW and IMTL-L: per-task log-scales learned by their own Adam, on the host."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, cast

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg import distributed
from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks._checks import check_positive, require_multitask
from lightning_lossagg.callbacks._task_parameters import HostTaskParameters
from lightning_lossagg.mixin import MultiTaskMixin
from lightning_lossagg.weighting import WeightingCallback

# The log-scales stay within +-LOG_SCALE_BOUND: weights between e^-30 and e^30 (the balance of a
# task loss between 1e-13 and 1e13). A loss that stays at exactly 0 (a task fitted perfectly)
# would otherwise drive its log-scale at a constant rate for ever, until its weight overflowed.
LOG_SCALE_BOUND = 30.0


class _Accumulated(NamedTuple):
    """Per task, over an optimizer step's micro-batches so far: the sum of the finite global
    losses, their number and the lowest of them."""

    totals: list[float]
    counts: list[float]
    lowest: list[float]


# The host copies of the step's losses, the figures restored from a checkpoint, and s.
_StepState = tuple[list[distributed.HostCopy], _Accumulated | None, dict[str, Any] | None]


class LearnedScalesWeighting(WeightingCallback):
    """Weights from learnable per-task values ``s`` that minimise an objective of the losses.

    Every training step returns ``self._weights(s)`` and queues a copy of the step's global losses
    to the host; once per optimizer step of the model (``on_before_optimizer_step``, after the
    backward of every accumulated micro-batch) one Adam step moves ``s`` along
    ``self._gradient(w, mean_losses)``, the gradient of the method's objective at the current
    weights ``w = self._weights(s)``, where ``mean_losses`` averages each task's global loss over
    the micro-batches in which it was finite (a valid sample; an overflow is the mixin's to
    report). A task with none is not stepped. Every input is global, so ``s`` stays identical on
    every rank. ``s`` stays within ``±LOG_SCALE_BOUND`` (30): a task whose loss stays at 0 would
    drive it for ever.

    ``s``, Adam's state and this arithmetic live on the host in float64: ``K`` numbers, a few
    microseconds, where each operation on a ``K``-element tensor would cost a kernel launch or a
    dispatch. A step's device work is the copy of ``K`` losses to the host, queued without
    stalling, and once per optimizer step the copy of ``K`` weights to the device.

    Subclasses set :attr:`state_name` and implement :meth:`_weight` and :meth:`_derivative`, one
    task's weight and objective derivative, on Python floats.
    """

    state_name = "scale"
    finite_weights = True  # formulas of s on the host, finite

    def __init__(self, lr: float) -> None:
        self.lr = check_positive("lr", lr, "Use e.g. lr=1e-2 for the log-scales' own Adam.")
        self._scales = HostTaskParameters(self.lr, bound=LOG_SCALE_BOUND)
        # This optimizer step's global losses on their way to the host, and (restored from a
        # checkpoint taken amid an accumulation) the figures of the micro-batches before.
        self._pending: list[distributed.HostCopy] = []
        self._restored: _Accumulated | None = None
        self._host_weights_of_s: list[float] | None = None  # the weights, until s moves
        self._device_weights: Tensor | None = None  # the same on the device
        self._logged: list[float] | None = None  # the s behind those weights, for the logs
        self._task_names: tuple[str, ...] = ()

    def _weight(self, task: int, scale: float) -> float:
        """Task ``task``'s weight ``w_k`` at the value ``s_k``."""
        raise NotImplementedError

    def _derivative(self, weight: float, loss: float) -> float:
        """The derivative of the method's objective in ``s_k``, at weight ``w_k`` and loss."""
        raise NotImplementedError

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"lr": self.lr}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._task_names = require_multitask(self, pl_module)
        self._scales.set_num_tasks(len(self._task_names), type(self).__name__)

    @override
    def task_weights(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        losses = step.losses
        self._pending.append(distributed.HostCopy(losses))
        weights = self._device_weights
        if weights is None or weights.device != losses.device:
            weights = distributed.to_device(self._host_weights(), like=losses)
            self._device_weights, self._logged = weights, self._scales.values
        return weights

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        model = cast(MultiTaskMixin, pl_module)  # required at setup
        if not self._pending and self._restored is None:
            return
        if model.skipping_optimizer_step:
            self._pending, self._restored = [], None
            return  # the model does not move: neither does s
        totals, counts, lowest = self._accumulated_losses()
        self._pending, self._restored = [], None
        named = zip(self._task_names, lowest, strict=True)
        negative = [(name, loss) for name, loss in named if loss < 0]
        if negative:  # the objective would be unbounded below in s: s would run away
            model.forget_refused_step()
            bad = ", ".join(f"{name!r} ({loss:g})" for name, loss in negative)
            raise ValueError(
                f"{type(self).__name__} learns a log-scale per task from its loss, which must be "
                f">= 0, but the global loss of task(s) {bad} was < 0 at global step "
                f"{trainer.global_step}. Shift that task's loss to be >= 0, or use another "
                "weighting method."
            )
        gradient = [
            self._derivative(weight, total / max(count, 1.0))
            for weight, total, count in zip(self._host_weights(), totals, counts, strict=True)
        ]
        self._scales.step(gradient, [count > 0 for count in counts])
        self._host_weights_of_s = self._device_weights = None

    @override
    def step_state(self) -> _StepState:
        """The step's losses on their way to the host (a list that grows: copied; empty before
        the step's first batch), the figures restored from a checkpoint, and ``s`` with its Adam
        (which a step left unfinished after ``on_before_optimizer_step`` has moved)."""
        return list(self._pending), self._restored, self._scales.kept()

    @override
    def put_back_step_state(self, state: _StepState) -> None:
        pending, self._restored, scales = state
        self._pending = list(pending)
        if scales is not self._scales.kept():
            self._scales.put_back(scales)
            self._host_weights_of_s = self._device_weights = None

    def _host_weights(self) -> list[float]:
        """The weights at the current ``s``, computed once per value of ``s``."""
        if self._host_weights_of_s is None:
            scales = enumerate(self._scales.values)
            self._host_weights_of_s = [self._weight(task, scale) for task, scale in scales]
        return self._host_weights_of_s

    def _accumulated_losses(self) -> _Accumulated:
        """This optimizer step's figures so far (the lowest loss: each must be >= 0, and a sum
        can hide one that was not)."""
        num_tasks = self._scales.num_tasks
        restored = self._restored
        if restored is None:
            restored = _Accumulated([0.0] * num_tasks, [0.0] * num_tasks, [math.inf] * num_tasks)
        totals, counts, lowest = (list(figures) for figures in restored)
        for copy in self._pending:
            for task, loss in enumerate(copy.get().tolist()):
                if math.isfinite(loss):  # NaN: no valid sample
                    totals[task] += loss
                    counts[task] += 1.0
                    lowest[task] = min(lowest[task], loss)
        return _Accumulated(totals, counts, lowest)

    @override
    def state_to_log(self) -> dict[str, Tensor]:
        """``s`` as the latest step's weights came from (not as its optimizer step left it)."""
        if self._logged is not None:  # a tensor only when a logger asks
            return {self.state_name: torch.tensor(self._logged, dtype=torch.float64)}
        scales = self._scales.snapshot()
        return {} if scales is None else {self.state_name: scales}

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scales": self._scales.state_dict()}
        state.update(loss_sum=None, loss_count=None, loss_min=None)
        if self._pending or self._restored is not None:  # saved amid an accumulation
            totals, counts, lowest = (
                torch.tensor(figures, dtype=torch.float64) for figures in self._accumulated_losses()
            )
            state.update(loss_sum=totals, loss_count=counts, loss_min=lowest)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._scales.load_state_dict(state_dict["scales"])
        totals, counts = state_dict["loss_sum"], state_dict["loss_count"]
        self._restored = None
        if totals is not None:
            lowest = state_dict.get("loss_min")  # (absent from older checkpoints)
            self._restored = _Accumulated(
                totals.double().tolist(),
                counts.double().tolist(),
                [math.inf] * len(totals) if lowest is None else lowest.double().tolist(),
            )
        self._pending, self._logged = [], None
        self._host_weights_of_s = self._device_weights = None
