"""``UncertaintyWeighting``: task losses weighted by learned homoscedastic uncertainty."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
from typing_extensions import override

from lightning_lossagg.callbacks._checks import check_task_names
from lightning_lossagg.callbacks._learned_scales import LearnedScalesWeighting


class UncertaintyWeighting(LearnedScalesWeighting):
    r"""Uncertainty weighting (Kendall et al., 2018), with learned log-variances.

    `Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry and Semantics
    <https://arxiv.org/abs/1705.07115>`_ (CVPR 2018). Each task has a
    log-variance :math:`s_k = \log \sigma_k^2`, zero at the start (weights :math:`c_k`, as
    torchjd's ``UW``; LibMTL starts from :math:`s_k = -0.5`), and the objective

    .. math::
        \mathcal{L} = \sum_k c_k e^{-s_k} L_k + \tfrac{1}{2} s_k, \qquad
        w_k = c_k e^{-s_k}, \qquad
        \frac{\partial \mathcal{L}}{\partial s_k} = \tfrac{1}{2} - w_k L_k,

    with :math:`c_k = \tfrac12` (LibMTL's general form; the paper's Gaussian likelihood)
    or :math:`c_k = 1` for the tasks in ``classification_tasks`` (the paper's softmax likelihood).
    The model follows :math:`\sum_k w_k \nabla L_k`; the log-variances
    follow :math:`\nabla_s \mathcal{L}` on the step's global losses (averaged over accumulated
    micro-batches), with their own Adam on the host (float64: ``K`` numbers), once per
    optimizer step of the model. At the optimum :math:`e^{s_k} = 2 c_k L_k`: a regression task's
    learned variance is its loss, its MSE. :math:`s_k` stays within :math:`\pm 30` (an
    optimum :math:`e^{s_k} = 2 c_k L_k` between 1e-13 and 1e13 is unaffected): a task whose loss
    stays at 0 would drive it for ever.

    The log-variances live in this callback, not in the model: the model's ``state_dict`` does not
    change and its checkpoints load without the callback. They, Adam's state and the losses of a
    pending accumulation are in this callback's ``state_dict``. Logged as
    ``train/log_var/<task>``.

    Args:
        lr: Adam's learning rate for the log-variances.
        classification_tasks: the tasks with :math:`c_k = 1`.

    Example:
        >>> callback = UncertaintyWeighting(lr=0.01, classification_tasks=["species"])
    """

    state_name = "log_var"

    def __init__(self, lr: float = 1e-2, classification_tasks: Sequence[str] = ()) -> None:
        super().__init__(lr)
        if (
            isinstance(classification_tasks, str)
            or not isinstance(classification_tasks, Sequence)
            or not all(isinstance(name, str) for name in classification_tasks)
        ):
            raise ValueError(
                "`classification_tasks` must be a list of task names, e.g. ['species']; got "
                f"{classification_tasks!r}."
            )
        self.classification_tasks = tuple(classification_tasks)
        self._factors: list[float] = []

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        # Sorted: the same tasks in another order are the same method, with the same state.
        return {"lr": self.lr, "classification_tasks": sorted(self.classification_tasks)}

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Checkpoints written before the key was sorted key the state by the tasks as given.
        states = checkpoint.get("callbacks", {})
        as_given = self._generate_state_key(
            lr=self.lr, classification_tasks=list(self.classification_tasks)
        )
        if self.state_key not in states and as_given in states:
            states[self.state_key] = states.pop(as_given)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        task_names: tuple[str, ...] = pl_module.task_names  # type: ignore[assignment]
        check_task_names("classification_tasks", self.classification_tasks, task_names)
        # c_k: 1 for a classification task, 1/2 (the general form) for the others.
        self._factors = [1.0 if name in self.classification_tasks else 0.5 for name in task_names]

    @override
    def _weight(self, task: int, scale: float) -> float:
        return self._factors[task] * math.exp(-scale)  # uncertainty_weights: c_k e^(-s_k)

    @override
    def _derivative(self, weight: float, loss: float) -> float:
        # d/ds_k of uncertainty_objective: 1/2 - c_k e^(-s_k) L_k = 1/2 - w_k L_k.
        return 0.5 - weight * loss
