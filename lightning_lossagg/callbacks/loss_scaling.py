"""``LossScaling``: every task loss divided by its own level, so that all start at 1."""

from __future__ import annotations

import math
import operator
from functools import partial
from numbers import Real
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg import distributed
from lightning_lossagg.aggregation import GlobalTaskLosses, on_device
from lightning_lossagg.callbacks._checks import (
    LossesReadLater,
    check_int_at_least,
    check_positive,
    require_multitask,
    usable_tasks,
)
from lightning_lossagg.callbacks._task_parameters import fixed_num_tasks
from lightning_lossagg.functional.loss_scaling import (
    level_floor,
    loss_scaling_weights,
    update_loss_levels,
)
from lightning_lossagg.mixin import MultiTaskMixin
from lightning_lossagg.weighting import WeightingCallback

LevelMode = Literal["ema", "initial"]


class LossScaling(WeightingCallback):
    r"""Dynamic loss scaling: each task's loss divided by its running (or initial) level.

    .. math::
        \alpha_k = \frac{1}{\max(\ell_k, \epsilon)}, \qquad
        \ell_k \leftarrow \beta\, \ell_k + (1 - \beta)\, L_k \quad (\texttt{mode="ema"}),

    so every scaled loss :math:`\alpha_k L_k` sits near 1 and no task dominates by its units
    alone. With ``mode="ema"`` the level :math:`\ell_k` is an exponential moving average of the
    task's global loss (decay :math:`\beta`: it remembers about the last :math:`1/(1-\beta)`
    steps; its first value is the first loss), updated at every training step, this one included,
    warm-up included. With ``mode="initial"`` the level is the task's global loss at the first
    step after the warm-up, then fixed: the loss ratio of GradNorm (Chen et al., 2018,
    `arXiv:1711.02257 <https://arxiv.org/abs/1711.02257>`_). There is no single paper for the EMA
    variant; it is a common heuristic.

    The weights are 1 during the first ``warmup_steps`` optimizer steps, and 1 for a task
    that has not yet had a valid sample. A task without a valid sample in a step keeps its level.
    Levels are kept on the device (on the CPU, once every task has one, computed in Python
    floats), saved in ``state_dict``, identical on every rank (global losses only), and logged
    as ``train/loss_level/<task>``. A negative global loss (a level below 0 would turn its
    task's weight around) raises before the optimizer step that met it updates the model (read
    from a host copy made without a stall).

    Args:
        mode: ``"ema"`` or ``"initial"``.
        decay: the EMA's decay :math:`\beta \in [0, 1)` (``mode="ema"``).
        warmup_steps: optimizer steps with weights of 1 before the scaling starts.
        eps: the floor :math:`\epsilon > 0` on the levels.

    Example:
        >>> callback = LossScaling(mode="ema", decay=0.9, warmup_steps=10)
    """

    finite_weights = True  # 1 / max(level, eps), or 1 without a level

    def __init__(
        self,
        mode: LevelMode = "ema",
        decay: float = 0.9,
        warmup_steps: int = 0,
        eps: float = 1e-8,
    ) -> None:
        if mode not in ("ema", "initial"):
            raise ValueError(
                f"`mode` must be 'ema' (a moving average of each loss) or 'initial' (the loss at "
                f"the first step after the warm-up); got {mode!r}."
            )
        if isinstance(decay, bool) or not isinstance(decay, Real) or not 0 <= decay < 1:
            raise ValueError(
                f"`decay` must be in [0, 1); got {decay!r}. Use e.g. decay=0.9 for a level that "
                "averages about the last 10 steps."
            )
        self.mode: LevelMode = mode
        self.decay: float = float(decay)
        self.warmup_steps: int = check_int_at_least(
            "warmup_steps", warmup_steps, 0, "Use 0 to scale from the first step."
        )
        self.eps: float = check_positive("eps", eps, "The default is 1e-8.")
        self._levels: Tensor | None = None
        self._has_level: Tensor | None = None
        # Whether every task has a level, as the host learnt it (from a copy of `_has_level` made
        # without a stall, read at the optimizer step): then the steps leave out the operations
        # that start a level, whose results they would not change. Never True before the device's.
        self._all_have_levels: bool = False
        self._has_level_copy: distributed.HostCopy | None = None
        self._weights: Tensor | None = None  # mode="initial": the weights of the fixed levels
        self._num_tasks: int = 0  # fixed by the first model: the state is per task
        self._unchecked: LossesReadLater = LossesReadLater(
            "LossScaling divides each task's loss by its level",
            partial(operator.gt, 0.0),  # loss < 0 (picklable, for ddp_spawn)
            "< 0",
            "Shift that task's loss to be >= 0",
        )

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "decay": self.decay,
            "warmup_steps": self.warmup_steps,
            "eps": self.eps,
        }

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        num_tasks = len(require_multitask(self, pl_module))
        self._num_tasks = fixed_num_tasks(self._num_tasks, num_tasks, type(self).__name__)
        self._unchecked.clear()

    @override
    def task_weights(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        self._unchecked.add(step.losses)  # checked at the optimizer step
        in_warmup = pl_module.trainer.global_step < self.warmup_steps
        if self._all_have_levels and not in_warmup:
            return self._weights_of_known_levels(step)
        if self.mode == "ema" or not in_warmup:
            self._update_levels(step)
        if in_warmup or self._levels is None or self._has_level is None:
            return torch.ones_like(step.losses)
        if self._has_level_copy is None:
            self._has_level_copy = distributed.HostCopy(self._has_level)
        weights = loss_scaling_weights(self._levels, self.eps, validate_args=False)
        return torch.where(self._has_level, weights, 1.0)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._unchecked.check(pl_module, trainer.global_step)
        if self._has_level_copy is not None:  # tasks only gain levels: the latest copy tells
            self._all_have_levels = bool(self._has_level_copy.get().all())
            self._has_level_copy = None

    def _update_levels(self, step: GlobalTaskLosses) -> None:
        usable = usable_tasks(step)
        losses = step.losses
        if self._levels is None or self._has_level is None:
            levels, has_level = torch.zeros_like(losses), torch.zeros_like(usable)
        else:
            levels = on_device(self._levels, losses.device)  # moved once, after a restore
            has_level = on_device(self._has_level, losses.device)
        if self.mode == "ema":
            # Non-finite where a task is not usable: left out by the last where below.
            moving_average = update_loss_levels(levels, losses, self.decay, validate_args=False)
            # A task's first level is its first loss, as update_loss_levels(None, ...) starts.
            candidate, update = torch.where(has_level, moving_average, losses), usable
        else:
            candidate, update = losses, usable & ~has_level
        self._levels = torch.where(update, candidate, levels)
        self._has_level = has_level | usable

    def _weights_of_known_levels(self, step: GlobalTaskLosses) -> Tensor:
        """Once every task has a level: the arithmetic of :meth:`_update_levels` and
        :meth:`task_weights` where ``has_level`` is all True, without their operations that only
        start levels (three per step; with fixed levels, all of them); on the CPU in Python
        floats (a float32 level may differ from the device's in its last bit, and in float64 too
        where torch fuses ``lerp``'s product and sum: which of the two ways a step takes is saved
        with the state, so a resumed fit takes the same way at every step)."""
        losses = step.losses
        levels = on_device(self._levels, losses.device)  # type: ignore[arg-type]
        if self.mode == "initial":  # fixed levels, fixed weights
            if self._weights is None or self._weights.device != losses.device:
                self._levels = levels
                self._weights = loss_scaling_weights(levels, self.eps, validate_args=False)
            return self._weights
        if losses.device.type in distributed.PYTHON_FLOAT_DEVICES:
            host_levels = _host_moving_levels(levels.tolist(), losses.tolist(), self.decay)
            self._levels = torch.tensor(host_levels, dtype=levels.dtype)
            floor = level_floor(self.eps, levels.dtype)
            # The reciprocals of the levels as kept (rounded to their dtype), as on the device.
            weights = [1.0 / max(level, floor) for level in self._levels.tolist()]
            return torch.tensor(weights, dtype=levels.dtype)
        moving_average = update_loss_levels(levels, losses, self.decay, validate_args=False)
        self._levels = torch.where(usable_tasks(step), moving_average, levels)
        return loss_scaling_weights(self._levels, self.eps, validate_args=False)

    @override
    def step_state(self) -> tuple[Any, ...]:
        """The levels and what follows from them (tensors are replaced, never changed), and the
        losses queued for the bound check."""
        levels = (self._levels, self._has_level, self._all_have_levels, self._weights)
        return levels, self._unchecked.queued()

    @override
    def put_back_step_state(self, state: tuple[Any, ...]) -> None:
        levels, queued = state
        self._levels, self._has_level, self._all_have_levels, self._weights = levels
        self._unchecked.put_back(queued)
        self._has_level_copy = None

    @override
    def state_to_log(self) -> dict[str, Tensor]:
        return {} if self._levels is None else {"loss_level": self._levels}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "levels": self._levels,
            "has_level": self._has_level,
            "all_have_levels": self._all_have_levels,
            "unchecked": self._unchecked.offending(),  # amid an optimizer step
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._levels, self._has_level = state_dict["levels"], state_dict["has_level"]
        # As the host had learnt it, not from `has_level`: a fit that learns it a step later
        # weighs that step on the device, to its rounding (see _weights_of_known_levels). An
        # older checkpoint lacks it: its first step resumed is weighed on the device.
        self._all_have_levels = bool(state_dict.get("all_have_levels", False))
        self._has_level_copy = self._weights = None
        self._unchecked.queue_again(state_dict.get("unchecked", ()))


def _host_moving_levels(levels: list[float], losses: list[float], decay: float) -> list[float]:
    """:func:`~lightning_lossagg.functional.loss_scaling.update_loss_levels` in Python floats,
    a task whose loss is not finite (no valid sample) keeping its level: on the CPU a handful of
    operations on K-element tensors cost several times this. ``torch.lerp``'s two forms."""
    weight = 1.0 - decay
    return [
        (level + weight * (loss - level) if weight < 0.5 else loss - (loss - level) * (1 - weight))
        if math.isfinite(loss)
        else level
        for level, loss in zip(levels, losses, strict=True)
    ]
