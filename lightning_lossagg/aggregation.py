"""Exact global task losses from per-sample losses on every rank, with one all-reduce.

Per task ``k`` every rank ``r`` holds a numerator ``a_kr`` and a denominator ``b_kr``:

* ``rank_weighting="samples"``: ``a_kr`` = the sum of the valid per-sample losses, ``b_kr`` = their
  count (``reduction="sum"``: the global denominator is 1 once any rank has a valid sample);
* ``rank_weighting="uniform"``: ``a_kr`` = the rank's own mean (or sum), ``b_kr`` = 1 when the rank
  has a valid sample of the task, so every such rank has an equal say.

The global loss is :math:`L_k = \\sum_r a_{kr} / \\sum_r b_{kr}`. Each rank hands backward the
local term :math:`t_{kr} = W a_{kr} / \\sum_r b_{kr}`; DDP averages gradients over the ``W`` ranks,
so the gradient it applies is :math:`\\frac1W\\sum_r \\nabla t_{kr} = \\nabla L_k`, exactly, for
uneven batches, partly labelled batches and ranks without a valid sample.

Sums and counts accumulate in at least float32 (:func:`accumulation_dtype`): in bfloat16, adding
ones stops at 256.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_lossagg import distributed
from lightning_lossagg.tasks import MaskedLoss, StackedLosses, Task, ZeroMaskedLoss
from lightning_lossagg.weighting import LossRecord

if TYPE_CHECKING:
    from lightning_lossagg.weighting import WeightingCallback

RankWeighting = Literal["samples", "uniform"]

# Per-task values of a step that index_add adds in float32; more are added in float64.
_FLOAT32_ADDS = 2**22


class TaskSums(NamedTuple):
    """Per task, the sum of its valid values, each a scalar with a graph of its own, and the
    counts of those values (one vector)."""

    sums: list[Tensor]
    counts: Tensor


class GlobalTaskLosses:
    """The global figures of one step, identical on every rank (but ``local_terms``).

    Derived figures are computed when first read.

    Attributes:
        names: the task names, in the model's order.
        counts: global denominators ``sum_r b_kr``: valid samples (``"samples"``; for a
            ``reduction="sum"`` task 1, or 0 without a valid sample), or ranks with a valid
            sample (``"uniform"``); the weight of this step in an epoch mean.
        valid: whether task ``k`` had a valid sample anywhere in the global batch.
        losses: global task losses ``L_k`` (detached; NaN where no rank had a valid sample).
        local_sums: this rank's numerators ``a_k`` with their graph.
        term_scale: the factors ``c_k`` (no graph) that make them the local terms.
        local_terms: this rank's terms ``t_k = c_k a_k`` with their graph: DDP's averaged
            gradient of ``t_k`` is the gradient of ``L_k``. The objective handed to backward is
            ``sum_k w_k t_k`` (:meth:`weighted_sum`).
        task_terms: the same terms as K scalars whose graphs stay apart (each reaches only its
            own task's losses), when the reducer was asked for them; else ``None``. Per-task
            gradients taken from them cost one pass through each task's head, not through all.
        nonfinite_ranks: per task, the summed bit-set of ranks whose local loss was not finite.
    """

    def __init__(
        self,
        names: tuple[str, ...],
        numerators: Tensor,
        counts: Tensor,
        local_sums: Tensor,
        term_scale: Tensor,
        nonfinite_ranks: Tensor | None = None,
        task_terms: tuple[Tensor, ...] | None = None,
    ) -> None:
        self.names, self.counts = names, counts
        self.local_sums, self.term_scale = local_sums, term_scale
        self.task_terms = task_terms
        self._numerators = numerators
        self._nonfinite_ranks = nonfinite_ranks

    @cached_property
    def local_terms(self) -> Tensor:
        return self.local_sums * self.term_scale

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the local terms (and of the objective)."""
        return self.local_sums.dtype

    def weighted_sum(self, weights: Tensor | None = None) -> Tensor:
        """``sum_k w_k t_k`` (``weights`` ``None``: all 1) as ``sum_k (w_k c_k) a_k``: one
        operation with a graph, where the terms themselves take two."""
        factors = self.term_scale if weights is None else weights * self.term_scale
        return torch.dot(self.local_sums, in_dtype(factors, self.local_sums.dtype))

    @cached_property
    def valid(self) -> Tensor:
        return self.counts > 0

    @cached_property
    def losses(self) -> Tensor:
        return _global_losses(self._numerators, self.counts, self.dtype)

    @cached_property
    def nonfinite_ranks(self) -> Tensor:
        if self._nonfinite_ranks is not None:
            return self._nonfinite_ranks
        # One process: rank 0 (bit value 1) is the only rank.
        return (~finite(self._numerators)).to(self.counts.dtype)

    def record(
        self, stage: str, weights: Tensor, weighting: WeightingCallback | None = None
    ) -> LossRecord:
        """The step's :class:`LossRecord`, of detached figures only: keeping it does not keep the
        step's autograd graph (and activations) alive."""
        losses = self.__dict__.get("losses")
        if losses is None:
            losses = partial(_global_losses, self._numerators, self.counts, self.dtype)
        return LossRecord(stage, self.names, losses, weights, self.counts, weighting)

    def nonfinite_ranks_on_host_later(self) -> Callable[[], list[float]]:
        """A function returning :attr:`nonfinite_ranks` as a host list, from detached figures only.
        On CUDA the copy to the host is queued now and the function waits for it alone, not for
        the work queued after it; on one process the check runs on the host, no tensor operation.
        """
        figures = self._numerators if self._nonfinite_ranks is None else self._nonfinite_ranks
        read = distributed.host_list_later(figures)
        if self._nonfinite_ranks is not None:
            return read
        return partial(_rank_zero_bits, read)


class TaskLossReducer:
    """Reduces every task's per-sample losses over all ranks with ONE all-reduce per call.

    The work per step is a few tensor operations per group of stacked losses
    (:class:`~lightning_lossagg.tasks.StackedLosses`), and the other tasks' values concatenated and
    summed per task with one ``index_add``. Values are masked first (a task at a time in the
    concatenation), but for a :class:`~lightning_lossagg.tasks.ZeroMaskedLoss`, 0 at its missing
    labels already: the registry's class losses and distances give one. The small per-task
    constants are built once per device and shape and reused. On one process nothing is packed
    or reduced at all.

    Attributes:
        across_ranks: whether the figures are reduced over ranks, set for a fit by its owner
            (the mixin, at ``setup``); ``None`` (default): asked of ``torch.distributed`` at every
            call.
    """

    def __init__(self, tasks: Mapping[str, Task], rank_weighting: RankWeighting = "samples"):
        if rank_weighting not in ("samples", "uniform"):
            raise ValueError(
                f"rank_weighting must be 'samples' or 'uniform', got {rank_weighting!r}."
            )
        self.names = tuple(tasks)
        self.rank_weighting = rank_weighting
        self._is_mean = [task.reduction == "mean" for task in tasks.values()]
        # Every task a mean over samples: the numerators and denominators are the sums and counts.
        self._plain_means = rank_weighting == "samples" and all(self._is_mean)
        self._cache: dict[tuple, Any] = {}
        self.across_ranks: bool | None = None

    def __call__(
        self, masked_losses: Mapping[str, MaskedLoss], separate_tasks: bool = False
    ) -> GlobalTaskLosses:
        """The step's global figures. ``separate_tasks``: also build ``task_terms``, one scalar per
        task with a graph of its own (the values of different tasks must not share a graph)."""
        task_sums = self._task_sums(masked_losses) if separate_tasks else None
        stacked = type(masked_losses) is StackedLosses and masked_losses.names == self.names
        if task_sums is None and stacked:
            numerators, denominators = self._stacked_sums(masked_losses)  # type: ignore[arg-type]
        else:
            numerators, denominators = self._local_statistics(masked_losses, task_sums)
        across_ranks = self.across_ranks
        if across_ranks is None:
            across_ranks = distributed.is_distributed()
        if not across_ranks:
            denominators = self._global_denominators(denominators)
            scale = denominators.clamp(min=1).reciprocal()
            return GlobalTaskLosses(
                self.names,
                numerators.detach(),
                denominators,
                local_sums=numerators,
                term_scale=scale,
                task_terms=self._task_terms(task_sums, scale),
            )
        num_tasks = len(self.names)
        stats_dtype = distributed.stats_dtype(numerators.device)
        nonfinite = ~finite(numerators.detach())
        stats = torch.cat(
            [
                numerators.detach().to(stats_dtype),
                denominators.to(stats_dtype),
                nonfinite.to(stats_dtype) * distributed.rank_bit(distributed.rank()),
            ]
        )
        stats = distributed.all_reduce_sum(stats)
        counts = self._global_denominators(stats[num_tasks : 2 * num_tasks])
        scale = (distributed.world_size() / counts.clamp(min=1)).to(numerators.dtype)
        return GlobalTaskLosses(
            self.names,
            numerators=stats[:num_tasks],
            counts=counts,
            local_sums=numerators,
            term_scale=scale,
            nonfinite_ranks=stats[2 * num_tasks :],
            task_terms=self._task_terms(task_sums, scale),
        )

    def drop_tasks(
        self, step: GlobalTaskLosses, masked_losses: Mapping[str, MaskedLoss], drop: Tensor
    ) -> GlobalTaskLosses:
        """``step`` without the tasks flagged in ``drop`` (same on every rank): they become
        invalid, and the local terms are rebuilt with zeros in place of their values, so that no
        gradient, not even a zero one times an infinite derivative, flows back through them."""
        flags = drop.tolist()
        kept = {
            name: MaskedLoss(torch.zeros_like(loss.values), torch.zeros_like(loss.mask))
            if dropped
            else loss
            for (name, loss), dropped in zip(masked_losses.items(), flags, strict=True)
        }
        if isinstance(masked_losses, StackedLosses):  # the kept tasks share a node with them
            masked_losses.stop_gradients({task for task, dropped in enumerate(flags) if dropped})
        task_sums = self._task_sums(kept) if step.task_terms is not None else None
        numerators, _ = self._local_statistics(kept, task_sums)
        dropped = drop.to(step.counts.device)
        counts = torch.where(dropped, 0.0, step.counts)
        scale = (distributed.world_size() / counts.clamp(min=1)).to(numerators.dtype)
        return GlobalTaskLosses(
            self.names,
            numerators=torch.where(dropped, torch.nan, step._numerators),
            counts=counts,
            local_sums=numerators,
            term_scale=scale,
            nonfinite_ranks=step.nonfinite_ranks,
            task_terms=self._task_terms(task_sums, scale),
        )

    def _local_statistics(
        self, masked_losses: Mapping[str, MaskedLoss], task_sums: TaskSums | None = None
    ) -> tuple[Tensor, Tensor]:
        """This rank's numerators ``a_kr`` (with their graph) and denominators ``b_kr``, from the
        per-task sums or any mapping of per-task losses (``__call__`` sums stacked losses a group
        at a time itself)."""
        if task_sums is not None:
            return self._numerators_and_denominators(torch.stack(task_sums.sums), task_sums.counts)
        losses = [masked_losses[name] for name in self.names]
        values = [_masked_values(loss) for loss in losses]
        flat_values = torch.cat([v if v.ndim == 1 else v.reshape(-1) for v in values])
        flat_masks = torch.cat(
            [loss.mask for loss in losses]
            if all(v.ndim == 1 for v in values)
            else [loss.mask.reshape(-1) for loss in losses]
        )
        dtype = accumulation_dtype(flat_values.dtype)
        # index_add adds one value after another: in float32 a count stops at 2**24 and a sum
        # drifts (1e-4 at 2e7 values). Many values add in float64 (where the device has it).
        wide = flat_values.numel() > _FLOAT32_ADDS
        add_dtype = distributed.stats_dtype(flat_values.device) if wide else dtype
        segments = self._segments(values, flat_values.device)
        masked_values = in_dtype(flat_values, add_dtype)
        zeros = flat_values.new_zeros(len(self.names), dtype=add_dtype)
        local_sums = zeros.index_add(0, segments, masked_values)
        local_counts = zeros.index_add(0, segments, flat_masks.to(add_dtype))
        if wide:
            local_sums, local_counts = in_dtype(local_sums, dtype), in_dtype(local_counts, dtype)
        return self._numerators_and_denominators(local_sums, local_counts)

    def _task_sums(self, masked_losses: Mapping[str, MaskedLoss]) -> TaskSums:
        """Per task, the sum of its valid values (its own graph), and their counts."""
        sums, counts = [], []
        for name in self.names:
            loss = masked_losses[name]
            values = _masked_values(loss)
            sums.append(values.sum(dtype=accumulation_dtype(values.dtype)))
            counts.append(loss.mask.sum())
        return TaskSums(sums, torch.stack(counts).to(sums[0].dtype))

    def _task_terms(self, task_sums: TaskSums | None, scale: Tensor) -> tuple[Tensor, ...] | None:
        """The local terms rebuilt per task from each task's own sum: ``sum_k * scale_k`` (times
        ``1 / count_k`` for a ``rank_weighting="uniform"`` mean), each with a graph of its own."""
        if task_sums is None:
            return None
        factors = scale
        if self.rank_weighting == "uniform":
            is_mean = self._is_mean_on(scale)
            counts = task_sums.counts.to(scale.dtype)
            factors = torch.where(is_mean, 1 / counts.clamp(min=1), 1.0) * scale
        return tuple(
            total * factor for total, factor in zip(task_sums.sums, factors.unbind(), strict=True)
        )

    def _stacked_sums(self, stacked: StackedLosses) -> tuple[Tensor, Tensor]:
        """This rank's numerators and denominators from per-task sums and counts of valid values,
        a group at a time, in task order."""
        sums, counts = [], []
        for _, loss in stacked.groups:
            values = _masked_values(loss)
            per_task = tuple(range(1, values.ndim))  # all but the group's task dimension
            dtype = accumulation_dtype(values.dtype)
            sums.append(values.sum(per_task, dtype=dtype))
            counts.append(loss.mask.sum(per_task, dtype=dtype))
        if len(sums) == 1:
            local_sums, local_counts = sums[0], counts[0]
        else:  # cat promotes both to the dtype of the widest group
            order = self._task_order(stacked, sums[0].device)
            local_sums = torch.cat(sums).index_select(0, order)
            local_counts = torch.cat(counts).index_select(0, order)
        if self._plain_means:
            return local_sums, local_counts
        return self._numerators_and_denominators(local_sums, local_counts)

    def _task_order(self, stacked: StackedLosses, device: torch.device) -> Tensor:
        """Positions, in the groups' concatenation, of tasks 0 … K-1."""
        rows = tuple(row for group_rows, _ in stacked.groups for row in group_rows)

        def order() -> Tensor:
            positions = torch.empty(len(rows), dtype=torch.long)
            positions[torch.tensor(rows)] = torch.arange(len(rows))
            return positions.to(device)

        return self._cached(("order", rows, device), order)

    def _numerators_and_denominators(
        self, local_sums: Tensor, local_counts: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self._plain_means:
            return local_sums, local_counts
        if self.rank_weighting == "samples":  # sum tasks: see _global_denominators
            return local_sums, local_counts
        local_means = local_sums / local_counts.clamp(min=1)
        numerators = torch.where(self._is_mean_on(local_sums), local_means, local_sums)
        return numerators, (local_counts > 0).to(local_sums.dtype)

    def _global_denominators(self, counts: Tensor) -> Tensor:
        """The global denominators from the global counts: with ``rank_weighting="samples"`` a
        ``reduction="sum"`` task's is 1 once the global batch has a valid sample, else 0 (its loss
        is then NaN and the task invalid, as a mean's)."""
        if self._plain_means or self.rank_weighting == "uniform":
            return counts
        return torch.where(self._is_mean_on(counts), counts, (counts > 0).to(counts.dtype))

    def _segments(self, values: list[Tensor], device: torch.device) -> Tensor:
        """The task index of every element of the concatenated values."""
        sizes = tuple(v.numel() for v in values)
        return self._cached(
            ("segments", sizes, device),
            lambda: torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(
                device
            ),
        )

    def _is_mean_on(self, reference: Tensor) -> Tensor:
        """Which tasks average, as a bool tensor on ``reference``'s device."""
        device = reference.device
        return self._cached(("is_mean", device), lambda: torch.tensor(self._is_mean, device=device))

    def _cached(self, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        """The small constant tensor ``make()`` of ``key``, made once. Not an inference tensor
        when first made in evaluation (``torch.inference_mode``): training saves it for backward."""
        tensor = self._cache.get(key)
        if tensor is None:
            if len(self._cache) > 64:  # batch sizes vary (a last short batch): keep it bounded
                self._cache.clear()
            with torch.inference_mode(False):
                tensor = self._cache[key] = make()
        return tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and counts of per-sample losses accumulate in: ``dtype``, at least float32."""
    return torch.promote_types(dtype, torch.float32)


def in_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)`` without a dispatch when it is in ``dtype`` already."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def on_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor.to(device)`` without a dispatch when it is on ``device`` already."""
    return tensor if tensor.device == device else tensor.to(device)


def _masked_values(loss: MaskedLoss) -> Tensor:
    """The values with 0 wherever the mask is False (a :class:`ZeroMaskedLoss` has them already:
    no operation), but NaN where a value with a gradient is not finite: its gradient, 0 times its
    derivative, would be NaN however it were masked, so its task's loss is non-finite, for the
    ``nonfinite`` policy (a ``(values, mask)`` loss computed on the NaN of a missing label)."""
    if type(loss) is ZeroMaskedLoss:
        return loss.values
    if loss.values.requires_grad:  # NaN * False is NaN; its gradient is the mask, as where's
        return loss.values * loss.mask
    return torch.where(loss.mask, loss.values, 0.0)


def _global_losses(numerators: Tensor, counts: Tensor, dtype: torch.dtype) -> Tensor:
    """``numerators / counts``: NaN exactly for a task without a valid sample, whose numerator is
    a sum of nothing, 0, over a count of 0 (a dropped task's numerator is NaN)."""
    return in_dtype(numerators / counts, dtype)


def _rank_zero_bits(read: Callable[[], list[float]]) -> list[float]:
    """One process's bit-sets from its task losses: rank 0 (bit value 1) is the only rank."""
    losses = read()
    if all(map(math.isfinite, losses)):  # no Python frame per task in the usual case
        return [0.0] * len(losses)
    return [0.0 if math.isfinite(value) else 1.0 for value in losses]


def finite(values: Tensor) -> Tensor:
    """``torch.isfinite(values)`` in two cheap operations (``isfinite`` is a composite of four):
    ``x - x`` is 0 exactly for a finite ``x``, NaN for a NaN or an infinite one."""
    return (values - values) == 0


def global_task_losses(
    masked_losses: Mapping[str, MaskedLoss],
    tasks: Mapping[str, Task],
    rank_weighting: RankWeighting = "samples",
    separate_tasks: bool = False,
) -> GlobalTaskLosses:
    """Reduce the per-sample losses of every task over all ranks with ONE all-reduce
    (``separate_tasks``: also build ``task_terms``, see :class:`GlobalTaskLosses`)."""
    return TaskLossReducer(tasks, rank_weighting)(masked_losses, separate_tasks)
