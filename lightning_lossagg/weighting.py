"""The interface between the mixin and adaptive weighting methods.

A weighting method is a Lightning callback that, once per training step, turns the step's global
task losses into a weight vector ``w`` (length K, identical on every rank). The mixin multiplies it
by the static ``Task.weight`` preferences and hands ``sum_k w_k t_k`` to backward. Callbacks keep
their own state (histories, learnable log-variances and their optimizer) and save it in
``state_dict``: the model's own ``state_dict`` never depends on how it was trained.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_lossagg.aggregation import GlobalTaskLosses
    from lightning_lossagg.mixin import MultiTaskMixin
    from lightning_lossagg.representation import GradientsAtHeads, Receiver


class WeightingCallback(L.Callback):
    """Base class of adaptive task-weighting methods.

    Subclasses implement :meth:`task_weights`. It runs inside ``training_step``, after the step's
    one all-reduce, with the global figures of the step; whatever it computes from them alone is
    identical on every rank. Tasks with ``step.valid[k] == False`` (no valid sample anywhere this
    step) have a NaN loss: leave them out of any state update. Their weight is set to 0 by the
    mixin, or, for a method with ``finite_weights``, meets their term of exactly 0.

    Attributes:
        separate_task_terms: the mixin keeps each task's loss term in a graph of its own
            (``step.task_terms``), for methods that take per-task gradients; not needed, and not
            built, when every head reads a leaf of its own (``shared_representation.per_task``).
        splits_forward: the mixin runs ``forward_heads(forward_shared(inputs))`` in training,
            the heads reading detached leaves of the representation (kept in the model's
            ``shared_representation``, a :class:`~lightning_lossagg.representation.
            SharedRepresentation`).
        weighs_in_backward: with a split forward and one head per task, the heads read views
            of the representation (:meth:`views_at_heads`) and the weights come from the
            gradients that reach them in the backward Lightning runs
            (:meth:`weights_in_backward`).
        takes_linear_factors: with :attr:`weighs_in_backward`, the receiver builds everything
            from linear heads' factors (:meth:`~lightning_lossagg.representation.
            GradientsAtHeads.linear_factors`) when they are given: the mixin may then compute
            ``nn.Linear`` heads in one autograd node that hands over only those.
        weighs_heads: the heads take the method's weights too (Nash-MTL's update): weighing in
            backward is then left to heads in one node, which scale the heads' gradients once
            the weights are known (the views' heads have their gradients before that).
        finite_weights: :meth:`task_weights` is finite for every task, those without a valid
            sample included. The mixin then takes the weights as they are, where it would
            otherwise zero those tasks' weights first: such a task's term is exactly 0, with no
            gradient, and any finite weight times it adds nothing.
        state_is_per_task: the method's ``state_dict`` holds figures per task, by position in
            the model's task order: a checkpoint of other tasks, or of the same tasks in
            another order, is refused (:func:`check_checkpoint_tasks`). False for a state that
            is not per task (a seed).
    """

    separate_task_terms: bool = False
    splits_forward: bool = False
    weighs_in_backward: bool = False
    takes_linear_factors: bool = False
    weighs_heads: bool = False
    finite_weights: bool = False
    state_is_per_task: bool = True

    def task_weights(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        """The weights ``w`` (shape ``[K]``, detached) for this training step."""
        raise NotImplementedError

    def views_at_heads(
        self, pl_module: MultiTaskMixin, split: GradientsAtHeads, output: Tensor, leaf: Tensor
    ) -> tuple[Tensor, ...]:
        """For a method with :attr:`weighs_in_backward`: the heads' views, of ``output`` (the
        representation with the trunk's graph) or of ``leaf`` (a detached copy) with the
        parameters whose gradients the receiver gives."""
        return split.views(output)

    def weights_in_backward(
        self, pl_module: MultiTaskMixin, step: GlobalTaskLosses, static: Tensor
    ) -> tuple[Tensor, Receiver]:
        """For a method with :attr:`weighs_in_backward`, on a step whose heads read views of a
        :class:`~lightning_lossagg.representation.GradientsAtHeads`: instead of
        :meth:`task_weights` and :meth:`backward_objective`, the weights (times ``static``,
        written during backward) and the receiver of the tasks' gradients at the views, which
        returns the gradients of the representation and of the parameters the views carry. The
        objective is ``sum_k static_k t_k``."""
        raise NotImplementedError

    def backward_objective(
        self, pl_module: MultiTaskMixin, step: GlobalTaskLosses, weights: Tensor, static: Tensor
    ) -> Tensor:
        """The scalar handed to backward. Default: ``sum_k w_k t_k`` (``weights`` already include
        the static preferences ``static``). Gradient methods override it to send the weighted
        combination to the shared part and each head its own task's gradient."""
        return step.weighted_sum(weights)

    def step_state(self) -> Any:
        """The part of the method's state that a batch changes before its optimizer step is
        taken (a moving level, a period's sums, an accumulated gradient), as it is before the
        optimizer step's first batch: the mixin keeps it, for :meth:`put_back_step_state`.
        ``None`` (the default) for a method whose state changes only once the step is taken.
        It is asked for at every optimizer step: return state that the method replaces as it is,
        and copy only what changes in place. Putting back what it returns must change nothing (a
        checkpoint saved amid a step keeps the method's ``state_dict`` as before the step)."""
        return None

    def put_back_step_state(self, state: Any) -> None:
        """Put back what :meth:`step_state` returned. The mixin calls it when the optimizer step
        is skipped, refused with an error (a non-finite loss, a loss the method cannot take) or
        cut short by an exception before the optimizer steps: the step leaves nothing in the
        method's state, and a fit started again with the same callback goes on from the step
        before."""

    def state_to_log(self) -> dict[str, Tensor]:
        """Method state worth seeing, per task: ``{"log_var": tensor[K]}`` for example; the state
        the latest step's weights came from (loggers read it after the optimizer step)."""
        return {}

    def pairwise_state_to_log(self) -> dict[str, Tensor]:
        """Method state worth seeing, per pair of tasks: ``{"grad_cos": tensor[K, K]}`` for
        example. Loggers read it only at their logging interval (``LossLogger`` logs it as
        ``train/<state>/<task_a>~<task_b>``), so it may cost a few tensor operations."""
        return {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a fit whose model took no weighting method: its ``setup`` did not reach
        :meth:`~lightning_lossagg.mixin.MultiTaskMixin.setup` (an override without ``super()``),
        and the fit would go on with the static weights, silently."""
        if hasattr(pl_module, "weighting") and pl_module.weighting is None:
            raise RuntimeError(
                f"{type(self).__name__} is in the trainer's callbacks, but "
                f"{type(pl_module).__name__} did not take it: its setup() did not call "
                "MultiTaskMixin.setup(). Call super().setup(stage) in the override."
            )

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """An optimizer step that float16's ``GradScaler`` skipped (its gradients overflowed)
        leaves nothing in the method's state
        (:meth:`~lightning_lossagg.mixin.MultiTaskMixin.forget_step_not_taken`); a subclass that
        overrides this hook calls ``super()`` first."""
        # Every batch passes here: no import or isinstance, the mixin's method alone.
        forget_step_not_taken = getattr(pl_module, "forget_step_not_taken", None)
        if forget_step_not_taken is not None:
            forget_step_not_taken()

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint saved after a step that float16's ``GradScaler`` skipped but before this
        callback's ``on_train_batch_end`` (by a callback listed before it) holds the state as
        before the step: Lightning took this callback's ``state_dict`` already, so it is taken
        again once the step is forgotten."""
        forget_step_not_taken = getattr(pl_module, "forget_step_not_taken", None)
        if forget_step_not_taken is not None and forget_step_not_taken():
            states = checkpoint.get("callbacks", {})
            if self.state_key in states:
                states[self.state_key] = self.state_dict()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """An optimizer step cut short by an exception leaves nothing in the method's state
        (:meth:`~lightning_lossagg.mixin.MultiTaskMixin.forget_unfinished_step`): the model did
        not move either, and a fit started again goes on from the step before."""
        from lightning_lossagg.mixin import MultiTaskMixin  # the mixin imports this module

        if isinstance(pl_module, MultiTaskMixin):
            pl_module.forget_unfinished_step()

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.state_is_per_task:
            check_checkpoint_tasks(self, trainer, pl_module, checkpoint)

    @property
    def method_arguments(self) -> dict[str, Any]:
        """The method's arguments, for the run config and ``state_key``."""
        return {}

    @cached_property  # Lightning reads it at every hook call; the arguments never change
    def state_key(self) -> str:
        """Built from :attr:`method_arguments`, so two differently set-up instances can coexist."""
        return self._generate_state_key(**self.method_arguments)


def check_checkpoint_tasks(
    callback: L.Callback,
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    checkpoint: dict[str, Any],
) -> None:
    """Refuse, before ``callback`` loads its state from ``checkpoint``, a state saved for other
    tasks than ``pl_module``'s, or for the same tasks in another order: the state is kept per
    task by position, and would be loaded onto the wrong tasks without a word."""
    from lightning_lossagg.mixin import CHECKPOINT_KEY  # the mixin imports this module

    if trainer.state.fn != "fit" or callback.state_key not in checkpoint.get("callbacks", {}):
        return  # evaluation does not use the state, or nothing of this callback's is loaded
    saved = checkpoint.get(CHECKPOINT_KEY, {}).get("task_names")  # None: saved before names were
    names = list(pl_module.task_names)  # type: ignore[arg-type]
    if saved is None or list(saved) == names:
        return
    fix = (
        "Give the tasks in the checkpoint's order (the order of the `tasks` mapping)"
        if sorted(saved) == sorted(names)
        else "Resume the model the checkpoint was saved from"
    )
    raise ValueError(
        f"{type(callback).__name__}'s state in the checkpoint is for the tasks {list(saved)}, in "
        f"that order; this model's tasks are {names}. Its state is kept per task by position. "
        f"{fix}, or start {type(callback).__name__} afresh: delete "
        f"checkpoint['callbacks'][{callback.state_key!r}] from the checkpoint file."
    )


class LossRecord:
    """A detached record of one step, kept on the module for loggers and monitors.

    Derived figures are computed when first read, so a step whose record nobody reads (most
    steps, between two logging intervals) costs nothing more.

    Attributes:
        stage: ``"train"``, ``"val"`` or ``"test"``.
        names: task names.
        losses: global task losses (NaN where a task had no valid sample).
        counts: the step's weight per task in an epoch mean (global valid samples; 0: no sample).
        weights: the effective weights ``w_k`` (adaptive times static; 0 without a valid sample).
        weighted: ``w_k * L_k`` (0 where a task had no valid sample).
        objective: ``sum_k w_k L_k``, the global objective.
        method_state: per-task method state to log, e.g. ``{"log_var": tensor[K]}``.
        pairwise_state: per-pair method state to log, e.g. ``{"grad_cos": tensor[K, K]}``.
    """

    def __init__(
        self,
        stage: str,
        names: tuple[str, ...],
        losses: Tensor | Callable[[], Tensor],
        weights: Tensor,
        counts: Tensor,
        weighting: WeightingCallback | None = None,
    ) -> None:
        """``losses`` may be a function that computes them when first read."""
        self.stage, self.names, self.counts = stage, names, counts
        self._losses, self._weights, self._weighting = losses, weights, weighting

    @cached_property
    def losses(self) -> Tensor:
        return self._losses if isinstance(self._losses, Tensor) else self._losses()

    @cached_property
    def weights(self) -> Tensor:
        return torch.where(self.counts > 0, self._weights.to(self.losses.dtype), 0.0)

    @cached_property
    def weighted(self) -> Tensor:
        return torch.where(self.counts > 0, self.weights * self.losses, 0.0)

    @cached_property
    def objective(self) -> Tensor:
        return self.weighted.sum()

    @cached_property
    def method_state(self) -> dict[str, Tensor]:
        return self._weighting.state_to_log() if self._weighting is not None else {}

    @cached_property
    def pairwise_state(self) -> dict[str, Tensor]:
        return self._weighting.pairwise_state_to_log() if self._weighting is not None else {}
