"""The shared representation of a split forward, and the heads' own copies of it.

Gradient-based methods with a model that splits its forward (``forward_shared`` then
``forward_heads``) take per-task gradients below the heads. The heads read detached leaves of the
representation, so the trunk's graph is left alone until the method has its weights.

When the model keeps one head per task in ``self.heads`` (an ``nn.ModuleDict`` keyed by the task
names, no parameter in two heads) and the default ``task_losses``, each head reads a leaf of its
own, handed to it by a forward pre-hook. If task ``k``'s prediction reaches the representation
and the shared parameters only through head ``k``'s leaf, ONE backward pass of the summed loss
terms gives every task's representation gradient apart (task ``k``'s arrives at leaf ``k``) and
every head's parameter gradient; without it, each task needs a backward pass of its own. The
first step of a fit checks that reach once, with a backward pass per prediction; every step
checks that each head was called once, on the representation. Any other layout keeps one
backward pass per task: correct, slower.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn


class SharedRepresentation(NamedTuple):
    """One training step's representation.

    Attributes:
        output: ``forward_shared(inputs)``, with the trunk's graph.
        inputs: every detached leaf of ``output`` the heads read (the copy ``forward_heads`` was
            called with first): a task's representation gradient is the sum of its gradients
            at these leaves.
        per_task: task ``k``'s head's own leaf, in task order, when every task reaches the
            representation only through it (one backward pass serves all tasks); else ``None``.
    """

    output: Tensor
    inputs: tuple[Tensor, ...]
    per_task: tuple[Tensor, ...] | None = None


class TaskHeads(NamedTuple):
    """One head module per task, in task order, and each head's trainable parameters."""

    modules: list[nn.Module]
    parameters: list[list[nn.Parameter]]


def find_task_heads(model: Any) -> TaskHeads | None:
    """``model.heads`` as one module per task, if it is an ``nn.ModuleDict`` keyed by the task
    names whose heads share no parameter and hold exactly ``model.task_specific_parameters()``;
    else ``None``."""
    heads = getattr(model, "heads", None)
    if not isinstance(heads, nn.ModuleDict) or set(heads.keys()) != set(model.task_names):
        return None
    modules = [heads[name] for name in model.task_names]
    parameters = [[p for p in module.parameters() if p.requires_grad] for module in modules]
    owned = [id(p) for group in parameters for p in group]
    specific = {id(p) for p in model.task_specific_parameters()}
    if len(set(owned)) != len(owned) or set(owned) != specific:
        return None
    return TaskHeads(modules, parameters)


class HeadInputs:
    """While entered, head ``k`` reads ``leaves[k]``, a leaf of its own, in place of the
    representation. ``one_call_each`` says whether every head was called exactly once, on the
    representation (a head called again, or on anything else, keeps what it was given)."""

    def __init__(self, heads: Sequence[nn.Module], representation: Tensor) -> None:
        self._heads = heads
        self._representation = representation
        self.leaves: list[Tensor | None] = [None] * len(heads)
        self.one_call_each = True
        self._handles: list[Any] = []

    def __enter__(self) -> HeadInputs:
        self._handles = [
            head.register_forward_pre_hook(functools.partial(self._own_leaf, index))
            for index, head in enumerate(self._heads)
        ]
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.one_call_each = self.one_call_each and all(leaf is not None for leaf in self.leaves)

    def _own_leaf(self, index: int, module: nn.Module, args: tuple[Any, ...]) -> Any:
        if self.leaves[index] is not None or not args or args[0] is not self._representation:
            self.one_call_each = False
            return None
        leaf = self._representation.detach().requires_grad_()
        self.leaves[index] = leaf
        return (leaf, *args[1:])

    def created(self) -> tuple[Tensor, ...]:
        """The leaves handed out."""
        return tuple(leaf for leaf in self.leaves if leaf is not None)


def reach_only_own_heads(
    predictions: Mapping[str, Any],
    task_names: Sequence[str],
    leaves: Sequence[Tensor],
    others: Sequence[Tensor],
) -> str | None:
    """Checks, with one backward pass per prediction, that task ``k``'s prediction reaches none
    of ``leaves`` but ``leaves[k]`` and none of ``others`` (the representation itself, the shared
    parameters). Returns what breaks it (``None``: nothing)."""
    for index, name in enumerate(task_names):
        prediction = predictions.get(name)
        if not isinstance(prediction, Tensor) or not prediction.is_floating_point():
            return f"the prediction of task {name!r} is not a floating-point tensor"
        if not prediction.requires_grad:
            continue
        inputs = [*leaves, *others]
        grads = torch.autograd.grad(
            prediction,
            inputs,
            torch.ones_like(prediction),
            retain_graph=True,
            allow_unused=True,
        )
        reached = [i for i, grad in enumerate(grads) if grad is not None and i != index]
        if reached:
            where = reached[0]
            what = (
                f"the head of task {task_names[where]!r}"
                if where < len(leaves)
                else "the representation or a shared parameter outside the heads"
            )
            return f"the prediction of task {name!r} depends on {what}"
    return None
