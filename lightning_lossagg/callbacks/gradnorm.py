"""``GradNorm``: learned task weights that make the tasks' gradient norms train at one rate."""

from __future__ import annotations

from typing import Any, cast

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks._checks import (
    check_non_negative,
    check_positive,
    require_multitask,
    usable_tasks,
)
from lightning_lossagg.callbacks._task_parameters import TaskParameters
from lightning_lossagg.callbacks.gradient_weighting import (
    GradientWeighting,
    Sync,
    loss_scale,
    nan_gradient_unless_finite,
    task_jacobian,
)
from lightning_lossagg.mixin import MultiTaskMixin

# L(0), the optimizer step's gradient sum and count so far, and w (GradNorm.step_state).
_StepState = tuple[Tensor | None, Tensor | None, Tensor | None, dict[str, Tensor] | None]


class GradNorm(GradientWeighting):
    r"""GradNorm (Chen et al., 2018): weights that balance the tasks' gradient norms.

    `GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks
    <https://arxiv.org/abs/1711.02257>`_ (ICML 2018). The weights :math:`w` start at 1 and sum
    to :math:`K`. With :math:`n_k = \lVert \nabla_W L_k \rVert` the global gradient norm of
    task :math:`k` on the layer :math:`W`, :math:`\tilde L_k = L_k(t) / L_k(0)` its loss
    relative to its first global loss, and
    :math:`r_k = \tilde L_k / \operatorname{mean}_j \tilde L_j`:

    .. math::
        \mathcal{L}_{\text{grad}}(w) = \sum_k \Big| w_k n_k -
            \big[\operatorname{mean}_j (w_j n_j)\big] \, r_k^{\alpha} \Big|,

    the bracketed target held constant. The model trains on :math:`\sum_k w_k c_k L_k`
    (:math:`c_k` = ``Task.weight``), the paper's objective: the heads are weighted too (the
    default :meth:`WeightingCallback.backward_objective`, not the surrogate
    of :class:`GradientWeighting`). The norms are those of the raw losses, so ``Task.weight``
    stays a preference on top. Once per optimizer step of the model, :math:`w` takes one Adam step
    (its own optimizer, ``lr``)
    along :math:`\partial \mathcal{L}_{\text{grad}} / \partial w_k = \operatorname{sign}(w_k n_k -
    \text{target}_k)\, n_k` (averaged over accumulated micro-batches), then is clipped at 0
    (a negative weight would ascend its task's loss) and renormalised
    to :math:`\sum_k w_k = K`. The step uses the weights from before the update, as the paper
    and LibMTL do.

    The norms are the square roots of the diagonal of the global Gramian, built
    as :class:`GradientWeighting` builds it (one backward per task; exact under DDP with
    ``sync="gradients"``) but on the parameters of ``layer`` only: ``"last"`` (default, the
    paper's choice) is the last module, in registration order, holding shared parameters (all of
    its shared parameters, bias included; those that train, looked up again when they change, as
    under ``BackboneFinetuning``); ``"all"`` is every shared parameter (LibMTL's choice); any
    other string names a submodule (``"trunk.2"``) whose shared parameters are used. A step in
    which ``layer`` has no parameter that trains (a frozen trunk) has nothing to measure: the
    model follows ``Task.weight`` and :math:`w` does not move. With ``rep_grad=True`` the norms
    are taken at the whole shared representation instead, and ``layer`` is not used. A task
    takes part in an update from the first step in which it has a
    valid, finite, positive loss (that loss is its :math:`L_k(0)`: a first loss of exactly 0
    has no ratio, and the next one is taken); in a step without one it keeps its weight before
    renormalisation and its Adam moments.

    Differences from LibMTL: LibMTL parametrises :math:`w = K \operatorname{softmax}(s)`,
    trains :math:`s` with the model's own optimizer, uses equal weights during the first epoch
    and takes :math:`L_k(0)` as that epoch's mean loss; it leaves the heads unweighted; with
    representation gradients it sums them over the batch before taking norms. Here, as in the
    paper, :math:`w` is learned directly from the first step.

    The weights, :math:`L(0)`, Adam's state and the gradients of a pending accumulation are in
    this callback's ``state_dict``; the model's ``state_dict`` does not change. The weights a step
    used, before its update, are logged as ``train/learned_weight/<task>`` (``train/weight/<task>``
    is the same times the static ``Task.weight``), with the base's ``grad_norm`` and
    ``grad_cos``.

    Args:
        alpha: the restoring force :math:`\alpha \geq 0` (paper and LibMTL: 1.5).
        lr: Adam's learning rate for :math:`w` (LibMTL has none of its own: it uses the
            model's optimizer).
        layer: ``"last"``, ``"all"`` or the name of a submodule; see above.
        rep_grad: take the norms at the shared representation.
        sync: with parameter gradients under DDP, ``"gradients"`` (exact norms) or ``"gramian"``
            (the mean of the ranks' local squared norms).

    Example:
        >>> callback = GradNorm(alpha=1.5, lr=0.025, layer="last")
    """

    parameter_gradients_through_representation = False
    injects_head_gradients = False  # its objective runs through the heads
    may_weigh_in_backward = False

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        layer: str = "last",
        rep_grad: bool = False,
        sync: Sync = "gradients",
    ) -> None:
        super().__init__(rep_grad=rep_grad, sync=sync)
        alpha = check_non_negative("alpha", alpha, "The paper uses 1.5.")
        if not isinstance(layer, str) or not layer:
            raise ValueError(
                "`layer` must be 'last' (the last shared layer), 'all' (every shared parameter) "
                f"or the name of a submodule such as 'trunk.2'; got {layer!r}."
            )
        self.alpha = alpha
        self.lr = check_positive("lr", lr, "Use e.g. lr=0.025 for the weights' own Adam.")
        self.layer = layer
        self._weights = _UnitWeights(self.lr)
        self._weights_used: Tensor | None = None  # behind the latest step's weights, for the logs
        self._layer_module: str | None = None  # None: no module holds a shared parameter
        self._layer_of: tuple[int, ...] | None = None  # the shared parameters "last" was found in
        self._initial_losses: Tensor | None = None
        self._gradient_sum: Tensor | None = None
        self._gradient_count: Tensor | None = None
        # Under float16's loss scale: a shared parameter and the step's Gramian, for the guard
        # in backward_objective.
        self._overflow_check: tuple[Tensor, Tensor] | None = None

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "lr": self.lr, "layer": self.layer, **super().method_arguments}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        task_names = require_multitask(self, pl_module)
        self._weights.set_num_tasks(len(task_names), type(self).__name__)
        if not self.rep_grad and self.layer not in ("all", "last"):
            self._layer_module = _resolve_layer(pl_module, self.layer)
        self._layer_of = None  # "last" is looked up at the first step

    @override
    def task_weights(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        weights = self._weights.values(step.losses)
        self._overflow_check = None
        if self.rep_grad:
            gramian = self._representation_gramian(pl_module, step)
        else:
            parameters = self._layer_parameters(pl_module)
            if not parameters:  # a frozen trunk: nothing to measure, the model follows Task.weight
                self._weights_used = self._nothing_to_weigh(pl_module, step)
                return self._weights_used
            scale = loss_scale(pl_module, step.local_sums)
            _, gramian, _ = self._synced_gramian(task_jacobian(step, parameters, scale))
            if scale is not None:
                self._overflow_check = (parameters[0], gramian)
        self._gramian, self._gramian_valid = gramian.detach(), step.valid
        self._accumulate_gradient(weights.detach(), gramian.detach().diagonal(), step)
        self._weights_used = weights.detach().clone()  # the optimizer step rescales them in place
        return self._weights_used

    @override
    def backward_objective(
        self, pl_module: MultiTaskMixin, step: GlobalTaskLosses, weights: Tensor, static: Tensor
    ) -> Tensor:
        objective = step.weighted_sum(weights)
        if not self.rep_grad:
            check, self._overflow_check = self._overflow_check, None
            if check is not None:
                # The per-task gradients give only the norms: if they overflowed at the loss
                # scale, the step is skipped (and the scale lowered) as for the backward's own.
                objective = objective + nan_gradient_unless_finite(*check)
            return objective
        # The heads saw a detached copy of the representation: hand the trunk the objective's
        # representation gradient sum_k w_k c_k dt_k/drep through the attached one (both taken
        # by task_weights).
        jacobian, self._jacobian = self._jacobian, None
        shared = pl_module.shared_representation.output  # type: ignore[union-attr]
        pl_module.shared_representation = None
        direction = weights.to(jacobian.dtype) @ jacobian  # type: ignore[union-attr, operator]
        return objective + (shared * direction.view_as(shared).detach()).sum()

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        model = cast(MultiTaskMixin, pl_module)  # required at setup
        if self._gradient_sum is None or self._gradient_count is None:
            return
        if model.skipping_optimizer_step:
            self._gradient_sum = self._gradient_count = None  # the model does not move: nor w
            return
        taking_part = self._gradient_count > 0
        gradient = self._gradient_sum / self._gradient_count.clamp(min=1)
        self._weights.step(gradient, taking_part)
        weights = self._weights.parameter
        assert weights is not None
        with torch.no_grad():
            positive = weights.clamp(min=0)
            total = positive.sum().clamp(min=torch.finfo(positive.dtype).tiny)
            weights.copy_(len(positive) * positive / total)
        self._gradient_sum = self._gradient_count = None

    def _layer_parameters(self, pl_module: MultiTaskMixin) -> list[torch.nn.Parameter]:
        shared = pl_module.shared_parameters()
        if self.layer == "all":
            return shared
        shared_ids = {id(p) for p in shared}
        if self.layer == "last" and self._layer_of != (key := tuple(map(id, shared))):
            self._layer_of, self._layer_module = key, _last_layer(pl_module, shared_ids)
        if self._layer_module is None:
            return []
        module = pl_module.get_submodule(self._layer_module)
        return [p for p in module.parameters() if id(p) in shared_ids]

    def _accumulate_gradient(
        self, weights: Tensor, squared_norms: Tensor, step: GlobalTaskLosses
    ) -> None:
        """Add this step's :math:`\\nabla_w \\mathcal{L}_{\\text{grad}}` to the pending sum."""
        dtype, device = weights.dtype, weights.device
        norms = squared_norms.to(dtype).clamp(min=0).sqrt()
        usable = usable_tasks(step)
        losses = torch.where(usable, step.losses, torch.nan).to(dtype)
        initial = self._initial_losses
        if initial is None:
            initial = torch.full_like(losses, torch.nan)
        initial = initial.to(device, dtype)
        initial = torch.where(usable & (initial.isnan() | (initial == 0)), losses, initial)
        self._initial_losses = initial
        taking_part = usable & (initial > 0) & norms.isfinite()
        count = taking_part.sum().clamp(min=1)
        weighted_norms = torch.where(taking_part, weights * norms, 0.0)
        relative_losses = torch.where(taking_part, losses / initial, 0.0)
        mean_relative = (relative_losses.sum() / count).clamp(min=torch.finfo(dtype).tiny)
        targets = weighted_norms.sum() / count * (relative_losses / mean_relative) ** self.alpha
        gradient = torch.where(taking_part, torch.sign(weighted_norms - targets) * norms, 0.0)
        if self._gradient_sum is None or self._gradient_count is None:
            self._gradient_sum, self._gradient_count = gradient, taking_part.to(dtype)
        else:
            self._gradient_sum = self._gradient_sum.to(device, dtype) + gradient
            self._gradient_count = self._gradient_count.to(device, dtype) + taking_part

    @override
    def step_state(self) -> _StepState:
        """L(0) (taken at a task's first usable step), the step's gradient sum so far, and ``w``
        with its Adam (all replaced, never changed in place)."""
        sums = (self._gradient_sum, self._gradient_count)
        return self._initial_losses, *sums, self._weights.kept()

    @override
    def put_back_step_state(self, state: _StepState) -> None:
        self._initial_losses, self._gradient_sum, self._gradient_count, weights = state
        self._weights.put_back(weights)

    @override
    def state_to_log(self) -> dict[str, Tensor]:
        state = super().state_to_log()
        weights = self._weights_used if self._weights_used is not None else self._weights.snapshot()
        if weights is not None:
            state["learned_weight"] = weights
        return state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": self._weights.state_dict(),
            "initial_losses": self._initial_losses,
            "gradient_sum": self._gradient_sum,
            "gradient_count": self._gradient_count,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._weights.load_state_dict(state_dict["weights"])
        self._weights_used = None
        self._initial_losses = state_dict["initial_losses"]
        self._gradient_sum = state_dict["gradient_sum"]
        self._gradient_count = state_dict["gradient_count"]


class _UnitWeights(TaskParameters):
    """GradNorm's weights: :class:`TaskParameters` that start at 1 instead of 0."""

    @override
    def _initial_state(self) -> dict[str, Any]:
        return {"values": torch.ones(self.num_tasks)}


def _holders(pl_module: L.LightningModule, shared_ids: set[int]) -> list[str]:
    """The submodules, in registration order, that hold some of ``shared_ids`` themselves."""
    return [
        name
        for name, module in pl_module.named_modules()
        if any(id(p) in shared_ids for p in module.parameters(recurse=False))
    ]


def _last_layer(pl_module: L.LightningModule, shared_ids: set[int]) -> str | None:
    """The last submodule holding shared parameters that train (``None``: none trains)."""
    holders = _holders(pl_module, shared_ids)
    return holders[-1] if holders else None


def _resolve_layer(pl_module: L.LightningModule, layer: str) -> str:
    """The name of the submodule whose shared parameters GradNorm measures."""
    shared_ids = {id(p) for p in pl_module.shared_parameters()}  # type: ignore[operator]
    holders = _holders(pl_module, shared_ids)
    try:
        module = pl_module.get_submodule(layer)
    except AttributeError:
        module = None
    parameters = [] if module is None else list(module.parameters())
    frozen = any(not p.requires_grad for p in parameters)  # measures once it trains
    if not frozen and not any(id(p) in shared_ids for p in parameters):
        raise ValueError(
            f"GradNorm(layer={layer!r}): the model has no submodule {layer!r} with shared "
            f"parameters. Use 'last', 'all' or one of {holders}."
        )
    return layer
