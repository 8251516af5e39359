"""``GradientWeighting``: the machinery every gradient-based weighting method shares.

Per step it takes each task's gradient of the shared part, builds their K×K Gramian
``G[i, j] = <g_i, g_j>`` from global gradients, asks the method for weights ``w``, and gives the
shared part ``d = sum_k w_k g_k`` and each head its own task's (statically weighted) gradient —
LibMTL's and torchjd's semantics.

Where the per-task gradients come from:

* The model keeps one head per task in ``self.heads`` and each task's prediction depends on its
  own head only (:mod:`lightning_lossagg.representation`): each head reads a view of the
  representation of its own, and the backward Lightning runs does everything in one engine call,
  as in a plain step. The heads get their gradients as usual; task ``k``'s gradient at the
  representation arrives at view ``k``; the views' node builds the Gramian, calls the method and
  sends ``d`` on (``weights_in_backward``). The step's weights are written during backward.
  Methods that weigh the heads with the weights themselves (Nash-MTL) take ONE autograd pass of
  the summed terms to per-head leaves before backward instead, and a surrogate hands out the
  gradients.
* Any other layout: the mixin keeps each task's loss term in a graph of its own
  (``GlobalTaskLosses.task_terms``) and task ``k``'s gradient is one backward through task
  ``k``'s head only, before backward; a surrogate hands out the gradients.

Where the gradients are taken:

* ``rep_grad=True``: at the shared representation (MGDA-UB), far cheaper. The model defines
  ``forward_shared(inputs)`` and ``forward_heads(representation)``; the trunk runs once, with
  ``d``. Each rank's representation rows belong to its own samples, so the global Gramian is
  exactly the sum of the ranks' Gramians: one K×K all-reduce. With ``nn.Linear`` heads (where
  their factors take fewer operations), the Gramian and ``d`` come from the heads' output
  gradients and weights (:meth:`GradientsAtHeads.linear_factors`): the heads are one autograd
  node that makes no per-task gradient at the representation at all
  (:meth:`GradientsAtHeads.linear_heads`), at every step (the first checks the layout on a
  probe), so a resumed fit weighs exactly as an uninterrupted one; under autocast the views'
  K gradients serve below ``linear_factors_from`` tasks.
* ``rep_grad=False``: at the shared parameters (``pl_module.shared_parameters()``). A model with
  ``forward_shared``/``forward_heads`` gets its trunk's K×P Jacobian from the representation
  gradients, one backward through the trunk per task (torchjd's ``mtl_backward`` algorithm,
  without vmap); any other model takes one backward per task through the whole network.
  ``sync="gradients"`` (default, exact) all-reduces the Jacobian; ``sync="gramian"`` all-reduces
  only the K×K Gramian, averaging the ranks' local Gramians (an approximation: it misses the
  cross-rank terms of ``<g_i, g_j>``).

Either way the weights come from global figures and are identical on every rank. Methods solve a
small problem on the K×K Gramian on the host, which costs one device-to-host transfer per step.

Under float16 mixed precision the per-task gradients taken before the backward are gradients of
the losses times the ``GradScaler``'s scale, as the backward's are (:func:`loss_scale`), and
unscaled in float32: a small gradient keeps its digits instead of flushing to zero in float16.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, NamedTuple, overload

import lightning as L
import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg import distributed
from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.callbacks._checks import require_multitask
from lightning_lossagg.functional._tensors import detached
from lightning_lossagg.mixin import MultiTaskMixin, not_overridden
from lightning_lossagg.representation import GradientsAtHeads, Receiver, SharedRepresentation
from lightning_lossagg.weighting import WeightingCallback

Sync = Literal["gradients", "gramian"]
# Up to this many tasks, the Gramian of gradients on the CPU is K(K+1)/2 dot products of the
# gradients where they lie; with more, one copy of them into a matrix and a product are faster.
_DOT_PRODUCTS_UP_TO = 4
_DOT_DTYPES = (torch.float32, torch.float64)
# What a receiver returns: the representation's gradient and the parameters'.
BackwardGradients = tuple[Tensor | None, tuple[Tensor | None, ...]]
# A parameter's gradient from each task that reaches it: (task index, gradient or None).
TaskGradients = list[tuple[int, Tensor | None]]


class _HostFigures(NamedTuple):
    """A step's figures on the host, in float64: the global Gramian, ``Task.weight``, the factor
    of the loss before backward, which tasks have a valid sample and, under DDP with parameter
    gradients, which shared parameters a task reached on some rank."""

    gramian: np.ndarray
    static: np.ndarray
    factor: float
    valid: Tensor
    reached: list[bool] | None = None


class _PendingStep(NamedTuple):
    """What a step whose weights come in backward keeps for its receiver: the tasks with a valid
    sample, ``Task.weight`` and the weights to write (times ``Task.weight``)."""

    valid: Tensor
    static: Tensor
    weights: Tensor


class GradientWeighting(WeightingCallback):
    """Base class of gradient-based methods; subclasses implement :meth:`weights_from_gramian`.

    A model with ``forward_shared``/``forward_heads`` trains with its heads on a detached copy of
    the representation (see the module's docstring). With gradient accumulation the weights and
    ``d`` come from each micro-batch's gradients; the update is the mean of their directions.
    A subclass that overrides :meth:`backward_objective` must set
    ``may_weigh_in_backward = False`` (the weights computed in backward bypass it) and send the
    trunk its gradient (:meth:`weighted_sum_objective` does), or set
    ``parameter_gradients_through_representation = False`` to keep the forward whole with
    parameter gradients.

    Args:
        rep_grad: take gradients at the shared representation instead of the shared parameters.
        sync: with parameter gradients under DDP, ``"gradients"`` (exact) or ``"gramian"``
            (cheaper approximation); ignored with ``rep_grad=True``, which is always exact.
    """

    separate_task_terms = True
    # Subclasses that take parameter gradients their own way (GradNorm, DB-MTL) set it False:
    # then the model's forward is split only for rep_grad=True.
    parameter_gradients_through_representation: ClassVar[bool] = True
    # Whether backward_objective hands the heads the gradients kept from the per-task pass
    # (subclasses with an objective of their own that runs through the heads set it False).
    injects_head_gradients: ClassVar[bool] = True
    # Whether the weights may be computed inside the backward Lightning runs (the heads then get
    # their own tasks' gradients times Task.weight, as backward_objective gives them).
    # Subclasses that weigh the heads otherwise set it False.
    may_weigh_in_backward: ClassVar[bool] = True
    # On the views (autocast, heads that cannot run as one node), with rep_grad=True and at
    # least this many tasks, linear heads hand the gradient at their outputs and their weights
    # (GradientsAtHeads.linear_factors): the Gramian and the update then cost O(N O^2) instead
    # of copying K gradients into a matrix; with fewer tasks the dot products on the views'
    # gradients, made anyway, are as cheap. Heads in one node always take the factors.
    linear_factors_from: ClassVar[int] = _DOT_PRODUCTS_UP_TO + 1

    def __init__(self, rep_grad: bool = False, sync: Sync = "gradients") -> None:
        if sync not in ("gradients", "gramian"):
            raise ValueError(f"sync must be 'gradients' or 'gramian', got {sync!r}.")
        if not isinstance(rep_grad, bool):
            raise ValueError(
                f"{type(self).__name__}: `rep_grad` must be True (gradients at the shared "
                f"representation) or False (at the shared parameters); got {rep_grad!r}."
            )
        self.rep_grad = rep_grad
        self.sync = sync
        self.splits_forward = self.rep_grad
        self.takes_linear_factors = self.rep_grad
        self._jacobian: Tensor | None = None
        self._shared_reached: list[bool] = []  # which shared parameters a task's gradient reached
        self._reached_on_ranks: Tensor | None = None  # under DDP: on how many ranks, per parameter
        # Under DDP: the shared parameters no task reached on any rank, which hand DDP a zero
        # gradient and lose it if it is still 0 once DDP has reduced it (_shared_gradients).
        self._no_gradient_after_backward: list[torch.nn.Parameter] = []
        self._shared_parameters: list[torch.nn.Parameter] = []
        self._every_gradient_awaited = False  # several ranks, or DDP on one
        # The heads' parameters, each with its (task, gradient) pairs (None: the task does not
        # reach it), from the per-task pass(es), for the surrogate.
        self._own_task_gradients: list[tuple[torch.nn.Parameter, TaskGradients]] = []
        # The latest step's global Gramian and valid tasks, on the device: the diagnostics.
        self._gramian: Tensor | None = None
        self._gramian_valid: Tensor | None = None
        self._ones: Tensor | None = None
        # The step's tasks with a valid sample (CPU): the rows of the Gramian a method sees.
        self.valid_tasks: Tensor | None = None
        # The rounding unit of the dtype the step's Gramian was computed in (float32 for float32,
        # bfloat16 and float16 gradients), for methods that tell rounding from a cancellation.
        self.gramian_eps = float(torch.finfo(torch.float64).eps)

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        """Weights ``w`` from the global Gramian of the valid tasks (float64, on CPU): the tasks
        where :attr:`valid_tasks` is True, in order."""
        raise NotImplementedError

    def prepare_step(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> None:
        """Called in ``training_step`` before the step's gradients are taken (which may be in
        backward): read what :meth:`weights_from_gramian` needs of the step, seed generators."""

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"rep_grad": self.rep_grad, "sync": self.sync}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        require_multitask(self, pl_module)
        name = type(self).__name__
        split = [
            m for m in ("forward_shared", "forward_heads") if callable(getattr(pl_module, m, None))
        ]
        if self.rep_grad and len(split) < 2:
            missing = [m for m in ("forward_shared", "forward_heads") if m not in split]
            raise TypeError(
                f"{name}(rep_grad=True) needs the model to split its forward: define "
                f"{' and '.join(missing)} (forward_shared(inputs) -> representation, "
                "forward_heads(representation) -> {task: prediction}), or use rep_grad=False."
            )
        frozen = any(not parameter.requires_grad for parameter in pl_module.parameters())
        if not self.rep_grad and not pl_module.shared_parameters() and not frozen:  # type: ignore[operator]
            # (A frozen trunk, by BackboneFinetuning's setup say, has nothing to weigh until it
            # trains: see task_weights.)
            raise ValueError(
                f"{name} found no shared parameters: every trainable parameter is in a head. "
                "Gradient-based weighting needs a shared part; check shared_parameters()."
            )
        self.splits_forward = self.rep_grad or (
            len(split) == 2
            and self.parameter_gradients_through_representation
            and _shared_are_the_trunk(pl_module)
        )
        self.weighs_in_backward = (
            self.splits_forward and self.injects_head_gradients and self.may_weigh_in_backward
        )

    # ------------------------------------------------------------------------ the step
    @override
    def task_weights(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        if not self.rep_grad:
            self._take_shared_parameters(pl_module)
        if _nothing_shared(pl_module, self.rep_grad, self._shared_parameters):
            return self._nothing_to_weigh(pl_module, step)
        self.prepare_step(pl_module, step)
        if self.rep_grad:
            gramian = self._representation_gramian(pl_module, step)
        else:
            gramian = self._parameter_gramian(pl_module, step)
        gramian, valid = detached(gramian), step.valid
        self._gramian, self._gramian_valid = gramian, valid
        self.gramian_eps = torch.finfo(gramian.dtype).eps
        reached, self._reached_on_ranks = self._reached_on_ranks, None
        if gramian.device.type != "cpu":
            host_gramian, host_valid, *host_reached = _in_one_transfer(
                gramian, valid, *(() if reached is None else (reached,))
            )
            gramian, valid = torch.from_numpy(host_gramian), torch.from_numpy(host_valid > 0)
            reached = torch.from_numpy(host_reached[0]) if host_reached else None
        if reached is not None:  # under DDP: reached on some rank
            self._shared_reached = (reached > 0).tolist()
        weights = self._weights_of_valid_tasks(gramian, valid)
        return distributed.to_device(weights, step.local_sums, step.dtype)

    def _take_shared_parameters(self, pl_module: MultiTaskMixin) -> None:
        """The step's shared parameters, and whether every one must get a gradient: on several
        ranks (DDP's reducer, and other strategies', may wait for each), and where DDP wraps the
        model on one rank (``devices=1``, ``torchrun --nproc_per_node=1``: nothing is synced,
        but its reducer still waits)."""
        self._shared_parameters = pl_module.shared_parameters()
        trainer = pl_module._trainer
        model = None if trainer is None else trainer.strategy.model
        model = getattr(model, "_orig_mod", model)  # under torch.compile
        self._every_gradient_awaited = distributed.is_distributed() or isinstance(
            model, torch.nn.parallel.DistributedDataParallel
        )

    def _nothing_to_weigh(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        """Weights of 1 for a step without a shared gradient to weigh (a frozen trunk, as under
        BackboneFinetuning): the heads follow their tasks' gradients times Task.weight
        (backward_objective sees no Jacobian), and no Gramian is logged."""
        self._jacobian = self._gramian = pl_module.shared_representation = None
        return torch.ones_like(step.losses)

    @override
    def views_at_heads(
        self, pl_module: MultiTaskMixin, split: GradientsAtHeads, output: Tensor, leaf: Tensor
    ) -> tuple[Tensor, ...]:
        if self.rep_grad:
            split.wants_linear_factors = split.num_tasks >= self.linear_factors_from
            return split.views(output)
        # The receiver takes the trunk's gradients itself: backward stops at the views.
        self._take_shared_parameters(pl_module)
        return split.views(leaf, self._shared_parameters)

    @override
    def weights_in_backward(
        self, pl_module: MultiTaskMixin, step: GlobalTaskLosses, static: Tensor
    ) -> tuple[Tensor, Receiver]:
        self.prepare_step(pl_module, step)
        pending = _PendingStep(step.valid, static, torch.zeros_like(static))
        if self.rep_grad:
            # The mixin calls it on a step whose representation has a split.
            split: GradientsAtHeads = pl_module.shared_representation.split  # type: ignore[union-attr, assignment]

            def receive(grads: tuple[Tensor, ...], factor: Tensor) -> BackwardGradients:
                linear = split.linear_factors()
                direction = self._weigh_at_heads(grads, factor, pending, linear)
                if self.weighs_heads:  # heads in one node: they take the weights too
                    assert linear is not None
                    split.head_scales = pending.weights / pending.static
                return direction, ()

        else:
            output = pl_module.shared_representation.output  # type: ignore[union-attr]  # set by the mixin
            shared = self._shared_parameters

            def receive(grads: tuple[Tensor, ...], factor: Tensor) -> BackwardGradients:
                return None, self._weigh_at_parameters(grads, factor, pending, output, shared)

        return pending.weights, receive

    def _weigh_at_heads(
        self,
        grads: tuple[Tensor, ...],
        factor: Tensor,
        pending: _PendingStep,
        linear: tuple[Tensor, Tensor, list[int]] | None = None,
    ) -> Tensor:
        """In backward: the tasks' gradients at the heads' views, ``factor * s_k`` times this
        rank's terms' gradients (``s``: ``Task.weight``, ``factor``: the loss's scaling before
        backward), make the global Gramian; the method's weights go to ``pending.weights`` (times
        ``s``) and the trunk gets ``factor * sum_k w_k s_k g_k``, as the surrogate gives it.
        ``linear``: the linear heads' factors of the same gradients
        (:meth:`GradientsAtHeads.linear_factors`), which give both in far fewer operations."""
        jacobian = None
        if linear is not None:
            local = _factored_gramian(*linear)
        else:
            local, jacobian = _rows_gramian([grad.reshape(-1) for grad in grads])
        self.gramian_eps = torch.finfo(local.dtype).eps
        host = _on_host(distributed.all_reduce_sum(local), factor, pending)
        # Each rank's row k is W * factor * s_k times its share of the global gradient g_k.
        scale = host.factor * distributed.world_size()
        adaptive = self._weights_of_scaled_gramian(host, scale, pending)
        if linear is not None:  # a 2-D representation, as the factors' product
            return _factored_combination(*linear, adaptive)
        if jacobian is None:
            return _combination(grads, adaptive.tolist())
        adaptive = distributed.to_device(adaptive, jacobian, jacobian.dtype)
        return (adaptive @ jacobian).view_as(grads[0])

    def _weigh_at_parameters(
        self,
        grads: tuple[Tensor, ...],
        factor: Tensor,
        pending: _PendingStep,
        output: Tensor,
        shared: list[torch.nn.Parameter],
    ) -> tuple[Tensor | None, ...]:
        """:meth:`_weigh_at_heads` at the shared parameters: each task's gradient at the views
        goes back through the trunk (one backward per task), the Jacobian is synced as
        :attr:`sync` says, and the shared parameters get ``factor * sum_k w_k s_k g_k``
        (see :meth:`_shared_gradients`)."""
        none = (None,) * len(shared)
        rows = [_trunk_gradients(output, shared, grad, none) for grad in grads]
        reached = _reached(rows, len(shared))
        jacobian, gramian, on_ranks = self._synced_gramian(_jacobian(rows, shared), reached)
        self.gramian_eps = torch.finfo(gramian.dtype).eps
        host = _on_host(gramian, factor, pending, on_ranks)
        adaptive = self._weights_of_scaled_gramian(host, host.factor, pending)
        adaptive = distributed.to_device(adaptive, jacobian, jacobian.dtype)
        direction = _shaped_like(adaptive @ jacobian, shared)
        return self._shared_gradients(
            shared, direction, reached if host.reached is None else host.reached
        )

    def _shared_gradients(
        self,
        shared: list[torch.nn.Parameter],
        grads: tuple[Tensor, ...],
        reached: list[bool],
    ) -> tuple[Tensor | None, ...]:
        """The shared parameters' gradients, ``None`` for one that no task reached (on any
        rank), as in a plain backward: an optimizer with momentum or weight decay leaves it
        alone. On several ranks, or under DDP on one, each rank hands DDP a gradient for every
        one (DDP waits for each, a 0 where no task reached it), and :meth:`on_after_backward`
        takes off those still exactly 0 once DDP has reduced them, as DDP itself does with
        ``find_unused_parameters=True`` (a term of the user's own added to the objective may have
        reached one, and an earlier micro-batch's task may have)."""
        if not self._every_gradient_awaited:
            return tuple(grad if hit else None for grad, hit in zip(grads, reached, strict=True))
        pairs = zip(shared, reached, strict=True)
        self._no_gradient_after_backward = [parameter for parameter, hit in pairs if not hit]
        return grads

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        flagged, self._no_gradient_after_backward = self._no_gradient_after_backward, []
        flagged = [parameter for parameter in flagged if parameter.grad is not None]
        if not flagged:
            return
        # One host read, at a step where no task on any rank reached a shared parameter. The
        # gradients are DDP's reduced ones, the same on every rank: so are the decisions.
        nonzero = torch.stack([parameter.grad.any() for parameter in flagged]).tolist()  # type: ignore[union-attr]
        for parameter, keep in zip(flagged, nonzero, strict=True):
            if not keep:
                parameter.grad = None

    def _weights_of_scaled_gramian(
        self, host: _HostFigures, scale: float, pending: _PendingStep
    ) -> Tensor:
        """The method's weights from the global Gramian of rows scaled by ``scale * s_k``; the
        weights times ``s`` are written to ``pending.weights``."""
        scales = host.static * scale
        global_gramian = torch.from_numpy(host.gramian / np.outer(scales, scales))
        adaptive = self._weights_of_valid_tasks(global_gramian, host.valid)
        self._gramian, self._gramian_valid = global_gramian, self.valid_tasks
        weights = pending.weights
        weights.copy_(distributed.to_device(adaptive.numpy() * host.static, weights, weights.dtype))
        return adaptive

    def _representation_gramian(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        """The Jacobian at the shared representation, and its global Gramian."""
        representation = _representation(pl_module, type(self).__name__)
        scale = loss_scale(pl_module, step.local_sums)
        if representation.per_task is not None:
            rows = self._gradients_in_one_pass(pl_module, step, representation.per_task, scale)
        else:
            inputs = list(representation.inputs)
            rows = [_summed(grads) for grads in task_gradients(step, inputs, scale)]
        self._jacobian = _jacobian([(row,) for row in rows], [representation.inputs[0]], scale)
        # Rows of different ranks' representations are different coordinates of the global
        # gradient (scaled 1/W by DDP's averaging): the global Gramian is the sum.
        return _scaled_sum_over_ranks(_gramian(self._jacobian), distributed.world_size() ** -2)

    def _parameter_gramian(self, pl_module: MultiTaskMixin, step: GlobalTaskLosses) -> Tensor:
        """The Jacobian at the shared parameters (global with ``sync="gradients"``), and its
        global Gramian."""
        shared = self._shared_parameters  # this step's, taken by task_weights
        representation = pl_module.shared_representation
        scale = loss_scale(pl_module, step.local_sums)
        if representation is not None and representation.per_task is not None:
            rows = self._gradients_in_one_pass(pl_module, step, representation.per_task, scale)
            shared_grads = [
                _trunk_gradients(representation.output, shared, row, (None,) * len(shared))
                for row in rows
            ]
            return self._synced_parameter_gramian(shared_grads, shared, scale)
        heads = pl_module.task_specific_parameters()
        if representation is None:
            per_task = task_gradients(step, [*shared, *heads], scale)
            shared_grads = [grads[: len(shared)] for grads in per_task]
        else:
            inputs = representation.inputs
            per_task = task_gradients(step, [*inputs, *shared, *heads], scale)
            shared_grads = [
                _trunk_gradients(
                    representation.output,
                    shared,
                    _summed(grads[: len(inputs)]),
                    grads[len(inputs) : len(inputs) + len(shared)],
                )
                for grads in per_task
            ]
            per_task = [grads[len(inputs) :] for grads in per_task]
        self._own_task_gradients = [
            (
                parameter,
                [
                    (k, _unscaled(g[len(shared) + i], scale))
                    for k, g in enumerate(per_task)
                    if g[len(shared) + i] is not None
                ],
            )
            for i, parameter in enumerate(heads)
        ]
        return self._synced_parameter_gramian(shared_grads, shared, scale)

    def _synced_parameter_gramian(
        self,
        shared_grads: list[tuple[Tensor | None, ...]],
        shared: list[torch.nn.Parameter],
        scale: Tensor | None,
    ) -> Tensor:
        """The Jacobian of the tasks' shared parameter gradients (kept for the surrogate) made
        global as :attr:`sync` says, which parameters a task reached, and the global Gramian."""
        self._shared_reached = _reached(shared_grads, len(shared))
        jacobian = _jacobian(shared_grads, shared, scale)
        self._jacobian, gramian, self._reached_on_ranks = self._synced_gramian(
            jacobian, self._shared_reached
        )
        return gramian

    def _gradients_in_one_pass(
        self,
        pl_module: MultiTaskMixin,
        step: GlobalTaskLosses,
        leaves: tuple[Tensor, ...],
        scale: Tensor | None,
    ) -> list[Tensor | None]:
        """Every task's gradient at its own head's leaf of the representation (times the loss
        ``scale``, if any), and (kept for the surrogate) every head's parameter gradients, from
        ONE backward pass of the summed local terms: task ``k`` alone reaches leaf ``k`` and
        head ``k``."""
        # Heads that read a leaf each (per_task) were found at setup.
        heads = pl_module._task_heads.parameters if self.injects_head_gradients else []  # type: ignore[union-attr]
        flat_heads = [parameter for group in heads for parameter in group]
        terms = step.local_terms
        if not terms.requires_grad:
            return [None] * len(leaves)
        ones = self._ones
        if ones is None or (ones.shape, ones.dtype, ones.device) != (
            terms.shape,
            terms.dtype,
            terms.device,
        ):
            ones = self._ones = torch.ones_like(terms)  # the terms' sum: each term's gradient is 1
        grads = torch.autograd.grad(
            terms,
            [*leaves, *flat_heads],
            ones if scale is None else ones * scale,
            retain_graph=not self.injects_head_gradients,
            allow_unused=True,
        )
        head_grads = iter(grads[len(leaves) :])
        self._own_task_gradients = [
            (parameter, [(k, _unscaled(next(head_grads), scale))])
            for k, group in enumerate(heads)
            for parameter in group
        ]
        return list(grads[: len(leaves)])

    def _synced_gramian(
        self, jacobian: Tensor, reached: list[bool] | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """A local Jacobian of parameter gradients made global as :attr:`sync` says (the
        Jacobian itself with ``"gradients"``, only the Gramian with ``"gramian"``): the Jacobian
        (global or local), the global Gramian and, under DDP, on how many ranks a task reached
        each parameter (``reached``: on this one), in the same all-reduce."""
        scale = 1 / distributed.world_size()
        if self.sync == "gradients":
            jacobian, on_ranks = _scaled_sum_and_counts_over_ranks(jacobian, scale, reached)
            return jacobian, _gramian(jacobian), on_ranks
        gramian, on_ranks = _scaled_sum_and_counts_over_ranks(_gramian(jacobian), scale, reached)
        return jacobian, gramian, on_ranks

    @override
    def state_to_log(self) -> dict[str, Tensor]:
        """``grad_norm``: each task's global gradient norm ``sqrt(G[k, k])`` (NaN for a task
        without a valid sample in the step). Subclasses that add state merge it with this."""
        if self._gramian is None:
            return {}
        norms = self._gramian.diagonal().clamp(min=0).sqrt()
        # _gramian_valid is set with the Gramian.
        return {"grad_norm": torch.where(self._gramian_valid, norms, torch.nan)}  # type: ignore[arg-type]

    @override
    def pairwise_state_to_log(self) -> dict[str, Tensor]:
        """``grad_cos``: the cosine similarity of every pair of task gradients, from the Gramian
        (NaN where a task had no valid sample or a zero gradient)."""
        if self._gramian is None:
            return {}
        norms = self._gramian.diagonal().clamp(min=0).sqrt()
        scale = torch.outer(norms, norms)
        # _gramian_valid is set with the Gramian.
        defined = torch.outer(self._gramian_valid, self._gramian_valid) & (scale > 0)  # type: ignore[arg-type]
        cosine = self._gramian / torch.where(defined, scale, 1.0)
        return {"grad_cos": torch.where(defined, cosine.clamp(-1.0, 1.0), torch.nan)}

    def _weights_of_valid_tasks(self, gramian: Tensor, valid: Tensor) -> Tensor:
        """The method's weights on the valid tasks' sub-Gramian; 0 for the others."""
        # Every step passes here: each operation skipped when it would change nothing is a few
        # microseconds, and in the middle of a step's tensor work, several times that.
        if gramian.requires_grad or gramian.device.type != "cpu" or gramian.dtype != torch.float64:
            gramian = gramian.detach().to("cpu", torch.float64)
        if valid.device.type != "cpu":
            valid = valid.cpu()
        self.valid_tasks = valid  # which tasks weights_from_gramian sees, for per-task settings
        flags = valid.tolist()
        if not any(flags) or not np.isfinite(gramian.numpy()).all():
            # Nothing to weigh, or a non-finite gradient: the mixin's non-finite policy decides
            # the step; equal weights keep the method's state untouched.
            return torch.tensor(flags, dtype=torch.float64)
        if all(flags):
            return self.weights_from_gramian(gramian).double()
        index = valid.nonzero().flatten()
        weights = torch.zeros(len(valid), dtype=torch.float64)
        weights[index] = self.weights_from_gramian(gramian[index][:, index]).double()
        return weights

    @override
    def backward_objective(
        self, pl_module: MultiTaskMixin, step: GlobalTaskLosses, weights: Tensor, static: Tensor
    ) -> Tensor:
        if self._jacobian is None:  # nothing shared this step: see task_weights
            return self.weighted_sum_objective(pl_module, step, weights)
        jacobian, self._jacobian = self._jacobian, None
        representation, pl_module.shared_representation = pl_module.shared_representation, None
        direction = weights.to(jacobian.dtype) @ jacobian  # d = sum_k w_k g_k
        # Heads: their own task's gradient, sum_k s_k grad t_k (local: DDP averages it).
        heads, head_grads, head_tasks = self._head_gradients(static.to(jacobian.dtype))
        if self.rep_grad:
            # Shared trunk: d at the representation (task_weights found it), in the one backward
            # Lightning runs.
            output = representation.output  # type: ignore[union-attr]
            if representation.per_task is None:  # type: ignore[union-attr]  # heads' graphs kept
                trunk = _InjectedGradients.apply(
                    (direction.view_as(output),), (None,), None, output
                )
                return step.weighted_sum(static) + trunk
            # The heads' gradients came with the tasks' (one pass), which freed their graphs.
            inputs, grads, tasks = [output, *heads], [direction.view_as(output)], [None]
        else:
            # Shared parameters: d, split back into their shapes (none for one no task reached).
            shared = self._shared_parameters
            split = self._shared_gradients(
                shared, _shaped_like(direction, shared), self._shared_reached
            )
            pairs = zip(shared, split, strict=True)
            kept = [(parameter, grad) for parameter, grad in pairs if grad is not None]
            inputs = [*(parameter for parameter, _ in kept), *heads]
            grads = [grad for _, grad in kept]
            tasks = [None] * len(grads)
        return _InjectedGradients.apply(
            (*grads, *head_grads), (*tasks, *head_tasks), static.to(jacobian.dtype), *inputs
        )

    def _head_gradients(
        self, static: Tensor
    ) -> tuple[list[torch.nn.Parameter], list[Tensor], list[int | None]]:
        """The heads' parameters, their gradients, and for each the task whose static weight
        still scales it (``None``: weighted already, the parameter is reached by several tasks)."""
        own, self._own_task_gradients = self._own_task_gradients, []
        tasks: list[int | None]
        parameters, grads, tasks = [], [], []
        for parameter, pairs in own:
            parameters.append(parameter)
            if len(pairs) == 1 and pairs[0][1] is not None:
                tasks.append(pairs[0][0])
                grads.append(pairs[0][1])
            else:
                tasks.append(None)
                grads.append(_weighted_sum(pairs, static.unbind(), parameter))
        return parameters, grads, tasks

    def weighted_sum_objective(
        self, pl_module: MultiTaskMixin, step: GlobalTaskLosses, weights: Tensor
    ) -> Tensor:
        """``sum_k w_k t_k`` for a step that skips the gradient machinery; when the heads saw
        detached leaves of the representation, their gradient is sent on to the trunk."""
        objective = step.weighted_sum(weights)
        representation, pl_module.shared_representation = pl_module.shared_representation, None
        if representation is None:
            return objective
        scale = loss_scale(pl_module, objective)
        grads = torch.autograd.grad(
            objective, representation.inputs, scale, retain_graph=True, allow_unused=True
        )
        representation_grad = _unscaled(_summed(grads), scale)
        if representation_grad is None:
            return objective
        return objective + (representation.output * representation_grad).sum()


class _InjectedGradients(torch.autograd.Function):
    """A zero whose gradient with respect to input ``i`` is ``grads[i]`` times the incoming
    gradient (Lightning scales the loss for accumulation, AMP for its scaler), times
    ``scales[tasks[i]]`` where ``tasks[i]`` is not ``None``. One autograd node instead of a
    product and a sum per input, and one multiplication per input in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        grads: tuple[Tensor, ...],
        tasks: tuple[int | None, ...],
        scales: Tensor | None,
        *inputs: Tensor,
    ) -> Tensor:
        ctx.grads, ctx.tasks, ctx.scales = grads, tasks, scales
        return inputs[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grads, tasks, scales = ctx.grads, ctx.tasks, ctx.scales
        ctx.grads = ctx.scales = None
        return (None, None, None, *_scaled(grads, tasks, scales, grad_output))


def _scaled(
    grads: tuple[Tensor, ...],
    tasks: tuple[int | None, ...],
    scales: Tensor | None,
    grad_output: Tensor,
) -> list[Tensor]:
    """``grads[i] * grad_output``, times ``scales[tasks[i]]`` where ``tasks[i]`` is not ``None``.
    On the CPU, where reading them costs nothing, the factors are read on the host and factors
    of exactly 1 (no accumulation, no loss scaling, unit static weights) are skipped: those
    gradients are handed over as they are, without a copy."""
    if grad_output.device.type == "cpu" and grad_output.numel() == 1:
        output = grad_output.item()
        factors = [output] * len(grads)
        if scales is not None and any(task is not None for task in tasks):
            per_task = (scales * output).tolist()
            factors = [output if task is None else per_task[task] for task in tasks]
        return [
            grad if factor == 1.0 else grad * factor
            for grad, factor in zip(grads, factors, strict=True)
        ]
    return _scaled_on_device(grads, tasks, scales, grad_output)


def _scaled_on_device(
    grads: tuple[Tensor, ...],
    tasks: tuple[int | None, ...],
    scales: Tensor | None,
    grad_output: Tensor,
) -> list[Tensor]:
    """:func:`_scaled` without reading anything on the host (an accelerator would wait)."""
    if scales is None or all(task is None for task in tasks):
        return [grad * grad_output for grad in grads]
    per_task = (scales * grad_output).unbind()
    return [
        grad * (grad_output if task is None else per_task[task])
        for grad, task in zip(grads, tasks, strict=True)
    ]


def loss_scale(pl_module: L.LightningModule, like: Tensor) -> Tensor | None:
    """The loss scale of float16 mixed precision (its ``GradScaler``'s current scale, a 0-dim
    float32 tensor on ``like``'s device, made without a host sync), or ``None`` without one.
    Gradients taken before the backward are taken of the losses times it, as the backward's
    are, so that small ones keep their digits in float16, and unscaled in float32."""
    precision = getattr(getattr(pl_module, "_trainer", None), "precision_plugin", None)
    scaler = getattr(precision, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler.scale(torch.ones((), dtype=torch.float32, device=like.device))


def nan_gradient_unless_finite(parameter: Tensor, figures: Tensor) -> Tensor:
    """A zero whose gradient on ``parameter`` is NaN unless every one of ``figures`` is finite:
    added to the objective, it has float16's ``GradScaler`` skip a step whose per-task
    gradients, taken apart from the backward, overflowed (no host sync)."""
    finite = torch.isfinite(figures).all()
    poison = torch.where(finite, 0.0, torch.nan).to(parameter.dtype).expand_as(parameter)
    return _InjectedGradients.apply((poison,), (None,), None, parameter)


@overload
def _unscaled(grad: Tensor, scale: Tensor | None) -> Tensor: ...
@overload
def _unscaled(grad: None, scale: Tensor | None) -> None: ...
def _unscaled(grad: Tensor | None, scale: Tensor | None) -> Tensor | None:
    """A gradient taken times the loss ``scale``, divided by it in float32 at least (where
    float16 would flush small values to zero again)."""
    if grad is None or scale is None:
        return grad
    return grad.to(torch.promote_types(grad.dtype, torch.float32)) / scale


def task_gradients(
    step: GlobalTaskLosses, inputs: Sequence[Tensor], scale: Tensor | None = None
) -> list[tuple[Tensor | None, ...]]:
    """Per task, the gradients of its local term with respect to ``inputs`` (``None``: the task
    does not reach that input), times the loss ``scale`` if given (:func:`loss_scale`). One
    backward per task through its own part of the graph (the mixin keeps the task terms apart
    for gradient methods)."""
    terms = step.task_terms
    if terms is None:
        raise RuntimeError(
            "The step has no separate task terms: the weighting callback must set "
            "separate_task_terms = True so that the mixin builds them."
        )
    none: tuple[None, ...] = (None,) * len(inputs)
    return [retained_grad(term, inputs, scale) if term.requires_grad else none for term in terms]


def retained_grad(
    output: Tensor, inputs: Sequence[Tensor], grad_output: Tensor | None
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` keeping the graph for the next task's pass (``None`` for an input
    the output does not reach), with an error that says what to do where a network compiled by
    ``torch.compile`` refuses a second pass."""
    try:
        return torch.autograd.grad(
            output, inputs, grad_output, retain_graph=True, allow_unused=True
        )
    except RuntimeError as error:
        if "donated buffers" not in str(error):
            raise
        raise RuntimeError(
            "The per-task gradients take one backward pass per task through the network, and "
            "torch.compile compiled its backward for one pass (its buffers are donated). "
            "Compile the shared trunk's module rather than the whole model "
            "(self.trunk = torch.compile(self.trunk)), or use rep_grad=True."
        ) from error


def task_jacobian(
    step: GlobalTaskLosses, inputs: Sequence[Tensor], scale: Tensor | None = None
) -> Tensor:
    """The K×P matrix of the tasks' gradients with respect to ``inputs`` (zeros where a task does
    not reach an input); taken times the loss ``scale`` if given, and divided by it."""
    return _jacobian(task_gradients(step, inputs, scale), inputs, scale)


def _trunk_gradients(
    output: Tensor,
    shared: list[torch.nn.Parameter],
    representation_grad: Tensor | None,
    after: tuple[Tensor | None, ...],
) -> tuple[Tensor | None, ...]:
    """A task's gradient of the shared parameters: the trunk's vector-Jacobian product with its
    representation gradient (one backward through the trunk; a loop over tasks rather than one
    vmapped backward: as fast on CPU, and vmap fails on some models, such as compiled modules or
    cuDNN RNNs), plus what reaches shared parameters used after the representation."""
    if representation_grad is None:
        return after
    trunk = retained_grad(output, shared, representation_grad)
    return tuple(
        t if a is None else a if t is None else t + a for t, a in zip(trunk, after, strict=True)
    )


def _jacobian(
    per_task: list[tuple[Tensor | None, ...]],
    inputs: Sequence[Tensor],
    scale: Tensor | None = None,
) -> Tensor:
    """``[K, P]``: row ``k`` holds task ``k``'s gradients, flattened one after the other (zeros
    for ``None``), written in place: one copy; gradients taken times the loss ``scale`` are
    divided by it (in float32 at least)."""
    if len(inputs) == 1 and all(g is not None for (g,) in per_task):
        jacobian = torch.stack([g for (g,) in per_task]).reshape(len(per_task), -1)  # type: ignore[misc]
        return _unscaled(jacobian, scale)
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in inputs))
    jacobian = inputs[0].new_empty(len(per_task), sum(x.numel() for x in inputs), dtype=dtype)
    for row, grads in zip(jacobian, per_task, strict=True):
        pieces = [
            (torch.zeros_like(x) if g is None else g).reshape(-1)
            for g, x in zip(grads, inputs, strict=True)
        ]
        torch.cat(pieces, out=row)
    return _unscaled(jacobian, scale)


def _reached(per_task: Sequence[tuple[Tensor | None, ...]], count: int) -> list[bool]:
    """Which of ``count`` parameters some task's gradient reached (``None`` in no row)."""
    return [any(grads[index] is not None for grads in per_task) for index in range(count)]


def _shaped_like(direction: Tensor, parameters: list[torch.nn.Parameter]) -> tuple[Tensor, ...]:
    """The flat ``direction`` split back into the parameters' shapes (views, no copy)."""
    sizes = [parameter.numel() for parameter in parameters]
    return tuple(
        grad.view_as(parameter)
        for grad, parameter in zip(direction.split(sizes), parameters, strict=True)
    )


def _on_host(
    gramian: Tensor, factor: Tensor, pending: _PendingStep, reached: Tensor | None = None
) -> _HostFigures:
    """The Gramian, the static weights, the incoming factor, the valid tasks and the parameters
    reached on some rank (given ``reached``, the ranks' counts) on the host (from an accelerator
    in one transfer: one wait for the device, not five)."""
    if gramian.device.type == "cpu":
        static, valid = pending.static, pending.valid
        return _HostFigures(
            gramian.double().numpy(),
            np.asarray(static.tolist()),
            factor.item(),
            valid,
            None if reached is None else (reached > 0).tolist(),
        )
    return _on_host_in_one_transfer(gramian, factor, pending, reached)


def _on_host_in_one_transfer(
    gramian: Tensor, factor: Tensor, pending: _PendingStep, reached: Tensor | None = None
) -> _HostFigures:
    """:func:`_on_host` for an accelerator."""
    more = () if reached is None else (reached,)
    host = _in_one_transfer(gramian, pending.static, factor, pending.valid, *more)
    on_ranks = (host[4] > 0).tolist() if more else None
    return _HostFigures(host[0], host[1], float(host[2]), torch.from_numpy(host[3] > 0), on_ranks)


def _in_one_transfer(*tensors: Tensor) -> list[np.ndarray]:
    """float64 host copies of ``tensors`` (their shapes kept), from an accelerator in ONE
    transfer: one wait for the device, not one per tensor. Sent in the first one's dtype (an
    accelerator may have no float64), which must hold the others exactly."""
    dtype = tensors[0].dtype
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    host = flat.to("cpu", torch.float64).numpy()
    ends = np.cumsum([t.numel() for t in tensors])[:-1]
    return [part.reshape(t.shape) for part, t in zip(np.split(host, ends), tensors, strict=True)]


def _rows_gramian(rows: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """The Gramian of ``rows`` in float32 at least, and the rows stacked where that took them
    (``None``: on the CPU, a few float32 or float64 rows take K(K+1)/2 dot products, cheaper
    than copying them into a matrix; half-precision rows are stacked and widened)."""
    few = len(rows) <= _DOT_PRODUCTS_UP_TO and rows[0].dtype in _DOT_DTYPES
    if few and rows[0].device.type == "cpu":
        return _dot_gramian(rows), None
    jacobian = torch.stack(rows)
    return _gramian(jacobian), jacobian


def _dot_gramian(rows: list[Tensor]) -> Tensor:
    """``G[i, j] = <rows[i], rows[j]>`` from K(K+1)/2 dot products, on the host, in the dtype
    :func:`_gramian` gives (ranks that take different ways all-reduce alike)."""
    size = len(rows)
    gramian = np.empty((size, size))
    for i in range(size):
        for j in range(i, size):
            gramian[i, j] = gramian[j, i] = rows[i].dot(rows[j]).item()
    return torch.from_numpy(gramian).to(torch.promote_types(rows[0].dtype, torch.float32))


def _factored_gramian(outputs: Tensor, weights: Tensor, sizes: list[int]) -> Tensor:
    """The Gramian of the gradients ``D_k W_k`` (:meth:`GradientsAtHeads.linear_factors`):
    ``<D_i W_i, D_j W_j> = sum((D_i^T D_j) * (W_i W_j^T))``, in float32 at least. A head of
    several outputs sums products that can cancel far beyond ``|D_k W_k|^2`` (a softmax head's
    rows may share a part that no gradient sees): those sums are taken in float64 (where the
    device has it)."""
    dtype = functools.reduce(torch.promote_types, (outputs.dtype, weights.dtype, torch.float32))
    one_output_each = all(size == 1 for size in sizes)
    wide = (  # block sums (a head of several outputs) in float64
        dtype
        if one_output_each
        else torch.promote_types(dtype, distributed.stats_dtype(outputs.device))
    )
    outputs, weights = outputs.to(wide), weights.to(wide)
    products = (outputs.T @ outputs) * (weights @ weights.T)
    if one_output_each:
        return products
    blocks = _blocks(tuple(sizes), wide, products.device)
    return (blocks.T @ products @ blocks).to(dtype)


def _factored_combination(
    outputs: Tensor, weights: Tensor, sizes: list[int], adaptive: Tensor
) -> Tensor:
    """``sum_k adaptive[k] D_k W_k``: one product of the factors."""
    adaptive = distributed.to_device(adaptive, outputs, outputs.dtype)
    if not all(size == 1 for size in sizes):
        adaptive = _blocks(tuple(sizes), outputs.dtype, outputs.device) @ adaptive
    return (outputs * adaptive) @ weights


@functools.lru_cache(maxsize=16)
def _blocks(sizes: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The O × K indicator of which head each of the O outputs belongs to (made once per
    layout: no copy to a device per step)."""
    return torch.block_diag(*[torch.ones(size, 1, dtype=dtype) for size in sizes]).to(device)


def _combination(grads: tuple[Tensor, ...], weights: list[float]) -> Tensor:
    """``sum_k weights[k] * grads[k]``, skipping zero weights."""
    total: Tensor | None = None
    for grad, weight in zip(grads, weights, strict=True):
        if weight != 0.0:
            total = grad * weight if total is None else total.add_(grad, alpha=weight)
    return torch.zeros_like(grads[0]) if total is None else total


def _weighted_sum(grads: TaskGradients, weights: tuple[Tensor, ...], like: Tensor) -> Tensor:
    """``sum_k weights[k] * grad_k`` over the ``(k, grad_k)`` of the tasks that reach the
    parameter (zeros if none)."""
    total: Tensor | None = None
    for task, grad in grads:
        if grad is not None:
            total = grad * weights[task] if total is None else total + grad * weights[task]
    return torch.zeros_like(like) if total is None else total


def _summed(grads: tuple[Tensor | None, ...] | list[Tensor | None]) -> Tensor | None:
    """The sum of the gradients that are not ``None`` (``None`` if all are)."""
    present = [grad for grad in grads if grad is not None]
    if not present:
        return None
    return functools.reduce(torch.add, present)


def _nothing_shared(
    pl_module: MultiTaskMixin, rep_grad: bool, shared: list[torch.nn.Parameter]
) -> bool:
    """Whether no shared gradient exists this step: the representation takes no gradient
    (``rep_grad``), or no shared parameter is trainable (a frozen trunk)."""
    if rep_grad:
        representation = pl_module.shared_representation
        return representation is not None and not representation.output.requires_grad
    return not shared


def _shared_are_the_trunk(pl_module: L.LightningModule) -> bool:
    """Whether ``shared_parameters()`` are every trainable parameter outside ``self.heads``, and
    no head parameter is also the trunk's (tied weights): only then may parameter gradients go
    back from the representation, one task at a time (a trunk parameter left out of them would
    get no gradient); else one backward per task takes them."""
    heads = getattr(pl_module, "heads", None)
    if not isinstance(heads, torch.nn.Module):
        return False
    in_heads = {id(parameter) for parameter in heads.parameters()}
    named = pl_module.named_parameters(remove_duplicate=False)
    if any(id(p) in in_heads and not name.startswith("heads.") for name, p in named):
        return False  # a head's weight tied to the trunk's: its trunk side would go unweighed
    if not_overridden(pl_module, "shared_parameters"):  # type: ignore[arg-type]
        return True  # by definition, at every step (a trunk frozen now may train later)
    outside = {id(p) for p in pl_module.parameters() if p.requires_grad and id(p) not in in_heads}
    return outside == {id(parameter) for parameter in pl_module.shared_parameters()}  # type: ignore[operator]


def _representation(pl_module: MultiTaskMixin, method: str) -> SharedRepresentation:
    representation = pl_module.shared_representation
    if representation is None:
        raise RuntimeError(
            f"{method}(rep_grad=True) found no shared representation for this step: the model's "
            "task_losses must get its predictions from self.predict_tasks(inputs), which runs "
            "forward_shared and forward_heads and keeps the representation."
        )
    return representation


def _scaled_sum_over_ranks(tensor: Tensor, scale: float) -> Tensor:
    """``scale`` times the sum of ``tensor`` over the ranks: on one process, ``tensor`` itself."""
    if not distributed.is_distributed():
        return tensor
    return distributed.all_reduce_sum(tensor) * scale


def _scaled_sum_and_counts_over_ranks(
    tensor: Tensor, scale: float, flags: list[bool] | None
) -> tuple[Tensor, Tensor | None]:
    """:func:`_scaled_sum_over_ranks`, and on how many ranks each of ``flags`` is set (``None``
    on one process or without flags), in the same all-reduce: they travel after the values."""
    if flags is None or not distributed.is_distributed():
        return _scaled_sum_over_ranks(tensor, scale), None
    size = tensor.numel()
    packed = torch.cat(
        [
            tensor.reshape(-1),
            distributed.to_device([float(flag) for flag in flags], tensor, tensor.dtype),
        ]
    )
    packed = distributed.all_reduce_sum(packed)
    return packed[:size].view_as(tensor) * scale, packed[size:]


def _gramian(jacobian: Tensor) -> Tensor:
    """``J J^T``, in float32 at least (bf16 gradients give float32 weights)."""
    jacobian = jacobian.to(torch.promote_types(jacobian.dtype, torch.float32))
    return jacobian @ jacobian.T
