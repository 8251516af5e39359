"""``NashMTL``: the Nash bargaining solution between the tasks (LibMTL's update)."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks._checks import (
    check_int_at_least,
    check_non_negative,
    require_multitask,
)
from lightning_lossagg.callbacks.gradient_weighting import GradientWeighting, Sync
from lightning_lossagg.functional._qp import symmetric_matrix
from lightning_lossagg.functional.nash_mtl import MAX_ITER, nash_mtl_weights
from lightning_lossagg.mixin import MultiTaskMixin


class NashMTL(GradientWeighting):
    r"""Nash-MTL (Navon et al., 2022), with LibMTL's update and gradient clipping.

    `Multi-Task Learning as a Bargaining Game <https://arxiv.org/abs/2202.01017>`_ (ICML 2022).
    Every ``update_weights_every`` optimizer steps the weights solve the bargaining problem on the
    global Gramian (:func:`~lightning_lossagg.functional.nash_mtl`, Newton warm-started from the
    previous solution):

    .. math::
        \alpha_k\,(G\alpha)_k = 1 \quad (\alpha \succ 0), \qquad
        \text{objective } \sum_k \alpha_k L_k, \qquad
        \theta_{\text{shared}}.\text{grad} \leftarrow
            \text{clip}\big(\textstyle\sum_k \alpha_k g_k,\ \texttt{max\_norm}\big);

    in between, the last :math:`\alpha` is reused and no per-task gradient is taken at all.

    Update: LibMTL's, which differs from the other gradient methods' on the heads. The gradient
    is that of the weighted sum :math:`\sum_k \alpha_k L_k` (times ``Task.weight``), so the heads
    get :math:`\alpha_k`-weighted gradients too (on a solving step through the base's surrogate,
    with no second backward, or, solving at every step with ``nn.Linear`` heads and
    ``rep_grad=True``, inside the one backward, where the heads' node scales their gradients; in
    between, the plain weighted sum); then, before every optimizer
    step, the global (DDP-averaged, accumulated) gradient of the shared parameters is clipped to
    norm ``max_norm`` with ``torch.nn.utils.clip_grad_norm_``, exactly LibMTL's call (the heads
    are not clipped).
    torchjd's ``NashMTL`` instead gives each head its own task's unweighted gradient and does not
    clip. Scale: LibMTL's and torchjd's, :math:`\lVert \sum_k \alpha_k g_k\rVert = \sqrt K`
    before clipping; the weights recorded are the unclipped :math:`\alpha` (times
    ``Task.weight``), as LibMTL returns them.

    LibMTL refuses representation gradients; ``rep_grad=True`` works here (the Gramian of the
    gradients at the shared representation; the clipping stays on the shared parameters).
    LibMTL counts backward calls for ``update_weights_every``; here it counts optimizer steps
    (``trainer.global_step``), so every micro-batch of an update step is solved (each from the
    previous solution) and a resumed run keeps the schedule.

    State: the previous solution :math:`\alpha` (ones before the first), the warm start and the
    weights reused in between. A task without a valid sample in a step keeps its previous value.
    It is saved in this callback's ``state_dict``.

    Args:
        update_weights_every: solve every this many optimizer steps (LibMTL: 1), an int >= 1.
        max_norm: clip the shared gradient to this norm; 0 disables clipping (LibMTL: 1.0).
        rep_grad: take gradients at the shared representation.
        sync: with parameter gradients under DDP, ``"gradients"`` (exact) or ``"gramian"``.

    Example:
        >>> callback = NashMTL(update_weights_every=1, max_norm=1.0)
    """

    # The heads take the weights too (LibMTL's update): they are known before backward, or
    # (solving at every step, with linear heads in one node) scale the heads' gradients there.
    weighs_heads = True

    def __init__(
        self,
        update_weights_every: int = 1,
        max_norm: float = 1.0,
        rep_grad: bool = False,
        sync: Sync = "gradients",
    ) -> None:
        super().__init__(rep_grad=rep_grad, sync=sync)
        self.update_weights_every = check_int_at_least(
            "update_weights_every", update_weights_every, 1, "LibMTL's default is 1."
        )
        # Weighing in backward solves at every step.
        self.may_weigh_in_backward = self.update_weights_every == 1  # type: ignore[misc]
        self.max_norm = check_non_negative(
            "max_norm", max_norm, "0 disables clipping; LibMTL: 1.0."
        )
        self._num_tasks = 0
        self._previous: Tensor | None = None

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {
            "update_weights_every": self.update_weights_every,
            "max_norm": self.max_norm,
            **super().method_arguments,
        }

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._num_tasks = len(require_multitask(self, pl_module))
        if self.max_norm > 0:
            pl_module.shared_parameters()  # type: ignore[operator]  # fails early with the fix
        self._check_previous(self._previous)

    @override
    def task_weights(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        due = pl_module.trainer.global_step % self.update_weights_every == 0
        if due or self._previous is None:
            return super().task_weights(pl_module, step)
        self._gramian = None  # no Gramian this step: nothing to log of it
        return self._previous.to(step.local_sums.device, step.dtype)

    @override
    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        assert self.valid_tasks is not None
        # In NumPy: torch's boolean indexing costs several times the solve's own steps here.
        previous = np.ones(self._num_tasks) if self._previous is None else self._previous.numpy()
        valid = self.valid_tasks.numpy()
        start = previous[valid]
        matrix = symmetric_matrix(gramian)
        weights = nash_mtl_weights(matrix, start, 0.0, MAX_ITER, self.gramian_eps)
        updated = previous.copy()
        updated[valid] = weights
        self._previous = torch.from_numpy(updated)
        return torch.from_numpy(weights)

    @override
    def backward_objective(
        self, pl_module: MultiTaskMixin, step: GlobalTaskLosses, weights: Tensor, static: Tensor
    ) -> Tensor:
        if self._jacobian is not None:
            # A solving step: the base's surrogate (d on the shared part, no second backward),
            # with the weights in place of Task.weight on the heads, as LibMTL weighs them.
            return super().backward_objective(pl_module, step, weights, weights)
        return self.weighted_sum_objective(pl_module, step, weights)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.max_norm > 0:
            shared = pl_module.shared_parameters()  # type: ignore[operator]
            torch.nn.utils.clip_grad_norm_(shared, self.max_norm)

    @override
    def step_state(self) -> Tensor | None:
        return self._previous  # replaced, never changed in place

    @override
    def put_back_step_state(self, state: Tensor | None) -> None:
        self._previous = state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"previous": None if self._previous is None else self._previous.clone()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        previous = state_dict["previous"]
        self._check_previous(previous)
        self._previous = None if previous is None else previous.to("cpu", torch.float64)

    def _check_previous(self, previous: Tensor | None) -> None:
        if previous is not None and self._num_tasks and previous.shape != (self._num_tasks,):
            raise ValueError(
                f"This NashMTL holds {len(previous)} previous weights for a model with "
                f"{self._num_tasks} tasks: they belong to another model. Resume the same model, "
                "or create a new NashMTL."
            )
