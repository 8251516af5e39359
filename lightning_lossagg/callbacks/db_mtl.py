"""``DBMTL``: log-loss gradients, smoothed by an EMA buffer and balanced to the largest norm."""

from __future__ import annotations

import math
import operator
from functools import partial
from numbers import Real
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_lossagg import distributed
from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks._checks import (
    LossesReadLater,
    require_multitask,
    usable_tasks,
)
from lightning_lossagg.callbacks.gradient_weighting import (
    GradientWeighting,
    Sync,
    _gramian,
    _scaled_sum_over_ranks,
    _unscaled,
    loss_scale,
    task_jacobian,
)
from lightning_lossagg.functional.db_mtl import LOG_EPS, db_mtl_buffer, db_mtl_buffer_weights
from lightning_lossagg.mixin import MultiTaskMixin


class DBMTL(GradientWeighting):
    r"""Dual-Balancing Multi-Task Learning (Lin et al., 2023).

    `Dual-Balancing for Multi-Task Learning <https://arxiv.org/abs/2308.12029>`_. Loss scales are
    balanced by training on the log-losses, gradient scales by an EMA buffer :math:`b_k` of the
    log-loss gradients :math:`\hat g_k = \nabla \log(L_k + 10^{-8})` on the shared parameters,
    each scaled to the largest buffered norm:

    .. math::
        b_k \leftarrow \hat g_k + \frac{\beta}{t^{\sigma}} (b_k - \hat g_k), \qquad
        d = \sum_k c_k \frac{\max_j \lVert b_j \rVert}{\lVert b_k \rVert}\, b_k,

    with :math:`t` the 1-based step counter and :math:`c_k` = ``Task.weight`` (a preference on
    top of the balancing; with all :math:`c_k = 1`, :math:`d` is exactly
    :func:`~lightning_lossagg.functional.db_mtl`'s update). The shared parameters follow
    :math:`d`, a combination of the *buffered* gradients, not a weighting of this step's; the
    heads follow their log-losses, as in LibMTL: :math:`c_k \nabla L_k / (L_k + 10^{-8})`. The
    weights this callback returns (and the logs show as ``train/weight/<task>``) are therefore
    :math:`1 / (L_k + 10^{-8})`, the weight of :math:`L_k` in the heads' objective; the
    balancing factors on the buffer are logged as ``train/buffer_weight/<task>``.

    The buffer (K×P, the shared part's size, on the model's device) and the step counter are
    the state, updated at every training step (micro-batch), in ``state_dict``. Under DDP the
    per-task gradients are all-reduced first (``sync="gradients"``, the only choice): the buffer
    is global and identical on every rank, so one rank's checkpoint resumes every rank exactly.
    A global task loss < 0, whose logarithm does not exist, stops training with a ValueError
    naming the task and the step; read from a host copy at the optimizer step (no wait for the
    device in the step), it raises before that step updates the model, and the buffer and
    counter are put back as they were before it.
    A task without a valid sample in a step keeps its buffered gradient and is left out of that
    step's :math:`d`; LibMTL has no such case.

    Representation gradients are refused, as in LibMTL: the rows of a representation are the
    batch's samples, so a buffer over steps would average unrelated samples (and a last short
    batch would not even fit it).

    Args:
        beta: the EMA rate :math:`\beta` of the buffer, in [0, 1) (LibMTL: 0.9).
        beta_sigma: the decay exponent :math:`\sigma \geq 0` of the rate (LibMTL: 0).
        rep_grad: must be False (see above).
        sync: must be ``"gradients"`` (see above).

    Example:
        >>> callback = DBMTL(beta=0.9, beta_sigma=0.0)
    """

    parameter_gradients_through_representation = False
    may_weigh_in_backward = False  # its own backward_objective (buffered gradients)

    def __init__(
        self,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        rep_grad: bool = False,
        sync: Sync = "gradients",
    ) -> None:
        super().__init__(rep_grad=rep_grad, sync=sync)
        if self.rep_grad:
            raise ValueError(
                "DBMTL does not support rep_grad=True: its buffer averages gradients over steps, "
                "and a representation's rows are different samples at every step. Use "
                "rep_grad=False (LibMTL refuses it too)."
            )
        if self.sync != "gradients":
            raise ValueError(
                "DBMTL needs sync='gradients': its K×P buffer must hold the global gradients, "
                "identical on every rank, to resume exactly from one rank's checkpoint."
            )
        for name, value in (("beta", beta), ("beta_sigma", beta_sigma)):
            if isinstance(value, bool) or not isinstance(value, Real):
                raise ValueError(f"`{name}` must be a number; got {value!r}.")
            if not math.isfinite(value):
                raise ValueError(f"`{name}` must be finite; got {value!r}.")
        if not 0 <= beta < 1:
            raise ValueError(f"`beta` must be in [0, 1) (LibMTL uses 0.9); got {beta}.")
        if beta_sigma < 0:
            raise ValueError(f"`beta_sigma` must be >= 0 (LibMTL uses 0); got {beta_sigma}.")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self._buffer: Tensor | None = None
        self._step = 0
        self._present_buffer: Tensor | None = None
        self._balance: Tensor | None = None
        self._task_names: tuple[str, ...] = ()
        self._unchecked = LossesReadLater(
            "DBMTL trains on the logarithm of every task loss",
            partial(operator.gt, 0.0),  # loss < 0 (picklable, for ddp_spawn)
            "< 0",
            "Shift that task's loss to be >= 0",
        )
        self._logged_jacobian: Tensor | None = None  # the step's, for grad_cos when logged

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"beta": self.beta, "beta_sigma": self.beta_sigma, **super().method_arguments}

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint from before its ``state_key`` held ``rep_grad`` and ``sync`` keeps the
        state under the key of ``beta`` and ``beta_sigma`` alone: taken as this one's."""
        states = checkpoint.get("callbacks", {})
        earlier = self._generate_state_key(beta=self.beta, beta_sigma=self.beta_sigma)
        if self.state_key not in states and earlier in states:
            states[self.state_key] = states.pop(earlier)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._task_names = require_multitask(self, pl_module)
        self._check_buffer(self._buffer)
        self._unchecked.clear()

    @override
    def task_weights(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        self._shared_parameters = pl_module.shared_parameters()
        usable = usable_tasks(step)
        losses = torch.where(usable, step.losses, 1.0)
        # The losses < 0 are refused at the optimizer step, read without stalling the device;
        # the state from before the first unread step is then put back.
        self._unchecked.add(losses)
        self._gramian, self._gramian_valid, self._logged_jacobian = None, step.valid, None
        if self._shared_parameters:
            self._update_buffer(step, usable, losses, loss_scale(pl_module, step.local_sums))
        else:  # a frozen trunk (BackboneFinetuning, say): only the heads train, on log-losses
            self._present_buffer = self._balance = None
        return torch.where(usable, 1.0 / (step.losses + LOG_EPS), 0.0)

    def _update_buffer(
        self, step: GlobalTaskLosses, usable: Tensor, losses: Tensor, scale: Tensor | None
    ) -> None:
        """Adds this step's global log-loss gradients to the buffer (tasks with a usable loss),
        and balances the buffered gradients of the present tasks (``scale``: the loss scale of
        float16 mixed precision)."""
        jacobian = task_jacobian(step, self._shared_parameters, scale)
        jacobian = _scaled_sum_over_ranks(jacobian, 1 / distributed.world_size())
        if self._buffer is not None and self._buffer.shape[1] != jacobian.shape[1]:
            self._restart_buffer(jacobian.shape[1])
        self._logged_jacobian = jacobian  # the Gramian (K²·P operations) only if logged
        self._step += 1
        updated = db_mtl_buffer(
            jacobian, self._buffer, self._step, self.beta, self.beta_sigma, losses.to(jacobian)
        )
        previous = torch.zeros_like(updated) if self._buffer is None else self._buffer
        self._buffer = torch.where(usable.unsqueeze(1), updated, previous.to(updated))
        present = torch.where(usable.unsqueeze(1), self._buffer, 0.0)
        self._present_buffer = present
        self._balance = db_mtl_buffer_weights(present)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._unchecked.check(pl_module, trainer.global_step)

    @override
    def step_state(self) -> tuple[Tensor | None, int, list[Any]]:
        # The buffer is replaced, never changed; the losses queued for the bound check.
        return self._buffer, self._step, self._unchecked.queued()

    @override
    def put_back_step_state(self, state: tuple[Tensor | None, int, list[Any]]) -> None:
        self._buffer, self._step, queued = state
        self._unchecked.put_back(queued)

    @override
    def backward_objective(
        self, pl_module: MultiTaskMixin, step: GlobalTaskLosses, weights: Tensor, static: Tensor
    ) -> Tensor:
        buffer, self._present_buffer = self._present_buffer, None
        # Heads: c_k / (L_k + eps) times their task's gradient, the gradient of c_k log(L_k + eps).
        heads_objective = step.weighted_sum(weights)
        head_parameters = pl_module.task_specific_parameters()
        scale = loss_scale(pl_module, heads_objective)
        head_grads = torch.autograd.grad(heads_objective, head_parameters, scale, allow_unused=True)
        surrogate = heads_objective.new_zeros(())
        for parameter, grad in zip(head_parameters, head_grads, strict=True):
            if grad is not None:
                surrogate = surrogate + (parameter * _unscaled(grad, scale)).sum()
        if buffer is None:  # nothing shared trains
            return surrogate
        # Shared part: d, identical on every rank, so DDP's averaging leaves it unchanged.
        assert self._balance is not None
        direction = (static * self._balance).to(buffer.dtype) @ buffer
        offset = 0
        for parameter in self._shared_parameters:
            size = parameter.numel()
            grad = direction[offset : offset + size].view_as(parameter)
            surrogate = surrogate + (parameter * grad).sum()
            offset += size
        return surrogate

    def _take_logged_gramian(self) -> None:
        """The step's Gramian, made only when its figures are logged."""
        if self._logged_jacobian is not None:
            self._gramian, self._logged_jacobian = _gramian(self._logged_jacobian), None

    @override
    def pairwise_state_to_log(self) -> dict[str, Tensor]:
        self._take_logged_gramian()
        return super().pairwise_state_to_log()

    @override
    def state_to_log(self) -> dict[str, Tensor]:
        self._take_logged_gramian()  # grad_norm too (read before grad_cos)
        state = super().state_to_log()
        if self._balance is not None:
            state["buffer_weight"] = self._balance
        return state

    @override
    def state_dict(self) -> dict[str, Any]:
        buffer = None if self._buffer is None else self._buffer.clone()
        # The losses the check will refuse, of the micro-batches before a checkpoint amid a step.
        return {"buffer": buffer, "step": self._step, "unchecked": self._unchecked.offending()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_buffer(state_dict["buffer"])
        self._buffer, self._step = state_dict["buffer"], int(state_dict["step"])
        self._unchecked.queue_again(state_dict.get("unchecked", ()))

    def _restart_buffer(self, size: int) -> None:
        """The trainable shared parameters changed (a backbone unfrozen, say): the buffer of the
        old ones' gradients no longer applies; it starts afresh, as at the first step."""
        assert self._buffer is not None
        rank_zero_warn(
            f"DBMTL: the shared parameters that train changed from {self._buffer.shape[1]} to "
            f"{size} values; their gradient buffer starts afresh."
        )
        self._buffer, self._step = None, 0

    def _check_buffer(self, buffer: Tensor | None) -> None:
        """A buffer must have a row per task of the model. Its width meets the shared parameters
        at the next step, those that train then (BackboneFinetuning freezes a trunk at setup and
        unfreezes it later): a buffer of another width starts afresh there, with a warning."""
        num_tasks = len(self._task_names)
        if buffer is not None and num_tasks and buffer.shape[0] != num_tasks:
            raise ValueError(
                f"This DBMTL holds a gradient buffer of {buffer.shape[0]} tasks, but the model "
                f"has {num_tasks}: the buffer belongs to another model. Resume the same model, "
                "or create a new DBMTL."
            )
