"""Exact global task losses from per-sample losses on every rank, with one all-reduce.

Per task ``k`` every rank ``r`` holds a numerator ``a_kr`` and a denominator ``b_kr``:

* ``rank_weighting="samples"``: ``a_kr`` = the sum of the valid per-sample losses, ``b_kr`` = their
  count (``reduction="sum"``: ``b_kr`` = 1 on rank 0 and 0 elsewhere);
* ``rank_weighting="uniform"``: ``a_kr`` = the rank's own mean (or sum), ``b_kr`` = 1 when the rank
  has a valid sample of the task, so every such rank has an equal say.

The global loss is :math:`L_k = \\sum_r a_{kr} / \\sum_r b_{kr}`. Each rank hands backward the
local term :math:`t_{kr} = W a_{kr} / \\sum_r b_{kr}`; DDP averages gradients over the ``W`` ranks,
so the gradient it applies is :math:`\\frac1W\\sum_r \\nabla t_{kr} = \\nabla L_k`, exactly, for
uneven batches, partly labelled batches and ranks without a valid sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from lightning_lossagg import distributed
from lightning_lossagg.tasks import MaskedLoss, Task

RankWeighting = Literal["samples", "uniform"]


@dataclass(frozen=True)
class GlobalTaskLosses:
    """The global figures of one step, identical on every rank (but ``local_terms``).

    Attributes:
        names: the task names, in the model's order.
        losses: global task losses ``L_k`` (detached; NaN where no rank had a valid sample).
        counts: global denominators: valid samples (``"samples"``), or ranks with a valid sample
            (``"uniform"``); the weight of this step in an epoch mean.
        valid: whether task ``k`` had a valid sample anywhere in the global batch.
        local_terms: this rank's terms ``t_k`` with their graph: DDP's averaged gradient of
            ``t_k`` is the gradient of ``L_k``. The objective handed to backward is
            ``sum_k w_k t_k``.
        nonfinite_ranks: per task, the summed bit-set of ranks whose local loss was not finite.
    """

    names: tuple[str, ...]
    losses: Tensor
    counts: Tensor
    valid: Tensor
    local_terms: Tensor
    nonfinite_ranks: Tensor


class TaskLossReducer:
    """Reduces every task's per-sample losses over all ranks with ONE all-reduce per call.

    The work per step is a fixed number of tensor operations whatever the number of tasks: the
    tasks' values are concatenated and summed per task with one ``index_add``. The small per-task
    constants are built once per device and shape and reused.
    """

    def __init__(self, tasks: Mapping[str, Task], rank_weighting: RankWeighting = "samples"):
        if rank_weighting not in ("samples", "uniform"):
            raise ValueError(
                f"rank_weighting must be 'samples' or 'uniform', got {rank_weighting!r}."
            )
        self.names = tuple(tasks)
        self.rank_weighting = rank_weighting
        self._is_mean = [task.reduction == "mean" for task in tasks.values()]
        self._cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    def __call__(self, masked_losses: Mapping[str, MaskedLoss]) -> GlobalTaskLosses:
        numerators, denominators, local_sums = self._local_statistics(masked_losses)
        num_tasks, dtype = len(self.names), numerators.dtype
        stats_dtype = distributed.stats_dtype(numerators.device)
        nonfinite = ~torch.isfinite(local_sums.detach())
        stats = torch.cat(
            [
                numerators.detach().to(stats_dtype),
                denominators.to(stats_dtype),
                nonfinite.to(stats_dtype) * distributed.rank_bit(distributed.rank()),
            ]
        )
        stats = distributed.all_reduce_sum(stats)
        global_numerators, global_denominators = stats[:num_tasks], stats[num_tasks : 2 * num_tasks]
        valid = global_denominators > 0
        one = torch.ones((), dtype=stats_dtype, device=stats.device)
        losses = torch.where(
            valid, global_numerators / torch.where(valid, global_denominators, one), torch.nan
        )
        return GlobalTaskLosses(
            names=self.names,
            losses=losses.to(dtype),
            counts=global_denominators,
            valid=valid,
            local_terms=numerators * self._scale(global_denominators, valid).to(dtype),
            nonfinite_ranks=stats[2 * num_tasks :],
        )

    def drop_tasks(
        self, step: GlobalTaskLosses, masked_losses: Mapping[str, MaskedLoss], drop: Tensor
    ) -> GlobalTaskLosses:
        """``step`` without the tasks flagged in ``drop`` (same on every rank): they become
        invalid, and the local terms are rebuilt from their values DETACHED, so that no gradient,
        not even a zero one times an infinite derivative, flows back through them."""
        kept = {
            name: MaskedLoss(loss.values.detach(), torch.zeros_like(loss.mask)) if dropped else loss
            for (name, loss), dropped in zip(masked_losses.items(), drop.tolist(), strict=True)
        }
        numerators, _, _ = self._local_statistics(kept)
        valid = step.valid & ~drop.to(step.valid.device)
        scale = self._scale(step.counts, valid).to(numerators.dtype)
        return replace(
            step,
            losses=torch.where(valid, step.losses, torch.nan),
            counts=torch.where(valid, step.counts, 0.0),
            valid=valid,
            local_terms=numerators * scale,
        )

    @staticmethod
    def _scale(global_denominators: Tensor, valid: Tensor) -> Tensor:
        """W / sum_r b_kr: DDP's averaged gradient of ``a_k * scale_k`` is that of ``L_k``."""
        safe = torch.where(valid, global_denominators, torch.ones_like(global_denominators))
        return torch.where(valid, distributed.world_size() / safe, 0.0)

    def _local_statistics(
        self, masked_losses: Mapping[str, MaskedLoss]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's numerators (with their graph), denominators and valid-sample sums."""
        values = [masked_losses[name].values for name in self.names]
        masks = [masked_losses[name].mask for name in self.names]
        flat_values = torch.cat([v.reshape(-1) for v in values])
        dtype = flat_values.dtype
        segments, is_mean, sum_denominators = self._constants(
            values, flat_values, distributed.rank()
        )
        flat_masks = torch.cat([m.reshape(-1) for m in masks])
        masked_values = torch.where(flat_masks, flat_values, torch.zeros((), dtype=dtype))
        num_tasks = len(self.names)
        local_sums = flat_values.new_zeros(num_tasks).index_add(0, segments, masked_values)
        local_counts = flat_values.new_zeros(num_tasks).index_add(0, segments, flat_masks.to(dtype))
        if self.rank_weighting == "uniform":
            local_means = local_sums / local_counts.clamp(min=1)
            numerators = torch.where(is_mean, local_means, local_sums)
            denominators = (local_counts > 0).to(dtype)
        else:
            numerators = local_sums
            # A global sum: rank 0 alone contributes the denominator 1, exactly.
            denominators = torch.where(is_mean, local_counts, sum_denominators)
        return numerators, denominators, local_sums

    def _constants(
        self, values: list[Tensor], flat_values: Tensor, this_rank: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Segment ids of the concatenated values, the mean-reduction mask, sum denominators."""
        sizes = tuple(v.numel() for v in values)
        key = (sizes, flat_values.device, flat_values.dtype, this_rank)
        if key not in self._cache:
            device = flat_values.device
            segments = torch.repeat_interleave(
                torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long)
            ).to(device)
            is_mean = torch.tensor(self._is_mean, device=device)
            sum_denominators = torch.full(
                (len(sizes),), float(this_rank == 0), dtype=flat_values.dtype, device=device
            )
            if len(self._cache) > 64:  # batch sizes vary (a last short batch): keep it bounded
                self._cache.clear()
            self._cache[key] = (segments, is_mean, sum_denominators)
        return self._cache[key]


def global_task_losses(
    masked_losses: Mapping[str, MaskedLoss],
    tasks: Mapping[str, Task],
    rank_weighting: RankWeighting = "samples",
) -> GlobalTaskLosses:
    """Reduce the per-sample losses of every task over all ranks with ONE all-reduce."""
    return TaskLossReducer(tasks, rank_weighting)(masked_losses)
