"""``FAMO``: task weights learned from how fast each log-loss falls."""

from __future__ import annotations

import math
import operator
from functools import partial
from numbers import Real
from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks._checks import (
    LossesReadLater,
    check_positive,
    require_multitask,
    usable_tasks,
)
from lightning_lossagg.callbacks._task_parameters import TaskParameters
from lightning_lossagg.functional.famo import famo_logit_gradient, famo_weights
from lightning_lossagg.mixin import MultiTaskMixin
from lightning_lossagg.weighting import WeightingCallback


class FAMO(WeightingCallback):
    r"""Fast Adaptive Multitask Optimization (Liu et al., 2023).

    `FAMO: Fast Adaptive Multitask Optimization <https://arxiv.org/abs/2306.03792>`_
    (NeurIPS 2023). With logits :math:`\xi` (zero at the start) and
    :math:`z = \mathrm{softmax}(\xi)`, the model follows

    .. math::
        w_k = \frac{z_k / (L_k + \epsilon)}{\sum_i z_i / (L_i + \epsilon)},

    the gradient of :math:`\sum_k z_k \log(L_k + \epsilon)`. After each optimizer step the SAME
    batch is evaluated again, without gradients, and the decrease of every log-loss
    :math:`\delta_k = \log(L_k^{\text{before}} + \epsilon) - \log(L_k^{\text{after}} + \epsilon)`
    gives the logits one Adam step (``lr=0.025``, ``weight_decay=1e-3``: the paper's and LibMTL's
    defaults) along :math:`z \odot (\delta - z^\top\delta)`, moving weight towards the tasks whose
    loss fell least.

    **Cost**: one extra forward pass (no backward) and one extra all-reduce per optimizer step,
    by design: the re-evaluation runs in ``on_train_batch_end``, through
    ``pl_module.compute_global_losses`` (a collective, called on every rank together), in the
    precision context of the training step and in training mode (as LibMTL does). With gradient
    accumulation the last micro-batch of each optimizer step is the one evaluated again (a step
    whose last micro-batch was left out, with ``nonfinite="drop_task"`` and no task left in it,
    gives the logits no update). Tasks without a valid sample are left out of the weights (the
    others are renormalised) and keep their logit and Adam moments, as are tasks of
    ``Task.weight`` 0 at every step: they take no gradient, so their losses would hardly fall
    and FAMO would move its weight towards them. A checkpoint saved in ``on_train_batch_end`` by
    a callback listed before FAMO holds the logits before that step's update: list FAMO first,
    or save with ``ModelCheckpoint`` (which Lightning runs after every other callback).

    The logits and their Adam live in this callback (the model's ``state_dict`` does not change)
    and are saved in its ``state_dict``; they are logged as ``train/logit/<task>``.

    The logarithms need :math:`L_k + \epsilon > 0`: a global loss at or below :math:`-\epsilon`
    (a custom loss that can be negative, or 0 with ``eps=0``) raises before the optimizer step
    that met it updates the model or the logits (read from a host copy made without a stall).
    Where the batch evaluated again after its step has such a loss, that task is left out of the
    step's logit update, and the error is raised at the next optimizer step, before it moves the
    model, or at the end of the fit (a checkpoint saved between keeps the loss, and the fit
    resumed from it raises the error).

    Args:
        lr: Adam's learning rate for the logits.
        weight_decay: Adam's weight decay on the logits.
        eps: :math:`\epsilon \geq 0` inside the logarithms.

    Example:
        >>> callback = FAMO(lr=0.025, weight_decay=1e-3)
    """

    finite_weights = True  # 0 for a task without a valid sample

    def __init__(self, lr: float = 0.025, weight_decay: float = 1e-3, eps: float = 1e-8) -> None:
        self.lr = check_positive("lr", lr, "The paper uses lr=0.025.")
        for name, value in (("weight_decay", weight_decay), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(f"`{name}` must be a number >= 0; got {value!r}.")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0; got {value!r}.")
        self.weight_decay, self.eps = float(weight_decay), float(eps)
        self._logits = TaskParameters(self.lr, self.weight_decay)
        self._losses_before: tuple[Tensor, Tensor] | None = None
        # Which tasks have a say (a Task.weight other than 0), per device; None: all of them.
        self._weighed: list[bool] | None = None
        self._weighed_on: dict[torch.device, Tensor] = {}
        self._logits_used: Tensor | None = None  # behind the latest weights (Adam makes new ones)
        takes = f"FAMO takes the logarithm of every task loss plus eps={self.eps:g}"
        below = partial(operator.ge, -self.eps)  # loss <= -eps (picklable, for ddp_spawn)
        fix = "Shift that task's loss to be >= 0 (and > 0 with eps=0)"
        self._unchecked = LossesReadLater(takes, below, "<= -eps", fix)
        self._unchecked_after = LossesReadLater(
            f"{takes}, also of the batch evaluated again after its optimizer step",
            below,
            "<= -eps after the step",
            fix,
        )

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"lr": self.lr, "weight_decay": self.weight_decay, "eps": self.eps}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._logits.set_num_tasks(len(require_multitask(self, pl_module)), type(self).__name__)
        assert isinstance(pl_module, MultiTaskMixin)
        weighed = [task.weight != 0 for task in pl_module.tasks.values()]
        self._weighed = None if all(weighed) else weighed
        self._weighed_on = {}
        self._losses_before = None
        self._unchecked.clear()
        self._unchecked_after.clear()

    @override
    def task_weights(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        logits = self._logits_used = self._logits.values(step.losses)
        self._unchecked.add(step.losses)  # checked at the optimizer step
        usable = self._usable_tasks(step)
        losses = torch.where(usable, step.losses, 1.0).to(logits.dtype)
        self._losses_before = (losses, usable)
        weights = famo_weights(logits, losses, eps=self.eps, validate_args=False)
        weights = torch.where(usable, weights, 0.0)
        # Renormalise over the usable tasks: FAMO's weights of the tasks that are there.
        return weights / weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Only this batch's own losses may be compared with its re-evaluation (a step that the
        # mixin skips never calls task_weights).
        self._losses_before = None

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # The batch before's evaluation after its step first: it came first.
        self._unchecked_after.check(pl_module, trainer.global_step - 1)
        self._unchecked.check(pl_module, trainer.global_step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._unchecked_after.check(pl_module, trainer.global_step - 1)  # the fit's last step

    @override
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # A step not taken (nonfinite="skip", or float16's GradScaler found overflowed
        # gradients) decreases no loss: nothing to learn from.
        if self._losses_before is None or not pl_module.optimizer_step_taken:
            return
        losses_before, usable_before = self._losses_before
        with torch.no_grad(), trainer.precision_plugin.train_step_context():
            after = pl_module.compute_global_losses(batch)  # type: ignore[operator]
        # A loss that fell to -eps or below has no logarithm: that task is left out of this
        # update, and the loss is refused at the next optimizer step (or the fit's end).
        self._unchecked_after.add(after.losses)
        usable = usable_before & self._usable_tasks(after) & (after.losses + self.eps > 0)
        logits = self._logits.values(losses_before)
        losses_after = torch.where(usable, after.losses, 1.0).to(logits.dtype)
        # Tasks left out get the logit -inf: z_k = 0, so neither they nor their decrease count.
        present_logits = torch.where(usable, logits, -torch.inf)
        gradient = famo_logit_gradient(
            present_logits,
            torch.where(usable, losses_before, 1.0),
            losses_after,
            eps=self.eps,
            validate_args=False,
        )
        self._logits.step(torch.where(usable, gradient, 0.0), usable)

    def _usable_tasks(self, step: GlobalTaskLosses) -> Tensor:
        """The tasks that have a valid sample and a finite loss, and a say (``Task.weight``)."""
        usable = usable_tasks(step)
        if self._weighed is None:
            return usable
        weighed = self._weighed_on.get(usable.device)
        if weighed is None:
            weighed = torch.tensor(self._weighed).to(usable.device)
            self._weighed_on[usable.device] = weighed
        return usable & weighed

    @override
    def step_state(self) -> tuple[list[Any], list[Any]]:
        """The losses queued for the bound checks (the logits move once the step is taken)."""
        return self._unchecked.queued(), self._unchecked_after.queued()

    @override
    def put_back_step_state(self, state: tuple[list[Any], list[Any]]) -> None:
        self._unchecked.put_back(state[0])
        self._unchecked_after.put_back(state[1])

    @override
    def state_to_log(self) -> dict[str, Tensor]:
        """The logits as the latest step's weights came from (not as its update left them)."""
        logits = self._logits_used if self._logits_used is not None else self._logits.snapshot()
        return {} if logits is None else {"logit": logits}

    @override
    def state_dict(self) -> dict[str, Any]:
        # The losses still to be refused: of the micro-batches before a checkpoint amid an
        # optimizer step, and of the batch evaluated again after the latest step.
        return {
            "logits": self._logits.state_dict(),
            "unchecked": self._unchecked.offending(),
            "after_step": self._unchecked_after.offending(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._logits.load_state_dict(state_dict["logits"])
        self._logits_used = None
        # (Absent from older checkpoints.)
        self._unchecked.queue_again(state_dict.get("unchecked", ()))
        self._unchecked_after.queue_again(state_dict.get("after_step", ()))
