"""``DWA``: Dynamic Weight Average, weights from the rate at which each task's loss falls."""

from __future__ import annotations

import math
import operator
from functools import partial
from numbers import Integral
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.aggregation import GlobalTaskLosses, finite, on_device
from lightning_lossagg.callbacks._checks import (
    LossesReadLater,
    check_positive,
    require_multitask,
)
from lightning_lossagg.callbacks._task_parameters import fixed_num_tasks
from lightning_lossagg.functional.dwa import dwa
from lightning_lossagg.mixin import MultiTaskMixin
from lightning_lossagg.weighting import WeightingCallback

_TENSOR_STATE = ("_loss_sum", "_loss_count", "_previous", "_before_previous")
# Steps whose losses are added to the period's sums at once: a few tensor operations per block
# instead of per step.
_BLOCK = 32


class DWA(WeightingCallback):
    r"""Dynamic Weight Average (Liu et al., 2019).

    `End-to-End Multi-Task Learning with Attention <https://arxiv.org/abs/1803.10704>`_
    (CVPR 2019). With :math:`\bar L_k(t)` the mean global loss of task :math:`k` over period
    :math:`t` (an epoch, or ``window_steps`` optimizer steps), weighted by each step's valid
    samples (``step.counts``),

    .. math::
        r_k = \frac{\bar L_k(t-1)}{\bar L_k(t-2)}, \qquad
        w_k = K \frac{\exp(r_k / T)}{\sum_i \exp(r_i / T)},

    and :math:`w_k = 1` during the first two periods. The weights are fixed within a period. A
    task without a valid sample in one of the two periods (or with :math:`\bar L_k(t-2) = 0`) has
    no rate and takes :math:`r_k = 1`, an unchanged loss. A rate of losses that change sign means
    nothing: a negative global loss is refused with a ``ValueError`` naming the task and the step,
    before the optimizer step that met it (from a copy read on the host without stalling the
    device), as LossScaling does.

    The period means are accumulated on the device (every micro-batch counts), the steps' losses
    kept and added in blocks of 32 steps, and the previous period is closed at the first step of
    the next one: a checkpoint taken anywhere in between holds it, and resuming is exact. Every
    input is global, so the weights are identical on every rank. Logged as
    ``train/loss_rate/<task>`` (:math:`r_k`) from the third period on.

    Args:
        temperature: the softmax temperature :math:`T > 0`; larger is more uniform.
        window_steps: if given, periods of this many optimizer steps instead of epochs.

    Example:
        >>> callback = DWA(temperature=2.0, window_steps=50)
    """

    finite_weights = True  # K·softmax of rates set to 1 where a task has none

    def __init__(self, temperature: float = 2.0, window_steps: int | None = None) -> None:
        self.temperature = check_positive(
            "temperature", temperature, "The paper uses temperature=2.0; larger is more uniform."
        )
        if window_steps is not None and (
            isinstance(window_steps, bool)
            or not isinstance(window_steps, Integral)
            or window_steps < 1
        ):
            raise ValueError(
                f"`window_steps` must be None (periods are epochs) or an int >= 1; got "
                f"{window_steps!r}."
            )
        self.window_steps = None if window_steps is None else int(window_steps)
        self._period: int | None = None
        self._completed_periods = 0
        self._loss_sum: Tensor | None = None
        self._loss_count: Tensor | None = None
        # This period's steps not yet in its sums: (losses, counts) each; restored from a
        # checkpoint, they are moved to the device at the next step.
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._pending_restored = False
        self._previous: Tensor | None = None
        self._before_previous: Tensor | None = None
        self._rates: Tensor | None = None
        self._weights: Tensor | None = None
        self._num_tasks: int = 0  # fixed by the first model: the state is per task
        self._unchecked = LossesReadLater(
            "DWA weighs each task by the ratio of its mean losses over two periods",
            partial(operator.gt, 0.0),  # loss < 0 (picklable, for ddp_spawn)
            "< 0",
            "Shift that task's loss to be >= 0",
        )

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "window_steps": self.window_steps}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        num_tasks = len(require_multitask(self, pl_module))
        self._num_tasks = fixed_num_tasks(self._num_tasks, num_tasks, type(self).__name__)
        self._unchecked.clear()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.window_steps is None and math.isinf(trainer.num_training_batches):
            rank_zero_warn(
                "DWA's periods are epochs, and this fit's training loader has no length: an "
                "endless stream never ends an epoch, and DWA's weights stay 1 until two have "
                "ended. Give DWA(window_steps=N) for periods of N optimizer steps."
            )

    @override
    def task_weights(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        self._unchecked.add(step.losses)  # read at the optimizer step (NaN: no valid sample)
        trainer = pl_module.trainer
        period = (
            trainer.current_epoch
            if self.window_steps is None
            else trainer.global_step // self.window_steps
        )
        if self._period is not None and period != self._period:
            self._close_period()
        self._period = period
        self._accumulate(step)
        if self._completed_periods < 2:
            return torch.ones_like(step.losses)
        if self._weights is None:
            self._rates, self._weights = self._rates_and_weights(step.losses.device)
        return self._weights

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._unchecked.check(pl_module, trainer.global_step)

    def _accumulate(self, step: GlobalTaskLosses) -> None:
        if self._pending_restored:
            device = step.counts.device
            self._pending = [(loss.to(device), count.to(device)) for loss, count in self._pending]
            self._pending_restored = False
        self._pending.append((step.losses, step.counts))
        if len(self._pending) == _BLOCK:
            self._add_pending()

    def _add_pending(self) -> None:
        """Adds the pending steps' losses, times their valid samples, to the period's sums (a
        task's non-finite or missing loss counts for nothing)."""
        if not self._pending:
            return
        losses = torch.stack([loss for loss, _ in self._pending])
        counts = torch.stack([count for _, count in self._pending])
        self._pending = []
        usable = finite(losses)  # NaN (not finite) for a task without a valid sample
        counts = torch.where(usable, counts, 0.0)
        weighted_losses = torch.where(usable, losses.to(counts.dtype) * counts, 0.0).sum(0)
        counts = counts.sum(0)
        if self._loss_sum is None or self._loss_count is None:
            self._loss_sum, self._loss_count = weighted_losses, counts
        else:
            self._loss_sum = on_device(self._loss_sum, counts.device) + weighted_losses
            self._loss_count = on_device(self._loss_count, counts.device) + counts

    def _close_period(self) -> None:
        self._add_pending()
        if self._loss_sum is None or self._loss_count is None:
            return
        seen = self._loss_count > 0
        means = torch.where(
            seen, self._loss_sum / torch.where(seen, self._loss_count, 1.0), torch.nan
        )
        self._before_previous, self._previous = self._previous, means
        self._loss_sum = self._loss_count = self._rates = self._weights = None
        self._completed_periods += 1

    def _rates_and_weights(self, device: torch.device) -> tuple[Tensor, Tensor]:
        assert self._previous is not None and self._before_previous is not None
        previous = on_device(self._previous, device)
        before = on_device(self._before_previous, device)
        has_rate = finite(previous) & finite(before) & (before > 0)
        previous = torch.where(has_rate, previous, 1.0)
        before = torch.where(has_rate, before, 1.0)
        return previous / before, dwa(previous, before, self.temperature, validate_args=False)

    @override
    def state_to_log(self) -> dict[str, Tensor]:
        return {} if self._rates is None else {"loss_rate": self._rates}

    @override
    def step_state(self) -> tuple[Any, ...]:
        """The periods' figures (tensors are replaced, never changed; the pending list grows),
        and the losses queued for the bound check."""
        tensors = tuple(getattr(self, name) for name in _TENSOR_STATE)
        periods = (self._period, self._completed_periods, self._rates, self._weights)
        queued = self._unchecked.queued()
        return list(self._pending), self._pending_restored, tensors, periods, queued

    @override
    def put_back_step_state(self, state: tuple[Any, ...]) -> None:
        pending, self._pending_restored, tensors, periods, queued = state
        self._pending = pending
        self._unchecked.put_back(queued)
        for name, value in zip(_TENSOR_STATE, tensors, strict=True):
            setattr(self, name, value)
        self._period, self._completed_periods, self._rates, self._weights = periods

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name) for name in _TENSOR_STATE}
        state["period"], state["completed_periods"] = self._period, self._completed_periods
        pending = list(zip(*self._pending, strict=True))  # ([losses, ...], [counts, ...])
        state["pending_losses"] = torch.stack(pending[0]) if pending else None
        state["pending_counts"] = torch.stack(pending[1]) if pending else None
        state["unchecked"] = self._unchecked.offending()  # amid an optimizer step
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in _TENSOR_STATE:
            setattr(self, name, state_dict[name])
        self._period, self._completed_periods = (
            state_dict["period"],
            state_dict["completed_periods"],
        )
        losses, counts = state_dict.get("pending_losses"), state_dict.get("pending_counts")
        # The counts are saved with the losses (None together).
        self._pending = [] if losses is None else list(zip(losses, counts, strict=True))  # type: ignore[arg-type]
        self._pending_restored = bool(self._pending)
        self._rates = self._weights = None
        self._unchecked.queue_again(state_dict.get("unchecked", ()))
