"""``RLW``: Random Loss Weighting, fresh random weights at every optimizer step."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg import distributed
from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks._checks import check_int_at_least, require_multitask
from lightning_lossagg.functional.rlw import rlw
from lightning_lossagg.mixin import MultiTaskMixin
from lightning_lossagg.weighting import WeightingCallback

_MASK64 = 2**64 - 1
DRAW_BLOCK = 256  # optimizer steps whose weights are drawn at once


def step_seed(seed: int, global_step: int) -> int:
    """A 32-bit seed for one step: SplitMix64 of the pair, so nearby pairs give unrelated draws.

    (The CPU generator keeps only the low 32 bits of a seed: ``seed * 2**32 + step`` would
    collide.)
    """
    value = (seed * 0x9E3779B97F4A7C15 + global_step) & _MASK64
    for _ in range(2):
        value = (value + 0x9E3779B97F4A7C15) & _MASK64
        value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
        value ^= value >> 31
    return value & 0xFFFFFFFF


class RLW(WeightingCallback):
    r"""Random Loss Weighting (Lin et al., 2022).

    `Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning
    <https://arxiv.org/abs/2111.10603>`_ (TMLR 2022), normal distribution:

    .. math::
        z \sim \mathcal{N}(0, I_K), \qquad w = \operatorname{softmax}(z).

    The weights sum to 1 (LibMTL's ``RLW`` and torchjd's ``Random`` scale). Each optimizer step has
    its own (the micro-batches of one accumulated step share them): row ``global_step % 256`` of
    256 vectors drawn at once from a CPU ``torch.Generator`` seeded from
    ``(seed, global_step // 256)`` and moved to the device once, never from the global generator:
    every rank draws the same weights without a collective, a resumed run draws exactly the
    weights of an uninterrupted one, and the model's own randomness (dropout, shuffling) is not
    disturbed. A step costs one indexing. The state is the seed.

    Args:
        seed: an int >= 0; runs with the same seed draw the same weight sequence.

    Example:
        >>> callback = RLW(seed=0)
    """

    finite_weights = True  # a softmax
    state_is_per_task = False  # the seed

    def __init__(self, seed: int = 0) -> None:
        self.seed = check_int_at_least("seed", seed, 0, "Pass e.g. seed=0.")
        self._generator = torch.Generator()
        self._num_tasks = 0
        # The drawn block: ((block index, device, dtype), its weights [DRAW_BLOCK, K]).
        self._drawn: tuple[tuple, Tensor] | None = None

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        num_tasks = len(require_multitask(self, pl_module))
        if num_tasks != self._num_tasks:  # an instance used again for another model
            self._num_tasks, self._drawn = num_tasks, None

    @override
    def task_weights(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        block, row = divmod(pl_module.trainer.global_step, DRAW_BLOCK)
        terms = step.local_sums  # its dtype and device: the losses themselves are not needed
        dtype = torch.promote_types(terms.dtype, torch.float32)
        key = (block, terms.device, dtype)
        if self._drawn is None or self._drawn[0] != key:
            self._generator.manual_seed(step_seed(self.seed, block))
            drawn = rlw(self._num_tasks, self._generator, dtype=dtype, draws=DRAW_BLOCK)
            self._drawn = (key, distributed.to_device(drawn, terms, dtype))
        return self._drawn[1][row]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
        self._drawn = None
