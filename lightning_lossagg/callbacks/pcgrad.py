"""``PCGrad``: project each task gradient off the task gradients it conflicts with."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks._checks import check_int_at_least
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting, Sync
from lightning_lossagg.callbacks.rlw import step_seed
from lightning_lossagg.functional._qp import symmetric_matrix
from lightning_lossagg.functional.pcgrad import pcgrad_weights
from lightning_lossagg.mixin import MultiTaskMixin


class PCGrad(GradientWeighting):
    r"""Projecting Conflicting Gradients (Yu et al., 2020).

    `Gradient Surgery for Multi-Task Learning <https://arxiv.org/abs/2001.06782>`_ (NeurIPS
    2020). For each task :math:`i`, visiting the other tasks :math:`j` in a random order:

    .. math::
        \text{if } \langle g_i^{PC}, g_j \rangle < 0:\quad
        g_i^{PC} \leftarrow g_i^{PC}
            - \frac{\langle g_i^{PC}, g_j \rangle}{\lVert g_j \rVert^2}\, g_j,
        \qquad d = \sum_i g_i^{PC} = \sum_k w_k g_k,

    the weights :math:`w` of :func:`~lightning_lossagg.functional.pcgrad`, computed from the
    global Gramian; each head follows its own task's gradient; ``Task.weight`` multiplies
    :math:`w`.

    Scale: the sum of the projected gradients (LibMTL, the paper, torchjd): all weights 1 when no
    pair conflicts. A task never projects onto itself (torchjd; LibMTL's shuffled loop visits
    :math:`j = i` too, which matters only when a projected gradient comes to conflict with its
    own task's). LibMTL refuses representation gradients; ``rep_grad=True`` works here.

    The orders are drawn from a CPU ``torch.Generator`` seeded from ``(seed, global_step)``, not
    from the global generator: every rank draws the same orders without a collective, a resumed
    run draws those of an uninterrupted one, the micro-batches of one accumulated step share
    them, and the model's own randomness is not disturbed. The state is the seed.

    Args:
        seed: an int >= 0 for the random projection orders.
        rep_grad: take gradients at the shared representation.
        sync: with parameter gradients under DDP, ``"gradients"`` (exact) or ``"gramian"``.

    Example:
        >>> callback = PCGrad(seed=0)
    """

    state_is_per_task = False  # the seed

    def __init__(self, seed: int = 0, rep_grad: bool = False, sync: Sync = "gradients") -> None:
        super().__init__(rep_grad=rep_grad, sync=sync)
        self.seed = check_int_at_least("seed", seed, 0, "Pass e.g. seed=0.")
        self._generator = torch.Generator()

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"seed": self.seed, **super().method_arguments}

    @override
    def prepare_step(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> None:
        self._generator.manual_seed(step_seed(self.seed, pl_module.trainer.global_step))

    @override
    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        return torch.from_numpy(pcgrad_weights(symmetric_matrix(gramian), self._generator))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = state_dict["seed"]
