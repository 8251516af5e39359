"""An evaluation set padded for DDP with samples whose every label is missing, so that
Lightning's ``DistributedSampler`` repeats no sample and the evaluation figures stay exact."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_lossagg.tasks import Task


class PaddedForRanks(Dataset):
    """``dataset`` padded to a multiple of ``num_ranks`` samples with samples that count for
    nothing: the first sample's inputs with every target marked missing (NaN for a float
    target, ``ignore_index`` for a class target).

    Under DDP, Lightning's ``DistributedSampler`` gives every rank as many samples by repeating
    a few when the set does not divide by the number of ranks, and the repeated ones count twice
    in the ``val/`` and ``test/`` figures. Padded, the set divides: nothing repeats, every rank
    has as many batches, and the global figures are those of one process on the whole set.

    Args:
        dataset: a map-style dataset of ``(inputs, {task: target})`` pairs (the mixin's default
            batch layout).
        num_ranks: the number of ranks, ``trainer.world_size``.
        ignore_index: the class target that marks a missing label: one for every task, or one
            per task name (tasks left out take -100, ``Task``'s default).

    Example:
        >>> data = [(torch.ones(2), {"kind": torch.tensor(1), "price": torch.tensor(3.0)})] * 3
        >>> padded = PaddedForRanks(data, num_ranks=2)
        >>> len(padded), padded[3][1]
        (4, {'kind': tensor(-100), 'price': tensor(nan)})
    """

    def __init__(
        self,
        dataset: Any,
        num_ranks: int,
        ignore_index: int | Mapping[str, int] = Task.ignore_index,
    ) -> None:
        if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 1:
            raise ValueError(
                f"`num_ranks` must be an int >= 1; got {num_ranks!r}. Give trainer.world_size."
            )
        self.dataset, self.ignore_index = dataset, ignore_index
        self.num_samples = len(dataset)
        self.num_padded = math.ceil(self.num_samples / num_ranks) * num_ranks

    def __len__(self) -> int:
        return self.num_padded

    def __getitem__(self, index: int) -> Any:
        if index < 0:
            index += self.num_padded
        if not 0 <= index < self.num_padded:
            raise IndexError(f"index {index} out of range for {self.num_padded} samples")
        if index < self.num_samples:
            return self.dataset[index]
        item = self.dataset[0]
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict)):
            raise TypeError(
                "PaddedForRanks pads (inputs, {task: target}) pairs; the dataset's first item "
                f"is a {type(item).__name__}. Mark a padding sample's labels missing in a "
                "dataset of your own instead."
            )
        inputs, targets = item
        return inputs, {name: self._missing(name, target) for name, target in targets.items()}

    def _missing(self, task: str, target: Any) -> Tensor:
        """``target`` with every label marked missing."""
        if not isinstance(target, Tensor):
            target = torch.as_tensor(target)
        if target.is_floating_point():
            return torch.full_like(target, math.nan)
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(
                f"Task {task!r}: a padding sample's label is marked missing with NaN (float "
                f"targets) or ignore_index (class targets); its target is {target.dtype}. "
                "Give float or integer targets."
            )
        ignore_index = self.ignore_index
        if isinstance(ignore_index, Mapping):
            ignore_index = ignore_index.get(task, Task.ignore_index)
        return torch.full_like(target, ignore_index)
