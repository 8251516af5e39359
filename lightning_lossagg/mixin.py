"""``MultiTaskMixin``: the multi-task training, validation and test steps of a LightningModule."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_lossagg import distributed
from lightning_lossagg.aggregation import (
    GlobalTaskLosses,
    RankWeighting,
    TaskLossReducer,
    in_dtype,
)
from lightning_lossagg.representation import (
    FusedLinearHeads,
    GradientsAtHeads,
    HeadInputs,
    SharedRepresentation,
    TaskHeads,
    find_task_heads,
    linear_heads_factor,
    outside_autocast,
    reach_only_own_heads,
)
from lightning_lossagg.tasks import MaskedLoss, StackedLosses, Task, ZeroMaskedLoss
from lightning_lossagg.weighting import LossRecord, WeightingCallback

TaskLossOutput = Mapping[str, MaskedLoss | tuple[Tensor, Tensor] | Tensor]
NonFinitePolicy = Literal["raise", "skip", "drop_task"]


if TYPE_CHECKING:

    class _ModuleBase(LightningModule):
        """What type checkers take the mixin's base to be: the LightningModule it is used with.
        At run time its base is ``object`` (the model's bases give the MRO)."""

        _static_weights: Tensor  # a buffer, registered in MultiTaskMixin.__init__
        # The model's own, for a weighting method that splits the forward.
        forward_shared: Callable[..., Any]
        forward_heads: Callable[..., Mapping[str, Tensor]]

else:
    _ModuleBase = object


class NonFiniteLossError(FloatingPointError):
    """A task loss was NaN or infinite (raised on every rank together)."""


class MultiTaskMixin(_ModuleBase):
    """Multi-task steps with exact, distributed-safe loss aggregation.

    Use it before ``LightningModule`` in the bases, and pass the tasks to ``super().__init__``::

        class Net(MultiTaskMixin, L.LightningModule):
            def __init__(self):
                super().__init__(tasks={"price": Task("mse", weight=2.0), "kind": "cross_entropy"})

            def forward(self, inputs):  # one prediction per task
                ...

    A batch is ``(inputs, {task: target})`` by default; override :meth:`task_losses` for any other
    layout. Each step reduces every task's per-sample losses over all ranks with ONE all-reduce,
    weights the global task losses (static ``Task.weight`` times the weighting callback's weights,
    if one is on the trainer) and returns the local share of ``sum_k w_k L_k`` that makes DDP's
    averaged gradient exactly the gradient of the global objective. The step's figures are kept,
    detached, in :attr:`loss_record` for loggers and monitors. Validation and test weigh each task
    with its weight at the latest training step that had a valid sample of it (kept in
    checkpoints: an override of ``on_save_checkpoint``/``on_load_checkpoint`` calls ``super()``,
    as does one of ``on_after_backward``/``on_before_optimizer_step``, where non-finite losses
    are acted on).

    Args:
        tasks: task name to :class:`Task` (or a loss name, for a task with default settings).
        rank_weighting: ``"samples"`` (every valid sample of the global batch counts the same:
            equals one process on the concatenated batch) or ``"uniform"`` (every rank's mean counts
            the same, federated style).
        nonfinite: what a NaN or infinite task loss does, decided the same on every rank:
            ``"raise"`` (default) a :class:`NonFiniteLossError` naming the task, the step and the
            rank(s), right after the backward, before the optimizer step (or any callback's
            ``on_before_optimizer_step``) changes anything; ``"skip"`` the optimizer step (no
            update of the model). Either way the step, its finite micro-batches included, leaves
            nothing in the weighting method's state nor in the evaluation weights
            (:meth:`forget_refused_step`). ``"drop_task"`` leaves that task out of the step.
            ``"raise"`` reads the flags after each backward, from host copies queued right after
            the step's all-reduce: on a GPU the host waits for that copy alone, never for the
            backward queued behind it. The other two read the flags on the host right after the
            all-reduce.
        max_consecutive_skips: with ``"skip"``/``"drop_task"``, this many non-finite steps in a
            row raise :class:`NonFiniteLossError` instead of skipping forever (``None``: never).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a class that puts ``LightningModule`` before the mixin in its bases: the
        module's ``__init__`` would get ``tasks`` and fail with an error that names neither."""
        super().__init_subclass__(**kwargs)
        order = cls.__mro__
        if LightningModule in order and order.index(LightningModule) < order.index(MultiTaskMixin):
            raise TypeError(
                f"{cls.__qualname__}: put MultiTaskMixin before LightningModule in its bases, "
                f"class {cls.__name__}(MultiTaskMixin, L.LightningModule), so that the mixin "
                "takes `tasks` and its steps override the module's."
            )

    def __init__(
        self,
        *args: Any,
        tasks: Mapping[str, Task | str],
        rank_weighting: RankWeighting = "samples",
        nonfinite: NonFinitePolicy = "raise",
        max_consecutive_skips: int | None = 10,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if nonfinite not in ("raise", "skip", "drop_task"):
            raise ValueError(
                f"nonfinite must be 'raise', 'skip' or 'drop_task', got {nonfinite!r}."
            )
        limit = max_consecutive_skips
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ValueError(
                f"max_consecutive_skips must be an int >= 1 or None (never raise), got {limit!r}."
            )
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        # The tasks whose loss was not finite at the latest step that was skipped or left them
        # out (monitors compare skipped_steps to see a new one).
        self.last_nonfinite_tasks: tuple[str, ...] = ()
        self._consecutive_skips = 0
        self._skip_optimizer_step = False
        # Settled per optimizer step, however many micro-batches or optimizers it has: whether
        # one of its batches had a non-finite loss, and whether it is over (the next batch
        # starts a new one).
        self._step_nonfinite = False
        self._optimizer_stepped = False
        # Whether an optimizer's step() ran, and whether one stepped: float16's GradScaler skips
        # step() when the gradients overflowed, after the step reached the optimizer (a hook on
        # each optimizer tells); a fused optimizer's step() runs and skips the update in its
        # kernel, as the scaler's found_inf says (read only when asked).
        self._optimizer_step_ran = False
        self._step_took_losses = False  # a batch of this optimizer step had a task to train
        self._optimizer_step_taken = False
        self._fused_found_inf: list[Tensor] = []
        self._step_hooks: dict[int, RemovableHandle] = {}
        # An evaluation epoch's stage and batch counts, checked at its first batch.
        self._unchecked_batch_counts: tuple[str, list[int | float]] | None = None
        self.tasks = _as_tasks(tasks)
        self.rank_weighting = rank_weighting
        self._reducer = TaskLossReducer(self.tasks, rank_weighting)
        static_weights = torch.tensor([task.weight for task in self.tasks.values()])
        if static_weights.sum() <= 0:
            raise ValueError(
                "All task weights are zero: the objective would be 0. Give at least one task a "
                "positive Task.weight."
            )
        # Not persistent: the model's state_dict does not depend on how it was trained.
        self.register_buffer("_static_weights", static_weights, persistent=False)
        self._static_weights_are_ones = bool((static_weights == 1).all())
        self._static_weights_are_positive = bool((static_weights > 0).all())
        self.loss_record: LossRecord | None = None
        self._weighting: WeightingCallback | None = None
        # Per task, its weight at the latest training step in which it had a valid sample (what
        # evaluation weighs with, saved in checkpoints), and the weights and global counts of the
        # steps since, folded in together every _FOLD_EVERY steps and before evaluation (a
        # gradient method fills the latest step's weights in backward).
        self._latest_weights: Tensor | None = None
        self._pending_weights: list[tuple[Tensor, Tensor]] = []
        # Both, and the weighting method's WeightingCallback.step_state, as they were before
        # this optimizer step's first weights: a skipped or refused step goes back to them.
        self._weights_before_step: tuple[Tensor | None, list[tuple[Tensor, Tensor]]] = (None, [])
        self._weighting_state_before: Any = None
        self._step_kept_weights = False
        self._gradients_checked = False  # whether each task's losses carry a gradient
        # The host reads of the non-finite flags of the steps since the last optimizer step.
        self._unchecked_nonfinite: list[Callable[[], list[float]]] = []
        # The same of a weighting callback's weights (one without finite_weights), read then too.
        self._unchecked_weights: list[Callable[[], list[float]]] = []
        self.shared_representation: SharedRepresentation | None = None
        # Heads that read a leaf each (see lightning_lossagg.representation), found at setup;
        # whether each task's prediction reaches the representation only through its own head
        # is checked once per fit (None: not yet).
        self._task_heads: TaskHeads | None = None
        self._heads_apart: bool | None = None
        # Whether the heads are linear layers whose factors give the Gramian cheaper (checked
        # once per fit, on the first step that asks; see GradientsAtHeads.linear_factors).
        self._linear_heads: bool | None = None
        self._stacking_plans: dict[tuple[Any, ...], list[_StackedGroup] | None] = {}

    @property
    def task_names(self) -> tuple[str, ...]:
        """The task names, in order: the order of every per-task vector."""
        return self._reducer.names

    @property
    def weighting(self) -> WeightingCallback | None:
        """The weighting callback found on the trainer (``None``: static weights)."""
        return self._weighting

    @property
    def _keeps_task_terms_apart(self) -> bool:
        """Training with a weighting method that takes per-task gradients: each task's loss term
        keeps a graph of its own (no stacked computation across tasks)."""
        weighting = self._weighting
        if weighting is None or not weighting.separate_task_terms or not self.training:
            return False
        # Heads reading a leaf each give every task's gradient apart from one joint graph.
        representation = self.shared_representation
        return representation is None or (
            representation.per_task is None and representation.split is None
        )

    # ----------------------------------------------------------------------------- the batch
    def task_losses(self, batch: Any) -> TaskLossOutput:
        """Per-sample losses of every task: ``{task: MaskedLoss(values, mask)}``.

        The default reads ``(inputs, {task: target})`` batches and calls ``self(inputs)``, which
        must return ``{task: prediction}``. Override it to return, per task, per-sample losses (a
        tensor, every sample valid), a :class:`MaskedLoss` or a ``(values, mask)`` pair.
        """
        is_pair = isinstance(batch, (list, tuple)) and len(batch) == 2
        if not (is_pair and isinstance(batch[1], dict)):
            if is_pair:
                got = f"a pair whose targets are a {type(batch[1]).__name__}, not a dict"
            elif isinstance(batch, (list, tuple)):
                got = f"a {type(batch).__name__} of {len(batch)} items"
            else:
                got = type(batch).__name__
            raise TypeError(
                "The default task_losses expects batches (inputs, {task: target}), got "
                f"{got}. Yield such batches, or override task_losses(batch)."
            )
        inputs, targets = batch
        return self.per_sample_losses(self.predict_tasks(inputs), targets)

    def predict_tasks(self, inputs: Any) -> Mapping[str, Tensor]:
        """``{task: prediction}``: ``self(inputs)``, or, in training when the weighting method
        takes per-task gradients through the shared representation, ``forward_heads`` of detached
        leaves of ``forward_shared(inputs)``, kept in :attr:`shared_representation` (see
        :mod:`lightning_lossagg.representation`)."""
        weighting = self._weighting
        if not (
            weighting and weighting.splits_forward and self.training and torch.is_grad_enabled()
        ):
            return self(inputs)
        shared = self._forward_shared(inputs)
        if not isinstance(shared, Tensor):  # several tensors: no one leaf to take gradients at
            if getattr(weighting, "rep_grad", False):
                raise TypeError(
                    f"{type(weighting).__name__}(rep_grad=True) takes the task gradients at the "
                    f"shared representation, but forward_shared returned a "
                    f"{type(shared).__name__}, not one tensor. Return one tensor (concatenate "
                    "the parts and split them in forward_heads), or use rep_grad=False."
                )
            self.shared_representation = None  # parameter gradients come from the whole graph
            return self.forward_heads(shared)
        detached = shared.detach().requires_grad_()
        heads = self._task_heads if self._heads_apart is not False else None
        if heads is None:
            self.shared_representation = SharedRepresentation(shared, (detached,))
            return self.forward_heads(detached)
        split = views = watch = None
        # A frozen trunk: nothing flows back from the views; the method sees it before backward.
        if (
            weighting.weighs_in_backward
            and self._static_weights_are_positive
            and shared.requires_grad
        ):
            split = GradientsAtHeads(len(heads.modules))
            autocast = torch.is_autocast_enabled(shared.device.type)
            if self._linear_heads is None and weighting.takes_linear_factors and not autocast:
                self._probe_linear_heads(heads, detached)
            if self._linear_heads and weighting.takes_linear_factors:
                predictions = self._predict_with_linear_heads(heads, shared, detached, split)
                if predictions is not None:
                    return predictions
            if weighting.takes_linear_factors and self._linear_heads is not False:
                watch = split
            if weighting.weighs_heads:
                # The views' heads have their gradients before the weights: the pass before
                # backward (the layout is still checked for heads in one node).
                split = None
            else:
                views = weighting.views_at_heads(self, split, shared, detached)
        with HeadInputs(heads.modules, detached, views, watch) as head_inputs:
            predictions = self.forward_heads(detached)
        copies, per_task = self._check_layout(heads, head_inputs, predictions, detached, watch)
        self.shared_representation = SharedRepresentation(
            shared, (detached, *copies), per_task, split if per_task is not None else None
        )
        return predictions

    def _check_layout(
        self,
        heads: TaskHeads,
        head_inputs: HeadInputs,
        predictions: Mapping[str, Tensor],
        detached: Tensor,
        watch: GradientsAtHeads | None,
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...] | None]:
        """After ``forward_heads`` on the heads' own copies of ``detached``: the copies, and
        them again if each task reaches the representation only through its own (checked once
        per fit; else ``None``). With ``watch``, whether linear heads' factors serve (once)."""
        copies = head_inputs.created()
        per_task = None
        if head_inputs.one_call_each:
            if self._heads_apart is None:
                self._heads_apart = self._check_heads_apart(predictions, copies, detached)
            if self._heads_apart:
                per_task = copies
        if watch is not None:
            outputs = watch.take_linear_outputs()
            if self._linear_heads is None and per_task is not None:
                self._linear_heads = self._linear_factors_pay(heads.modules, detached) and (
                    linear_heads_factor(predictions, self.task_names, copies, outputs)
                )
            if not self._linear_heads or not watch.wants_linear_factors:
                watch.forget_linear_heads()
        return copies, per_task

    def _forward_shared(self, inputs: Any) -> Any:
        """``forward_shared(inputs)``; under ``torch.compile(model)``, with ``rep_grad=True``,
        compiled as ``forward`` is (Lightning's compiler context; the heads run eagerly, with
        the method's hooks). Parameter gradients take one backward per task through the trunk,
        which a compiled graph's freed buffers may refuse (see
        :func:`~lightning_lossagg.callbacks.gradient_weighting.retained_grad`)."""
        compiler = getattr(self, "_compiler_ctx", None)
        if (
            isinstance(compiler, dict)
            and (compiled := compiler.get("dynamo_ctx")) is not None
            and getattr(self._weighting, "rep_grad", False)
        ):
            return compiled(self.forward_shared)(inputs)
        return self.forward_shared(inputs)

    def _probe_linear_heads(self, heads: TaskHeads, detached: Tensor) -> None:
        """At a fit's first step, whether its linear heads may run as one node: the layout is
        checked on views of a copy of the representation, in one more call of ``forward_heads``
        whose graph is dropped, and whose draws of random numbers and changes to the model's
        buffers (dropout, batch norm) are undone. Every step then takes the same way, the first
        included, so a fit resumed from a checkpoint weighs its first step with the same
        arithmetic as the uninterrupted fit did."""
        leaf = detached.detach().requires_grad_()
        probe = GradientsAtHeads(len(heads.modules))
        buffers = [(buffer, buffer.clone()) for buffer in self.buffers()]
        devices = [leaf.device] if leaf.device.type == "cuda" else []
        views = probe.views(leaf)
        with (
            torch.random.fork_rng(devices),
            HeadInputs(heads.modules, leaf, views, probe) as inputs,
        ):
            predictions = self.forward_heads(leaf)
        with torch.no_grad():
            for buffer, saved in buffers:
                # Only what the probe changed: the trunk's backward may read the others (batch
                # norm's statistics), and any write would make autograd refuse it. (Kernels
                # update batch norm's statistics without a version bump: compare the values,
                # NaN equal to NaN.)
                if not _same_values(buffer, saved):
                    buffer.copy_(saved)
        self._check_layout(heads, inputs, predictions, leaf, probe)
        self._linear_heads = bool(self._linear_heads)  # decided: no probe at the next steps

    def _predict_with_linear_heads(
        self, heads: TaskHeads, shared: Tensor, detached: Tensor, split: GradientsAtHeads
    ) -> Mapping[str, Tensor] | None:
        """``forward_heads`` with the linear heads' outputs from one autograd node
        (:meth:`GradientsAtHeads.linear_heads`), whose backward hands the method only the heads'
        output gradients and weights; ``None`` if a head was not called exactly once on the
        representation (then this step, and the fit, take the views). Not under autocast, whose
        casts the node would have to repeat."""
        if torch.is_autocast_enabled(shared.device.type):
            return None
        if not all(map(_plain_linear, heads.modules)):  # hooked mid-fit (pruning, say)
            self._linear_heads = False
            return None
        linear: list[torch.nn.Linear] = heads.modules  # type: ignore[assignment]
        with FusedLinearHeads(linear, detached, shared, split) as fused:
            predictions = self.forward_heads(detached)
        if not fused.one_call_each:
            self._linear_heads = False
            split.forget_linear_heads()
            return None
        self.shared_representation = SharedRepresentation(shared, (detached,), None, split)
        return predictions

    def _check_heads_apart(
        self, predictions: Mapping[str, Tensor], copies: tuple[Tensor, ...], detached: Tensor
    ) -> bool:
        others = [detached, *self.shared_parameters()]
        broken = reach_only_own_heads(predictions, self.task_names, copies, others)
        if broken is not None:
            rank_zero_warn(
                f"Per-task gradients take one backward pass per task: {broken}. One pass serves "
                "all tasks when each task's prediction depends only on its own head in "
                "`self.heads`."
            )
        return broken is None

    @staticmethod
    def _linear_factors_pay(heads: list[torch.nn.Module], representation: Tensor) -> bool:
        """Whether linear heads' factors give the Gramian and the update in fewer operations than
        the views' gradients, per row of the representation: ``O^2 + O H`` against
        ``(K (K + 1) / 2 + K) H`` for K heads of O outputs in all on an N × H representation (the
        exact counts, ``O^2 (N + H) + N O H`` and ``N`` times the views', tend to these as N
        grows). Never the batch: every rank of a DDP run must take the same path, since the two
        issue the Gramian's all-reduce at different points of the backward, among DDP's own."""
        if representation.dim() != 2:
            return False
        width = representation.shape[1]
        tasks, outputs = len(heads), sum(head.out_features for head in heads)  # type: ignore[misc]
        factored = outputs * outputs + outputs * width
        return factored < (tasks * (tasks + 1) // 2 + tasks) * width

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters every task shares (gradient-based methods weigh their
        gradients). Default: everything outside ``self.heads``; override for other layouts."""
        heads = getattr(self, "heads", None)
        if not isinstance(heads, torch.nn.Module):
            raise TypeError(
                f"{type(self).__name__} has no `heads` module, so the shared part is unknown. "
                "Keep the task heads in `self.heads` (e.g. an nn.ModuleDict), or override "
                "shared_parameters()."
            )
        head_ids = {id(p) for p in heads.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in head_ids]

    def task_specific_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters outside :meth:`shared_parameters` (the task heads)."""
        shared_ids = {id(p) for p in self.shared_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in shared_ids]

    def per_sample_losses(
        self, predictions: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> Mapping[str, MaskedLoss]:
        """Apply each task's loss to its prediction and target, masking missing labels.

        Tasks with the same element-wise loss on predictions of one shape (several regression
        heads, say) are computed together on stacked tensors: a few operations per group instead
        of a few per task. Not for a weighting method that takes per-task gradients: stacking
        would join the tasks' graphs.
        """
        if self._weighting is not None and self._keeps_task_terms_apart:
            _check_names_of_batch(predictions, targets, self.task_names)
            groups = None
        else:
            groups = self._stacking_groups(predictions, targets)
        if groups is None:
            return {
                n: t.per_sample_loss(n, predictions[n], targets[n]) for n, t in self.tasks.items()
            }
        losses = [group.loss(predictions, targets) for group in groups]
        stacked = [(group.rows, loss) for group, (loss, _) in zip(groups, losses, strict=True)]
        inputs = [stacked_predictions for _, stacked_predictions in losses]
        return StackedLosses(self._reducer.names, stacked, inputs)

    def _stacking_groups(
        self, predictions: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> list[_StackedGroup] | None:
        """The tasks grouped by :meth:`Task.stacking_key` (``None``: every task alone), once the
        batch passed the checks. Kept per layout of the batch (names, shapes and dtypes): a new
        layout is checked and grouped once."""
        signature: tuple[Any, ...] | None = None
        if type(predictions) is dict and type(targets) is dict:
            # The batch's layout: numbers of predictions and targets, the tasks' shapes and
            # dtypes. Not the devices: the model does not move its heads during a fit, and a
            # target on another device fails the loss, which names the task.
            layout: list[Any] = [len(predictions), len(targets)]
            try:
                for name in self._reducer.names:  # the task names
                    prediction, target = predictions[name], targets[name]
                    layout += prediction.shape, prediction.dtype, target.shape, target.dtype
            except (KeyError, AttributeError):  # checked below
                pass
            else:
                signature = tuple(layout)
                if signature in self._stacking_plans:
                    return self._stacking_plans[signature]
        _check_names_of_batch(predictions, targets, self.task_names)
        groups: dict[object, list[int]] = {}
        for index, (name, task) in enumerate(self.tasks.items()):
            prediction, target = predictions[name], targets[name]
            key = None
            if isinstance(prediction, Tensor) and isinstance(target, Tensor):
                task.check_target(name, prediction, target)
                key = task.stacking_key(prediction, target)
            groups.setdefault(key if key is not None else ("alone", index), []).append(index)
        plan = None
        if len(groups) < len(self.tasks):
            plan = [
                _StackedGroup.of(rows, self.task_names, self.tasks, targets)
                for rows in groups.values()
            ]
        if signature is not None:
            if len(self._stacking_plans) > 64:  # layouts vary (a last short batch): bounded
                self._stacking_plans.clear()
            self._stacking_plans[signature] = plan
        return plan

    # ----------------------------------------------------------------------------- the steps
    # Under torch.compile(model), Lightning compiles the step methods too: the mixin's steps run
    # eagerly (host reads, hooks, the weighting's state) around the compiled forward.
    @torch.compiler.disable
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self._optimizer_stepped or self._optimizer_step_ran:  # this batch starts a new step
            if not self._optimizer_stepped:  # a step was taken, but the hook never came here
                _warn_of_missing_super(
                    self,
                    "on_before_optimizer_step(optimizer)",
                    "nonfinite='skip' cannot skip a step, nor can a step that float16's "
                    "GradScaler skips be forgotten. (Or an optimizer stepped outside Lightning's "
                    "wrapper: step self.optimizers(), not its .optimizer.)",
                )
            self._clear_step_flags()
        if not self._step_hooks:  # the fit's first batch
            for optimizer in getattr(self._trainer, "optimizers", ()):
                self._watch_optimizer(optimizer)
        output = self.task_losses(batch)
        masked = output if isinstance(output, StackedLosses) else self._checked_losses(output)
        if not self._gradients_checked:  # the fit's first batch
            _set_plain(self, "_gradients_checked", True)
            _warn_of_losses_without_gradient(masked)
        separate = self._weighting is not None and self._keeps_task_terms_apart
        step = self._reducer(masked, separate_tasks=separate)
        dropped = False
        if self.nonfinite == "raise":
            self._unchecked_nonfinite.append(step.nonfinite_ranks_on_host_later())
        else:
            bitsets = step.nonfinite_ranks.cpu()
            if bitsets.any():
                # drop_task with no task left (each non-finite or without a label): the batch is
                # left out, and its optimizer step too unless another of its batches has a task
                # (a zero gradient would still move an optimizer with momentum).
                skip = self.nonfinite == "skip"
                left_out = skip or bool(((bitsets > 0) | ~step.valid.cpu()).all())
                self._count_nonfinite_batch(bitsets, left_out)
                if left_out:
                    self.loss_record = self.shared_representation = None
                    if skip or not self._step_took_losses:
                        self._skip_optimizer_step = True
                    return self._zero_objective()
                step = self._reducer.drop_tasks(step, masked, bitsets > 0)
                dropped = True
        # The weighting's arithmetic in the losses' dtype: a Gramian's products (or a large
        # weighted sum) in float16 overflow, and a method's weights silently fall back to 1.
        device = step.local_sums.device.type
        weights, objective = outside_autocast(device, self._weighted_objective, step)
        if dropped:  # the dropped heads still take part in DDP's gradient reduction, with 0
            objective = objective + self._zero_objective()
        if not self._step_took_losses:
            _set_plain(self, "_step_took_losses", True)
            if self._skip_optimizer_step and self.nonfinite == "drop_task":
                _set_plain(self, "_skip_optimizer_step", False)  # a batch before had no task left
        _set_plain(self, "loss_record", step.record("train", weights, self._weighting))
        return objective

    def _weighted_objective(self, step: GlobalTaskLosses) -> tuple[Tensor, Tensor]:
        """The weights of ``step`` (static, or the weighting method's) and the objective handed
        to backward."""
        weighting = self._weighting
        if not self._step_kept_weights:  # the optimizer step's first weighted batch
            self._keep_state_before_step(weighting)
        if weighting is None:
            if self._static_weights_are_ones:
                return self._static_weights, step.weighted_sum()
            return self._static_weights, step.weighted_sum(self._static_weights)
        static = in_dtype(self._static_weights, step.dtype)
        if (representation := self.shared_representation) and representation.split:
            # The weights come from the task gradients that reach the heads' views in backward.
            weights, receiver = weighting.weights_in_backward(self, step, static)
            _set_plain(self, "shared_representation", None)
            objective = representation.split.objective(step.weighted_sum(static), receiver)
        else:
            weights = weighting.task_weights(self, step)
            if not isinstance(weights, Tensor) or weights.shape != static.shape:
                raise _bad_weights(weighting, weights, self.task_names)
            weights = in_dtype(weights, static.dtype)
            if weights.requires_grad:
                weights = weights.detach()
            if not self._static_weights_are_ones:
                weights = weights * static
            if not weighting.finite_weights:  # a task without a valid sample: weight 0
                weights = torch.where(step.valid, weights, 0.0)
                self._unchecked_weights.append(distributed.host_list_later(weights))
            objective = weighting.backward_objective(self, step, weights, static)
        self._keep_step_weights(weights, step.counts)
        return weights, objective

    @property
    def skipping_optimizer_step(self) -> bool:
        """Whether the coming optimizer step is skipped (``nonfinite="skip"``: a batch since the
        last one had a non-finite loss). Weighting methods read it in ``on_before_optimizer_step``
        (which Lightning calls before the module's) and leave their update out."""
        return self._skip_optimizer_step

    def _zero_objective(self) -> Tensor:
        """A loss whose gradient is 0 for every parameter, so that DDP's backward runs as usual on
        every rank (Lightning refuses a skipped training_step under DDP)."""
        parameters = [p for p in self.parameters() if p.requires_grad]
        return torch.stack([p.sum() for p in parameters]).sum() * 0.0

    def _count_nonfinite_batch(self, bitsets: Tensor, left_out: bool) -> None:
        """Warn of a batch with a non-finite loss, and count its optimizer step (once, whatever
        the number of its micro-batches that had one)."""
        bad = [(n, b) for n, b in zip(self.task_names, bitsets.tolist(), strict=True) if b]
        message = _nonfinite_message(bad, self.global_step)
        self.last_nonfinite_tasks = tuple(name for name, _ in bad)
        if not self._step_nonfinite:
            self._step_nonfinite = True
            self.skipped_steps += 1
            self._consecutive_skips += 1
        limit = self.max_consecutive_skips
        if limit is not None and self._consecutive_skips >= limit:
            self.forget_refused_step()
            raise NonFiniteLossError(
                f"{self._consecutive_skips} consecutive steps with a non-finite loss "
                f"(nonfinite={self.nonfinite!r}, max_consecutive_skips={limit}). Last: {message}"
            )
        if self.nonfinite == "skip":
            action = "The step was skipped"
        elif left_out:
            action = "The batch was left out, with no task left in it"
        else:
            action = "The step was taken without the task(s)"
        rank_zero_warn(f"{message} {action} (nonfinite={self.nonfinite!r}).")

    @torch.compiler.disable
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The global objective of a validation batch, the same on every rank, at the fit's
        latest weights; its global losses in :attr:`loss_record` (with several loaders, the epoch
        figures of :class:`~lightning_lossagg.callbacks.LossLogger` are over all of them
        together)."""
        return self._evaluation_step("val", batch)

    @torch.compiler.disable
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The global objective of a test batch (as :meth:`validation_step`)."""
        return self._evaluation_step("test", batch)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """``{task: prediction}``: ``self(inputs)`` of an ``(inputs, {task: target})`` batch (its
        targets unused), ``self(batch)`` of any other."""
        is_pair = isinstance(batch, (list, tuple)) and len(batch) == 2
        return self(batch[0] if is_pair and isinstance(batch[1], dict) else batch)

    def _evaluation_step(self, stage: str, batch: Any) -> Tensor:
        if self._unchecked_batch_counts is not None:  # the epoch's first batch
            self._check_batches_alike_on_every_rank()
        step = self.compute_global_losses(batch)
        # Each task's weight of the latest training step that had it (static before that).
        weights = self._fold_step_weights()
        if weights is None:
            weights = self._static_weights
        elif weights.device != step.local_sums.device:  # restored from a checkpoint: move once
            weights = self._latest_weights = weights.to(step.local_sums.device)
        self.loss_record = step.record(stage, weights, self._weighting)
        return self.loss_record.objective

    def _clear_step_flags(self) -> None:
        """Forget how the last optimizer step stood (:data:`_STEP_FLAGS` and the fused
        optimizers' overflow flags): a new one starts."""
        for flag in _STEP_FLAGS:
            _set_plain(self, flag, False)
        self._fused_found_inf.clear()

    def _keep_state_before_step(self, weighting: WeightingCallback | None) -> None:
        """At an optimizer step's first weighted batch: the evaluation weights and the weighting
        method's :meth:`~WeightingCallback.step_state` as they are, for
        :meth:`forget_refused_step`."""
        _set_plain(self, "_step_kept_weights", True)
        before = (self._latest_weights, self._pending_weights.copy())
        _set_plain(self, "_weights_before_step", before)
        if weighting is not None:
            _set_plain(self, "_weighting_state_before", weighting.step_state())

    def _keep_step_weights(self, weights: Tensor, counts: Tensor) -> None:
        """Keep a training step's effective weights for evaluation, with its global counts (a
        task's weight counts where it had a valid sample)."""
        pending = self._pending_weights
        pending.append((weights, counts))
        if len(pending) > _FOLD_EVERY:  # this step's weights may still be written in backward
            self._fold_step_weights(keep_latest_step=True)

    def _fold_step_weights(self, keep_latest_step: bool = False) -> Tensor | None:
        """:attr:`_latest_weights` with, per task, its weight at the last kept step in which it
        had a valid sample (a few operations for up to ``_FOLD_EVERY`` steps together)."""
        pending = self._pending_weights
        steps = pending[:-1] if keep_latest_step else pending
        if not steps:
            return self._latest_weights
        latest = _folded_weights(self._latest_weights, steps, self._static_weights)
        _set_plain(self, "_latest_weights", latest)
        _set_plain(self, "_pending_weights", pending[-1:] if keep_latest_step else [])
        return latest

    def compute_global_losses(self, batch: Any) -> GlobalTaskLosses:
        """The batch's global task losses: :meth:`task_losses`, then the step's one all-reduce.

        Call it on every rank together (it is a collective under DDP).
        """
        output = self.task_losses(batch)
        if not isinstance(output, StackedLosses):
            output = self._checked_losses(output)
        return self._reducer(output)

    def _checked_losses(self, output: TaskLossOutput) -> dict[str, MaskedLoss]:
        """``task_losses``' output other than the default's stacked losses, checked, as
        :class:`MaskedLoss` values."""
        _check_names("task_losses output", output, self.task_names)
        return {name: _as_masked_loss(name, output[name]) for name in self.task_names}

    # ----------------------------------------------------------------------------- hooks
    def setup(self, stage: str) -> None:
        super().setup(stage)
        methods = [cb for cb in self.trainer.callbacks if isinstance(cb, WeightingCallback)]  # type: ignore[attr-defined]
        if len(methods) > 1:
            names = ", ".join(type(method).__name__ for method in methods)
            raise ValueError(
                f"Found {len(methods)} weighting callbacks ({names}); a model trains with one "
                "weighting method. Keep one of them in the trainer's callbacks."
            )
        self._weighting = methods[0] if methods else None
        if stage == "fit":  # a checkpoint the fit resumes from restores them after setup
            self._latest_weights, self._pending_weights = None, []
            self._gradients_checked = False
            self._clear_step_flags()  # an earlier fit may have stopped amid a step
            self._unchecked_nonfinite.clear()  # (its checks left unread)
            self._unchecked_weights.clear()
            self._remove_step_hooks()  # (and not torn down: an id may name a new optimizer)
        # The strategy has set up its processes: whether they are several is fixed for the fit.
        self._reducer.across_ranks = distributed.is_distributed()
        self._task_heads, self._heads_apart, self._linear_heads = None, None, None
        if self._weighting is not None and self._weighting.splits_forward and _default_losses(self):
            self._task_heads = find_task_heads(self)
        if self._task_heads is not None and not all(map(_plain_linear, self._task_heads.modules)):
            self._linear_heads = False

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep, beside the model's state_dict (which they never change), the weights evaluation
        uses (``trainer.validate(ckpt_path=...)`` weighs as the fit did) and the skip counts; in a
        full checkpoint saved amid an optimizer step (between micro-batches), also the step's
        skip flags and what a refusal of the step would put back."""
        super().on_save_checkpoint(checkpoint)
        # After a step float16's GradScaler skipped, before the weighting callback forgot it:
        # a weights-only checkpoint calls no callback's on_save_checkpoint.
        self.forget_step_not_taken()
        latest = self._fold_step_weights()
        checkpoint[CHECKPOINT_KEY] = {
            "latest_weights": None if latest is None else latest.detach().cpu(),
            "task_names": list(self.task_names),
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self._consecutive_skips,
        }
        if "callbacks" in checkpoint and not self._optimizer_stepped:  # a full one, amid a step
            checkpoint[CHECKPOINT_KEY]["skip_optimizer_step"] = self._skip_optimizer_step
            checkpoint[CHECKPOINT_KEY]["step_nonfinite"] = self._step_nonfinite
            if self._step_kept_weights:
                checkpoint[CHECKPOINT_KEY]["before_step"] = self._state_before_step()

    def _state_before_step(self) -> dict[str, Any]:
        """What :meth:`forget_refused_step` would put back, for a checkpoint saved amid an
        optimizer step: the evaluation weights, and the weighting method's ``state_dict`` as
        it was before the step (its step state put back for the call)."""
        latest, pending = self._weights_before_step
        weights = _folded_weights(latest, pending, self._static_weights)
        saved: dict[str, Any] = {
            "latest_weights": None if weights is None else weights.detach().cpu(),
            "weighting": None,
        }
        weighting, before = self._weighting, self._weighting_state_before
        if weighting is not None:
            if not isinstance(before, _SavedWeightingState):
                now = weighting.step_state()
                weighting.put_back_step_state(before)
                try:
                    state = move_data_to_device(weighting.state_dict(), "cpu")
                finally:
                    weighting.put_back_step_state(now)
                before = _SavedWeightingState(weighting.state_key, state)
            saved["weighting"] = before._asdict()
        return saved

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(CHECKPOINT_KEY, {})
        trainer = getattr(self, "_trainer", None)
        if self._weighting is None and trainer is not None and trainer.state.fn == "fit":
            self._latest_weights = None  # a fit without a method weighs with the static ones
        else:
            self._latest_weights = self._weights_by_name(state.get("latest_weights"), state)
        self._pending_weights = []
        self.skipped_steps = state.get("skipped_steps", 0)
        self._consecutive_skips = state.get("consecutive_skips", 0)
        if trainer is not None and trainer.state.fn == "fit":  # amid a step: how it stood
            _set_plain(self, "_skip_optimizer_step", state.get("skip_optimizer_step", False))
            _set_plain(self, "_step_nonfinite", state.get("step_nonfinite", False))
            before = state.get("before_step")
            if before is not None:
                self._resume_amid_step(before, state, checkpoint.get("callbacks", {}))

    def _resume_amid_step(
        self, before: dict[str, Any], state: dict[str, Any], callbacks: dict[str, Any]
    ) -> None:
        """A fit resumed from a checkpoint saved amid an optimizer step: what was before that
        step, should the step be refused. Only for the same tasks and weighting method, whose
        state the checkpoint holds (else the step's first resumed batch is taken as its start,
        as by a checkpoint without it)."""
        saved, weighting = before["weighting"], self._weighting
        same_method = (saved is None and weighting is None) or (
            saved is not None
            and weighting is not None
            and saved["state_key"] == weighting.state_key
            and weighting.state_key in callbacks
        )
        same_tasks = state.get("task_names", list(self.task_names)) == list(self.task_names)
        if not (same_method and same_tasks):
            return
        _set_plain(self, "_step_kept_weights", True)
        _set_plain(self, "_weights_before_step", (before["latest_weights"], []))
        if saved is not None:
            kept = _SavedWeightingState(saved["state_key"], saved["state"])
            _set_plain(self, "_weighting_state_before", kept)

    def _weights_by_name(self, weights: Tensor | None, state: dict[str, Any]) -> Tensor | None:
        """A checkpoint's evaluation weights in this model's task order; None (evaluation then
        weighs with the static weights), with a warning, when its tasks are not this model's."""
        if weights is None:
            return None
        saved = state.get("task_names")  # absent in checkpoints from before names were kept
        if saved is None and len(weights) == len(self.task_names):
            return weights
        if saved is not None and sorted(saved) == sorted(self.task_names):
            return weights[[saved.index(name) for name in self.task_names]]
        rank_zero_warn(
            f"The checkpoint's evaluation weights are for "
            f"{f'the tasks {saved}' if saved else f'{len(weights)} tasks'}, not this model's "
            f"{list(self.task_names)}: validation and test weigh each task with its "
            "static Task.weight until a training step gives weights again."
        )
        return None

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        trainer = self.trainer
        sanity = trainer.sanity_checking
        counts = trainer.num_sanity_val_batches if sanity else trainer.num_val_batches
        _set_plain(self, "_unchecked_batch_counts", ("validation", counts))

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        _set_plain(self, "_unchecked_batch_counts", ("test", self.trainer.num_test_batches))

    def _check_batches_alike_on_every_rank(self) -> None:
        """At an evaluation epoch's first step: each evaluation batch's losses take one
        all-reduce, so a rank with fewer batches than another would leave it waiting for ever (a
        sampler that does not pad, per-rank loaders of different lengths). One collective per
        evaluation epoch, under DDP only."""
        stage, counts = self._unchecked_batch_counts  # type: ignore[misc]
        _set_plain(self, "_unchecked_batch_counts", None)
        if not distributed.is_distributed() or any(c == float("inf") for c in counts):
            return  # an iterable without a length: its batches are not known ahead
        total = float(sum(counts))
        extremes = torch.tensor([total, -total], dtype=torch.float64, device=self.device)
        most, fewest = distributed.all_reduce_max(extremes).tolist()
        fewest = -fewest
        if most != fewest:
            raise RuntimeError(
                f"The {stage} epoch has {fewest:.0f} batches on one rank and {most:.0f} on "
                "another: every evaluation batch's losses are summed over the ranks, so each rank "
                "needs as many batches. Let Lightning's DistributedSampler pad the set (the "
                "default), or give a sampler or loaders with as many batches on every rank."
            )

    def teardown(self, stage: str) -> None:
        super().teardown(stage)
        self._reducer.across_ranks = None  # outside a fit, asked at every call again
        self._remove_step_hooks()

    def _remove_step_hooks(self) -> None:
        for handle in self._step_hooks.values():
            handle.remove()
        self._step_hooks.clear()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if not self._gradients_checked:  # no batch of the fit reached the mixin's training_step
            _set_plain(self, "_gradients_checked", True)  # warned once
            rank_zero_warn(
                f"{type(self).__name__}.training_step did not call MultiTaskMixin.training_step: "
                "no global task losses were recorded, so the weighting method, LossLogger and "
                "LossBalanceMonitor see nothing. Call super().training_step(batch, batch_idx) "
                "and return its objective (or backward it)."
            )

    def on_after_backward(self) -> None:
        super().on_after_backward()
        # nonfinite="raise": before any callback's on_before_optimizer_step (a method's update of
        # its learned state, gradient clipping) sees the step.
        self.check_nonfinite_losses()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        _set_plain(self, "_optimizer_stepped", True)
        self._watch_optimizer(optimizer)  # one that came after the fit's first batch
        if self._consecutive_skips and not self._step_nonfinite:
            _set_plain(self, "_consecutive_skips", 0)  # a step whose every loss was finite
        if self._skip_optimizer_step:
            # Parameters without a gradient are left alone by torch's optimizers (no update, no
            # momentum or Adam state change). With gradient accumulation the whole step is skipped;
            # under manual optimization every optimizer the batch steps is (the flag holds until
            # the next batch's training_step). Nor do its micro-batches' weights evaluate, nor
            # stay in the weighting method's state.
            self.forget_refused_step()
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None
        if self._unchecked_nonfinite or self._unchecked_weights:  # see on_after_backward
            _warn_of_missing_super(
                self,
                "on_after_backward()",
                "non-finite losses are checked only now, after the callbacks' "
                "on_before_optimizer_step.",
            )
            self.check_nonfinite_losses()

    def _watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Have ``optimizer``'s ``step()`` tell when it runs (once per fit and optimizer)."""
        if id(optimizer) not in self._step_hooks:
            hook = optimizer.register_step_post_hook(self._note_optimizer_step)
            self._step_hooks[id(optimizer)] = hook

    def _note_optimizer_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        _set_plain(self, "_optimizer_step_ran", True)
        # GradScaler hands an optimizer that unscales in its own kernel (fused=True) its
        # overflow flag for the call; the kernel leaves parameters and state alone if it is set.
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, Tensor):
            self._fused_found_inf.append(found_inf)
        else:
            _set_plain(self, "_optimizer_step_taken", True)

    def _an_optimizer_stepped(self) -> bool:
        """Whether an optimizer of this optimizer step updated the model. A fused optimizer's
        overflow flag is read on the host when asked (where the scaler reads it itself for
        the others, before their step)."""
        if self._fused_found_inf:
            if any(not found.item() for found in self._fused_found_inf):
                _set_plain(self, "_optimizer_step_taken", True)
            self._fused_found_inf.clear()
        return self._optimizer_step_taken

    @property
    def optimizer_step_taken(self) -> bool:
        """Whether this batch's optimizer step moved the model: it reached an optimizer, which
        stepped (float16's ``GradScaler`` skips a step whose gradients overflowed, and a fused
        optimizer skips its update), and was not skipped for a non-finite loss. Read it in
        ``on_train_batch_end``."""
        return not self._skip_optimizer_step and self._an_optimizer_stepped()

    def forget_step_not_taken(self) -> bool:
        """:meth:`forget_refused_step` if this batch's optimizer step reached the optimizer but
        none stepped, and whether it did: float16's ``GradScaler`` skips a step whose gradients
        overflowed (most often the first steps of a fit, while it lowers its scale), and the
        step leaves nothing in the method's state, as it leaves the model. Weighting callbacks
        call it in ``on_train_batch_end`` and, for a checkpoint saved before that (by a callback
        listed before them), in ``on_save_checkpoint``, as does the mixin's own (a weights-only
        checkpoint calls no callback's). A fused optimizer skips the update inside its own
        ``step()``: its overflow flag is read then (one host read per step, under the scaler
        only)."""
        if self._optimizer_stepped and self._step_kept_weights and not self._an_optimizer_stepped():
            self.forget_refused_step()
            return True
        return False

    def check_nonfinite_losses(self) -> None:
        """With ``nonfinite="raise"``: read the non-finite flags of the batches since the last
        check (host copies queued right after the step's all-reduce) and raise
        :class:`NonFiniteLossError` if one had a non-finite loss, after
        :meth:`forget_refused_step`; under any policy, raise ``FloatingPointError`` likewise if
        a weighting callback gave a task with a valid sample a non-finite weight (which would
        make every gradient NaN). Called after each backward."""
        if self._unchecked_nonfinite:
            pending = self._unchecked_nonfinite.copy()
            self._unchecked_nonfinite.clear()  # in place: no nn.Module attribute assignment
            for flags in pending:
                bitsets = flags()
                if any(bitsets):
                    named = zip(self.task_names, bitsets, strict=True)
                    bad = [(name, bits) for name, bits in named if bits]
                    self._unchecked_weights.clear()  # the refused step's: never read
                    self.forget_refused_step()
                    # The steps since the last optimizer step are all this global step's batches.
                    raise NonFiniteLossError(_nonfinite_message(bad, self.global_step))
        if self._unchecked_weights:
            pending = self._unchecked_weights.copy()
            self._unchecked_weights.clear()
            for read in pending:
                weights = read()
                if not all(map(math.isfinite, weights)):
                    self.forget_refused_step()
                    raise FloatingPointError(
                        _nonfinite_weights_message(
                            self._weighting, self.task_names, weights, self.global_step
                        )
                    )

    def forget_unfinished_step(self) -> None:
        """:meth:`forget_refused_step`, unless an optimizer has stepped in this optimizer step:
        for an exception amid its batches or before its update (an out-of-memory error, an
        error in gradient clipping, an interrupted fit), after which the model has not moved
        either. Weighting callbacks call it in ``on_exception``."""
        if not self._an_optimizer_stepped():
            self.forget_refused_step()

    def forget_refused_step(self) -> None:
        """Put the evaluation weights and the weighting method's state
        (:meth:`WeightingCallback.step_state`) back to what they were before this optimizer
        step's first batch: a step that is skipped, or refused with an error, leaves nothing
        behind, and a fit started again goes on from the step before. A weighting callback
        calls it before it raises an error that refuses the step (never once the optimizer has
        stepped: that step is taken)."""
        if not self._step_kept_weights:
            return  # no batch of this step was weighted
        _set_plain(self, "_step_kept_weights", False)
        latest, kept = self._weights_before_step
        _set_plain(self, "_latest_weights", latest)
        _set_plain(self, "_pending_weights", kept)
        state = self._weighting_state_before
        _set_plain(self, "_weighting_state_before", None)
        if self._weighting is None:
            return
        if isinstance(state, _SavedWeightingState):  # resumed amid the step
            self._weighting.load_state_dict(state.state)
        else:
            self._weighting.put_back_step_state(state)


class _SavedWeightingState(NamedTuple):
    """A weighting method's ``state_dict`` before the optimizer step a checkpoint was saved amid
    (``forget_refused_step`` loads it back if the resumed step is refused)."""

    state_key: str
    state: dict[str, Any]


class _StackedGroup(NamedTuple):
    """Tasks whose per-sample losses one call computes on stacked tensors (equal
    :meth:`Task.stacking_key`), or a task alone."""

    rows: list[int]  # the tasks' indices
    names: tuple[str, ...]
    label: str  # the names, for errors
    task: Task  # the first task (the group shares its loss)
    pick: Callable[[Mapping[str, Tensor]], Any]  # the group's values (a tuple) of a task dict
    # Tasks whose targets of this layout are still to be checked (Task.target_checked): a
    # bce_with_logits task whose batches had no label yet. Emptied as they are.
    unchecked: dict[str, Task]

    @classmethod
    def of(
        cls,
        rows: list[int],
        names: tuple[str, ...],
        tasks: Mapping[str, Task],
        targets: Mapping[str, Tensor],
    ) -> _StackedGroup:
        group = tuple(names[row] for row in rows)
        unchecked = {n: tasks[n] for n in group if not tasks[n].target_checked(targets[n])}
        return cls(rows, group, ", ".join(group), tasks[group[0]], itemgetter(*group), unchecked)

    def loss(
        self, predictions: Mapping[str, Tensor], targets: Mapping[str, Tensor]
    ) -> tuple[MaskedLoss, Tensor | None]:
        """The group's per-sample losses as one ``[G, ...]`` MaskedLoss, and the stacked
        predictions they were computed from (``None`` for a group of one task)."""
        if len(self.names) == 1:  # pick returns the task's value itself
            prediction, target = self.pick(predictions), self.pick(targets)
            loss = values, mask = self.task.per_sample_loss(self.label, prediction, target)
            return type(loss)(values.unsqueeze(0), mask.unsqueeze(0)), None
        if self.unchecked:
            for name, task in list(self.unchecked.items()):
                task.check_target(name, predictions[name], targets[name])
                if task.target_checked(targets[name]):
                    del self.unchecked[name]
        stacked_predictions = torch.stack(self.pick(predictions))
        stacked_targets = torch.stack(self.pick(targets))
        # Stacked tasks passed check_target in _stacking_groups, for this layout of the batch.
        try:
            loss = self.task.checked_per_sample_loss(
                self.label, stacked_predictions, stacked_targets
            )
        except ValueError:
            # Name the task at fault, with its own shapes: each task alone raises its error.
            for name in self.names:
                self.task.per_sample_loss(name, predictions[name], targets[name])
            raise
        return loss, stacked_predictions


# The mixin's entry in a checkpoint (beside the state_dict): see on_save_checkpoint.
CHECKPOINT_KEY = "lossagg"

# The steps write their per-step values (never a parameter, buffer or module) past
# nn.Module.__setattr__, whose registration checks cost a few Python calls at every step.
_set_plain = object.__setattr__

# Training steps whose weights wait to be folded into the evaluation weights together.
_FOLD_EVERY = 32

# Flags of one optimizer step, however many batches and optimizers it has; cleared by the next
# batch once it is over.
_STEP_FLAGS = (
    "_skip_optimizer_step",
    "_step_nonfinite",
    "_optimizer_stepped",
    "_optimizer_step_ran",
    "_optimizer_step_taken",
    "_step_kept_weights",
    "_step_took_losses",
)


def not_overridden(model: MultiTaskMixin, method: str) -> bool:
    """Whether ``model``'s ``method`` is the mixin's own: overridden neither in a subclass nor on
    the instance (a function set there has no ``__func__``)."""
    return getattr(getattr(model, method), "__func__", None) is getattr(MultiTaskMixin, method)


def _plain_linear(head: torch.nn.Module) -> bool:
    """Whether ``head`` computes as ``nn.Linear`` with its own parameters, so that its output can
    come from one node with the other heads': an ``nn.Linear``, not a subclass nor an instance
    with a forward of its own, whose weight and bias are its parameters, and which has no forward
    pre-hook (``torch.nn.utils.prune``, ``weight_norm`` and ``spectral_norm`` compute the weight
    in one, at the head's own call)."""
    own = head._parameters
    return (
        type(head) is torch.nn.Linear
        and "forward" not in vars(head)
        and not head._forward_pre_hooks
        and isinstance(own.get("weight"), torch.nn.Parameter)
        and (head.bias is None or isinstance(own.get("bias"), torch.nn.Parameter))
    )


def _default_losses(model: MultiTaskMixin) -> bool:
    """Whether the model computes its losses the default way: task ``k``'s loss from its own
    prediction and target only."""
    return not_overridden(model, "task_losses") and not_overridden(model, "per_sample_losses")


def _same_values(tensor: Tensor, other: Tensor) -> bool:
    """``torch.equal`` that takes NaN as equal to NaN."""
    if torch.equal(tensor, other):
        return True
    if not tensor.is_floating_point() or tensor.shape != other.shape:
        return False
    return bool(((tensor == other) | (tensor.isnan() & other.isnan())).all())


def _warn_of_missing_super(model: MultiTaskMixin, hook: str, consequence: str) -> None:
    name = hook.split("(")[0]
    rank_zero_warn(
        f"{type(model).__name__}.{name} does not call super().{hook}: {consequence} Call super() "
        "in the override."
    )


def _bad_weights(
    weighting: WeightingCallback, weights: object, task_names: tuple[str, ...]
) -> TypeError:
    got = f"shape {list(weights.shape)}" if isinstance(weights, Tensor) else _describe(weights)
    return TypeError(
        f"{type(weighting).__name__}.task_weights returned {got}: it returns one weight per "
        f"task, a tensor of shape [{len(task_names)}] in the order of {list(task_names)}."
    )


def _warn_of_losses_without_gradient(masked: Mapping[str, MaskedLoss]) -> None:
    """Warn, naming them, of the tasks whose losses carry no gradient while training: logged but
    never trained (a loss computed through NumPy, ``.item()`` or ``.detach()``)."""
    if not torch.is_grad_enabled():
        return
    frozen = [name for name, loss in masked.items() if not loss.values.requires_grad]
    if frozen:
        rank_zero_warn(
            f"The losses of task(s) {frozen} carry no gradient: they are logged, but nothing "
            "trains on them. Compute them with torch operations on the predictions (not "
            "through NumPy, .item() or .detach()); give Task(weight=0) to only watch a task."
        )


def _folded_weights(
    latest: Tensor | None, steps: list[tuple[Tensor, Tensor]], static: Tensor
) -> Tensor | None:
    """``latest`` (``static`` if ``None``) with, per task, its weight at the last of ``steps``
    (``(weights, global counts)``) in which it had a valid sample."""
    if not steps:
        return latest
    weights = torch.stack([step_weights for step_weights, _ in steps])
    valid = torch.stack([counts for _, counts in steps]) > 0
    # Each task's last step with a valid sample: its row number (from 1) is the largest of the
    # rows where it had one; 0: no such step.
    numbers = torch.arange(1, len(steps) + 1, device=valid.device)
    last, index = (valid * numbers[:, None]).max(0)
    latest = static if latest is None else latest
    if latest.dtype != weights.dtype or latest.device != weights.device:
        latest = latest.to(weights)
    return torch.where(last > 0, weights.gather(0, index[None])[0], latest)


def _nonfinite_message(bad: list[tuple[str, float]], step_index: int) -> str:
    parts = []
    for name, bits in bad:
        parts.append(f"task {name!r} on rank(s) {distributed.ranks_in_bitset(bits)}")
    return (
        f"Non-finite loss at global step {step_index}: {'; '.join(parts)}. Check the inputs and "
        "targets of that batch (a NaN or inf among a task's per-sample losses counts even where "
        "its mask is False: its gradient there would be NaN), lower the learning rate, or clip "
        "gradients; nonfinite='skip' or 'drop_task' on the model tolerates rare bad batches."
    )


def _nonfinite_weights_message(
    weighting: WeightingCallback | None,
    names: tuple[str, ...],
    weights: list[float],
    step_index: int,
) -> str:
    named = zip(names, weights, strict=True)
    bad = ", ".join(f"task {name!r} {value}" for name, value in named if not math.isfinite(value))
    return (
        f"{type(weighting).__name__}.task_weights gave a non-finite weight at global step "
        f"{step_index}: {bad}. Every gradient would be NaN: the step is refused (the model has "
        "not moved, the method's state is put back). A weighting method must give each task "
        "with a valid sample a finite weight (an inverse of a loss of 0, say, is infinite)."
    )


def _as_tasks(tasks: Mapping[str, Task | str]) -> dict[str, Task]:
    if not isinstance(tasks, Mapping):
        raise TypeError(
            f"tasks must be a dict {{name: Task or loss name}}, got {type(tasks).__name__}: "
            "e.g. tasks={'price': Task('mse', weight=2.0), 'kind': 'cross_entropy'}."
        )
    if not tasks:
        raise ValueError(
            "MultiTaskMixin needs at least one task: tasks={'name': Task(loss='mse'), ...}."
        )
    result = {}
    for name, task in tasks.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Task names must be non-empty strings, got {name!r}.")
        if isinstance(task, str):
            task = Task(loss=task)
        if not isinstance(task, Task):
            raise TypeError(f"Task {name!r} must be a Task or a loss name, got {task!r}.")
        result[name] = task
    return result


def _check_names_of_batch(
    predictions: Mapping[str, Any], targets: Mapping[str, Any], task_names: tuple[str, ...]
) -> None:
    _check_names("targets", targets, task_names)
    _check_names("predictions", predictions, task_names)


# Per mapping of task names: the errors for not a dict, unknown names and missing tasks.
_NAME_ERRORS = {
    "targets": (
        "The targets must be a dict {{task: tensor}}, got {got}.",
        "Unknown task name(s) {unknown} in the targets; the model's tasks are {tasks}. Rename "
        "them or add the tasks to the model.",
        "The targets lack(s) task(s) {missing}. Give every task a value; mark missing labels "
        "with NaN (float targets) or ignore_index (class targets).",
    ),
    "predictions": (
        "forward must return {{task: prediction}}, got {got}.",
        "forward returned predictions named {unknown}, which are not among the model's tasks "
        "{tasks}. Return {{task: prediction}} with the task names, add the tasks to the model, "
        "or override predict_tasks(inputs) to pick the tasks' predictions from a forward that "
        "returns more.",
        "forward returned no prediction for task(s) {missing}. forward must return a prediction "
        "for every task of the model: {tasks}.",
    ),
    "task_losses output": (
        "task_losses must return a dict {{task: per-sample losses}}, got {got}.",
        "task_losses returned losses named {unknown}, which are not among the model's tasks "
        "{tasks}. Return {{task: losses}} with the task names, or add the tasks to the model.",
        "task_losses returned no losses for task(s) {missing}. Return every task's per-sample "
        "losses; a task without a label in the batch takes values with an all-False mask.",
    ),
}


def _check_names(what: str, mapping: Mapping[str, Any], task_names: tuple[str, ...]) -> None:
    """A clear error unless ``mapping`` is a dict with exactly the model's task names."""
    not_a_dict, unknown_names, missing_tasks = _NAME_ERRORS[what]
    if not isinstance(mapping, Mapping):
        raise TypeError(not_a_dict.format(got=type(mapping).__name__))
    unknown = sorted(set(mapping) - set(task_names))
    if unknown:
        raise KeyError(unknown_names.format(unknown=unknown, tasks=list(task_names)))
    missing = [name for name in task_names if name not in mapping]
    if missing:
        raise KeyError(missing_tasks.format(missing=missing, tasks=list(task_names)))


def _as_masked_loss(name: str, value: MaskedLoss | tuple[Tensor, Tensor] | Tensor) -> MaskedLoss:
    """One task's entry of an overridden ``task_losses``: per-sample losses (a tensor), a
    :class:`MaskedLoss` or a ``(values, mask)`` pair, checked."""
    if isinstance(value, Tensor):
        value = MaskedLoss(value, torch.ones_like(value, dtype=torch.bool))
    is_pair = isinstance(value, tuple | list) and len(value) == 2
    if not (is_pair and all(isinstance(part, Tensor) for part in value)):
        raise TypeError(
            f"Task {name!r}: task_losses returned {_describe(value)}. Return per-sample losses as "
            "a tensor (every sample valid), a MaskedLoss(values, mask) or a pair (values, mask) "
            "of tensors, the mask a bool tensor of the values' shape."
        )
    values, mask = value
    if values.ndim == 0:
        raise ValueError(
            f"Task {name!r}: task_losses returned a scalar. Return one loss per sample."
        )
    if mask.shape != values.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"Task {name!r}: the mask must be a bool tensor of the values' shape "
            f"{tuple(values.shape)}, got {mask.dtype} of shape {tuple(mask.shape)}."
        )
    return value if type(value) is ZeroMaskedLoss else MaskedLoss(values, mask)


def _describe(value: Any) -> str:
    """What was given, for an error: the type, and a sequence's length and item types."""
    if value is None:
        return "None"
    if isinstance(value, tuple | list):
        items = ", ".join(type(item).__name__ for item in value)
        return f"a {type(value).__name__} of {len(value)} item(s) ({items})"
    return f"a {type(value).__name__}"
