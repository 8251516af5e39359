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
from dataclasses import dataclass
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


def global_task_losses(
    masked_losses: Mapping[str, MaskedLoss],
    tasks: Mapping[str, Task],
    rank_weighting: RankWeighting = "samples",
) -> GlobalTaskLosses:
    """Reduce the per-sample losses of every task over all ranks with ONE all-reduce."""
    names = tuple(tasks)
    world_size, this_rank = distributed.world_size(), distributed.rank()
    numerators, denominators, nonfinite = [], [], []
    for name in names:
        values, mask = masked_losses[name]
        local_sum = torch.where(mask, values, torch.zeros_like(values)).sum()
        local_count = mask.sum().to(local_sum.dtype)
        if rank_weighting == "uniform":
            numerator = local_sum
            if tasks[name].reduction == "mean":
                numerator = local_sum / local_count.clamp(min=1)
            denominator = (local_count > 0).to(local_sum.dtype)
        elif tasks[name].reduction == "mean":
            numerator, denominator = local_sum, local_count
        else:
            # A global sum: rank 0 alone contributes the denominator 1, exactly.
            numerator = local_sum
            denominator = torch.full_like(local_sum, float(this_rank == 0))
        numerators.append(numerator)
        denominators.append(denominator)
        nonfinite.append(~torch.isfinite(local_sum))

    local_numerators = torch.stack(numerators)
    dtype = distributed.stats_dtype(local_numerators.device)
    rank_bit = distributed.rank_bit(this_rank)
    stats = torch.cat(
        [
            local_numerators.detach().to(dtype),
            torch.stack(denominators).detach().to(dtype),
            torch.stack(nonfinite).to(dtype) * rank_bit,
        ]
    )
    stats = distributed.all_reduce_sum(stats)
    num_tasks = len(names)
    global_numerators, global_denominators = stats[:num_tasks], stats[num_tasks : 2 * num_tasks]
    valid = global_denominators > 0
    safe_denominators = torch.where(valid, global_denominators, torch.ones_like(stats[:1]))
    losses = torch.where(valid, global_numerators / safe_denominators, torch.nan)
    scale = torch.where(valid, world_size / safe_denominators, torch.zeros_like(stats[:1]))
    local_terms = local_numerators * scale.to(local_numerators.dtype)
    return GlobalTaskLosses(
        names=names,
        losses=losses.to(local_numerators.dtype),
        counts=global_denominators,
        valid=valid,
        local_terms=local_terms,
        nonfinite_ranks=stats[2 * num_tasks :],
    )
