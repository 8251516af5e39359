"""``GradientWeighting``: the machinery every gradient-based weighting method shares.

Per step it takes the per-task gradients of the shared part in ONE batched backward
(``torch.autograd.grad(..., is_grads_batched=True)``), builds their K×K Gramian
``G[i, j] = <g_i, g_j>`` from global gradients, asks the method for weights ``w``, and hands
backward a surrogate whose gradient is ``d = sum_k w_k g_k`` on the shared part and each task's
own (statically weighted) gradient on its head — LibMTL's and torchjd's semantics.

Where the gradients are taken:

* ``rep_grad=False``: at the shared parameters (``pl_module.shared_parameters()``).
  ``sync="gradients"`` (default, exact) all-reduces the K×P Jacobian; ``sync="gramian"`` all-reduces
  only the K×K Gramian, averaging the ranks' local Gramians (an approximation: it misses the
  cross-rank terms of ``<g_i, g_j>``). The heads' per-task gradients come out of the same batched
  backward, and the surrogate is one autograd node that hands every parameter its gradient: the
  backward Lightning runs does no further work.
* ``rep_grad=True``: at the shared representation (MGDA-UB), far cheaper. The model defines
  ``forward_shared(inputs)`` and ``forward_heads(representation)``. Each rank's representation rows
  belong to its own samples, so the global Gramian is exactly the sum of the ranks' Gramians: one
  K×K all-reduce.

Either way the weights come from global figures and are identical on every rank. Methods solve a
small problem on the K×K Gramian on the host, which costs one device-to-host transfer per step.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_lossagg import distributed
from lightning_lossagg.aggregation import GlobalTaskLosses
from lightning_lossagg.weighting import WeightingCallback

Sync = Literal["gradients", "gramian"]


class GradientWeighting(WeightingCallback):
    """Base class of gradient-based methods; subclasses implement :meth:`weights_from_gramian`.

    Args:
        rep_grad: take gradients at the shared representation instead of the shared parameters.
        sync: with parameter gradients under DDP, ``"gradients"`` (exact) or ``"gramian"``
            (cheaper approximation); ignored with ``rep_grad=True``, which is always exact.
    """

    def __init__(self, rep_grad: bool = False, sync: Sync = "gradients") -> None:
        if sync not in ("gradients", "gramian"):
            raise ValueError(f"sync must be 'gradients' or 'gramian', got {sync!r}.")
        self.rep_grad = bool(rep_grad)
        self.sync = sync
        self._jacobian: Tensor | None = None
        self._shared_parameters: list[torch.nn.Parameter] = []
        self._head_parameters: list[torch.nn.Parameter] = []
        self._head_jacobians: tuple[Tensor, ...] = ()
        # The latest step's global Gramian and valid tasks, on the device: the diagnostics.
        self._gramian: Tensor | None = None
        self._gramian_valid: Tensor | None = None
        # The step's tasks with a valid sample (CPU): the rows of the Gramian a method sees.
        self.valid_tasks: Tensor | None = None

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        """Weights ``w`` from the global Gramian of the valid tasks (float64, on CPU): the tasks
        where :attr:`valid_tasks` is True, in order."""
        raise NotImplementedError

    @property
    @override
    def method_arguments(self) -> dict[str, Any]:
        return {"rep_grad": self.rep_grad, "sync": self.sync}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        name = type(self).__name__
        if not hasattr(pl_module, "shared_parameters"):
            raise TypeError(
                f"{name} needs a MultiTaskMixin model; add MultiTaskMixin to its bases."
            )
        if self.rep_grad:
            missing = [m for m in ("forward_shared", "forward_heads") if not hasattr(pl_module, m)]
            if missing:
                raise TypeError(
                    f"{name}(rep_grad=True) needs the model to split its forward: define "
                    f"{' and '.join(missing)} (forward_shared(inputs) -> representation, "
                    "forward_heads(representation) -> {task: prediction}), or use rep_grad=False."
                )
        elif not pl_module.shared_parameters():
            raise ValueError(
                f"{name} found no shared parameters: every trainable parameter is in a head. "
                "Gradient-based weighting needs a shared part; check shared_parameters()."
            )

    # ------------------------------------------------------------------------ the step
    @override
    def task_weights(self, pl_module: L.LightningModule, step: GlobalTaskLosses) -> Tensor:
        terms = step.local_terms
        world_size = distributed.world_size()
        if self.rep_grad:
            _, detached = pl_module.shared_representation  # type: ignore[misc]
            jacobian = _batched_grads(terms, [detached])
            # Rows of different ranks' representations are different coordinates of the global
            # gradient (scaled 1/W by DDP's averaging): the global Gramian is the sum.
            gramian = distributed.all_reduce_sum(_gramian(jacobian) / world_size**2)
        else:
            self._shared_parameters = pl_module.shared_parameters()  # type: ignore[operator]
            self._head_parameters = pl_module.task_specific_parameters()  # type: ignore[operator]
            # The heads' per-task gradients come out of the same backward: no second pass.
            grads = _per_task_grads(terms, self._shared_parameters + self._head_parameters)
            shared_grads = grads[: len(self._shared_parameters)]
            jacobian = torch.cat([g.reshape(len(terms), -1) for g in shared_grads], dim=1)
            self._head_jacobians = grads[len(self._shared_parameters) :]
            if self.sync == "gradients":
                jacobian = distributed.all_reduce_sum(jacobian) / world_size
                gramian = _gramian(jacobian)
            else:
                gramian = distributed.all_reduce_sum(_gramian(jacobian)) / world_size
        self._jacobian = jacobian
        self._gramian, self._gramian_valid = gramian.detach(), step.valid
        return self._weights_of_valid_tasks(gramian, step.valid).to(terms.device, terms.dtype)

    @override
    def state_to_log(self) -> dict[str, Tensor]:
        """``grad_norm``: each task's global gradient norm ``sqrt(G[k, k])`` (NaN for a task
        without a valid sample in the step). Subclasses that add state merge it with this."""
        if self._gramian is None:
            return {}
        norms = self._gramian.diagonal().clamp(min=0).sqrt()
        return {"grad_norm": torch.where(self._gramian_valid, norms, torch.nan)}

    @override
    def pairwise_state_to_log(self) -> dict[str, Tensor]:
        """``grad_cos``: the cosine similarity of every pair of task gradients, from the Gramian
        (NaN where a task had no valid sample or a zero gradient)."""
        if self._gramian is None:
            return {}
        norms = self._gramian.diagonal().clamp(min=0).sqrt()
        scale = torch.outer(norms, norms)
        defined = torch.outer(self._gramian_valid, self._gramian_valid) & (scale > 0)
        cosine = self._gramian / torch.where(defined, scale, 1.0)
        return {"grad_cos": torch.where(defined, cosine.clamp(-1.0, 1.0), torch.nan)}

    def _weights_of_valid_tasks(self, gramian: Tensor, valid: Tensor) -> Tensor:
        """The method's weights on the valid tasks' sub-Gramian; 0 for the others."""
        gramian, valid = gramian.detach().to("cpu", torch.float64), valid.cpu()
        self.valid_tasks = valid  # which tasks weights_from_gramian sees, for per-task settings
        if not valid.any() or not torch.isfinite(gramian).all():
            # Nothing to weigh, or a non-finite gradient: the mixin's non-finite policy decides
            # the step; equal weights keep the method's state untouched.
            return torch.where(valid, 1.0, 0.0).double()
        if valid.all():
            return self.weights_from_gramian(gramian).double()
        index = valid.nonzero().flatten()
        weights = torch.zeros(len(valid), dtype=torch.float64)
        weights[index] = self.weights_from_gramian(gramian[index][:, index]).double()
        return weights

    @override
    def backward_objective(
        self, pl_module: L.LightningModule, step: GlobalTaskLosses, weights: Tensor, static: Tensor
    ) -> Tensor:
        jacobian, self._jacobian = self._jacobian, None
        direction = weights.to(jacobian.dtype) @ jacobian  # d = sum_k w_k g_k
        if self.rep_grad:
            shared, _ = pl_module.shared_representation  # type: ignore[misc]
            pl_module.shared_representation = None
            # Heads: their own task's gradient (through the detached leaf). Shared trunk: d.
            heads_objective = (static * step.local_terms).sum()
            return heads_objective + (shared * direction.view_as(shared).detach()).sum()
        # Heads: their own task's gradient, sum_k s_k grad t_k (local: DDP averages it). Shared
        # parameters: d, split back into their shapes.
        head_jacobians, self._head_jacobians = self._head_jacobians, ()
        static = static.to(jacobian.dtype)
        head_grads = [(static @ g.flatten(1)).view(g.shape[1:]) for g in head_jacobians]
        sizes = [parameter.numel() for parameter in self._shared_parameters]
        shared_grads = [
            grad.view_as(parameter)
            for grad, parameter in zip(direction.split(sizes), self._shared_parameters, strict=True)
        ]
        parameters = self._shared_parameters + self._head_parameters
        return _InjectedGradients.apply(tuple(shared_grads + head_grads), *parameters)


class _InjectedGradients(torch.autograd.Function):
    """A zero whose gradient with respect to each input is a given tensor (times the incoming
    gradient: Lightning scales the loss for accumulation, AMP for its scaler). One autograd node
    instead of a product and a sum per parameter."""

    @staticmethod
    def forward(ctx: Any, grads: tuple[Tensor, ...], *inputs: Tensor) -> Tensor:
        ctx.grads = grads
        return inputs[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, ()
        return (None, *(grad * grad_output for grad in grads))


def _batched_grads(terms: Tensor, inputs: list[Tensor]) -> Tensor:
    """The K×P matrix of per-task gradients of ``terms`` with respect to ``inputs``, from ONE
    batched backward (no copy for a single input)."""
    grads = _per_task_grads(terms, inputs)
    if len(grads) == 1:
        return grads[0].reshape(len(terms), -1)
    return torch.cat([g.reshape(len(terms), -1) for g in grads], dim=1)


def _per_task_grads(terms: Tensor, inputs: list[Tensor]) -> tuple[Tensor, ...]:
    """Per input, the ``[K, *shape]`` per-task gradients of ``terms``, from ONE batched backward
    (vmap over the K unit vectors)."""
    eye = torch.eye(len(terms), dtype=terms.dtype, device=terms.device)
    return torch.autograd.grad(
        terms,
        inputs,
        grad_outputs=eye,
        is_grads_batched=True,
        retain_graph=True,
        allow_unused=True,
        materialize_grads=True,
    )


def _gramian(jacobian: Tensor) -> Tensor:
    """``J J^T``, in float32 at least (bf16 gradients give float32 weights)."""
    jacobian = jacobian.to(torch.promote_types(jacobian.dtype, torch.float32))
    return jacobian @ jacobian.T
