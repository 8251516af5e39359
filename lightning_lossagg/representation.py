"""The shared representation of a split forward, and the heads' own copies of it.

Gradient-based methods with a model that splits its forward (``forward_shared`` then
``forward_heads``) take per-task gradients below the heads. ``forward_heads`` is called with a
detached leaf of the representation, so nothing reaches the trunk but what the method sends.

When the model keeps one head per task in ``self.heads`` (an ``nn.ModuleDict`` keyed by the task
names, no parameter in two heads) and the default ``task_losses``, each head reads a copy of its
own, handed to it by a forward pre-hook: a view from :class:`GradientsAtHeads`, whose node
receives every task's gradient apart in the backward Lightning runs and hands the method's
gradient on, or (for methods that need the weights before backward) a leaf, from which ONE
autograd pass of the summed loss terms gives every task's gradient apart. Both need task ``k``'s
prediction to reach the representation and the shared parameters only through head ``k``'s
copy: the first step of a fit checks that once, walking each prediction's graph down to the
copies; every step checks that each head was called once, on the representation. Any other
layout keeps one backward pass per task: correct, slower.

When every head is an ``nn.Linear`` on a 2-D representation, view ``k``'s gradient is
``D_k W_k``: the gradient at the head's output times its weight. A method that asks for them
(:meth:`GradientsAtHeads.linear_factors`) gets these factors from a hook on each head's output
node, and builds the Gramian and the update from them (``N × O`` and ``O × H`` for ``O`` head
outputs) instead of from K gradients of ``N × H`` each; the first step checks, once, that each
view reaches its prediction only through its head's linear map, on views of a copy of the
representation whose graph is dropped (random draws and buffer updates undone). From then on,
that first step included (outside autocast), the heads are not called on views at all:
:class:`FusedLinearHeads` hands them their outputs from ONE autograd node
(:meth:`GradientsAtHeads.linear_heads`) whose backward gets every head's output gradient, gives
the heads their parameters' gradients and the method the factors,
and sends on the update: no per-task gradient at the representation is ever made.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_T = TypeVar("_T")


class SharedRepresentation(NamedTuple):
    """One training step's representation.

    Attributes:
        output: ``forward_shared(inputs)``, with the trunk's graph.
        inputs: every detached leaf of ``output`` the heads read (the copy ``forward_heads`` was
            called with first): a task's representation gradient is the sum of its gradients
            at these leaves.
        per_task: task ``k``'s head's own copy of the representation, in task order, when every
            task reaches the representation only through it (one backward pass serves all
            tasks); else ``None``.
        split: set when the heads' copies are the views of a :class:`GradientsAtHeads`: the
            backward Lightning runs then hands it every task's gradient (with ``output``'s
            graph, the trunk's, for a receiver that takes parameter gradients).
    """

    output: Tensor
    inputs: tuple[Tensor, ...]
    per_task: tuple[Tensor, ...] | None = None
    split: GradientsAtHeads | None = None


# Receives, in backward, every task's gradient at the representation (each times the incoming
# factor, see GradientsAtHeads) and that factor; returns the gradients of what the views were
# made of: the representation, and the parameters passed along.
Receiver = Callable[[tuple[Tensor, ...], Tensor], tuple[Tensor | None, tuple[Tensor | None, ...]]]


class GradientsAtHeads:
    """Per-task gradients at the representation from the backward pass Lightning runs anyway.

    :meth:`views` gives head ``k`` a view of the representation of its own, so the gradient of
    the objective arriving at view ``k`` is task ``k``'s alone (its term's weight times the
    factor the loss was scaled by before backward: accumulation, AMP). Armed by :meth:`objective`
    with a receiver, the views' backward node calls it with the K gradients and that factor and
    sends on what it returns: a gradient for the representation (the trunk below it), and one
    for each parameter passed to :meth:`views` (a receiver that takes the trunk's gradients
    itself); unarmed, it sends nothing (the trunk gets its gradient some other way). One engine
    call serves heads, weights and trunk, as in a plain step.
    """

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self._receiver: Receiver | None = None
        self._factor: Tensor | None = None
        # Set by a receiver that can use linear heads' factors (see linear_factors).
        self.wants_linear_factors = False
        # Per head: the autograd node that made its output and which of the node's outputs it is.
        self.linear_outputs: list[tuple[Any, int] | None] = [None] * num_tasks
        self._linear_weights: list[Tensor | None] = [None] * num_tasks
        self._output_grads: list[Tensor | None] = [None] * num_tasks
        # Set by a receiver whose method weighs the heads too (Nash-MTL): head k's gradients
        # times head_scales[k] (on the device), applied by linear_heads' node.
        self.head_scales: Tensor | None = None

    def views(
        self, representation: Tensor, parameters: Sequence[Tensor] = ()
    ) -> tuple[Tensor, ...]:
        """One view of ``representation`` per task, joined in backward."""
        return _Views.apply(self, representation, *parameters)

    def linear_heads(
        self, representation: Tensor, heads: Sequence[nn.Linear]
    ) -> tuple[Tensor, ...]:
        """Every head's output on ``representation`` from ONE autograd node, for a receiver that
        takes :meth:`linear_factors`: its backward gives the heads' parameters their gradients
        (as ``nn.Linear`` would), hands the heads' output gradients to the armed receiver and
        sends on the representation gradient it returns. No view and no per-task gradient at
        the representation is ever made."""
        self.wants_linear_factors = True
        self._linear_weights = [head.weight for head in heads]
        parameters = [p for head in heads for p in (head.weight, head.bias)]
        return _LinearHeads.apply(self, representation, *parameters)

    def objective(self, objective: Tensor, receiver: Receiver) -> Tensor:
        """``objective`` itself, whose backward records the incoming factor; arms ``receiver``."""
        self._receiver = receiver
        return _IncomingFactor.apply(self, objective)

    def watch_linear_head(self, index: int, head: nn.Linear, output: Tensor) -> None:
        """Head ``index`` is an ``nn.Linear`` that read its view: keep its weight and, in
        backward, the gradient at its output (at the node that made it, whatever is done to
        the output in place later), whose product is the view's gradient."""
        node = output.grad_fn
        if node is None:
            return
        self.linear_outputs[index] = (node, output.output_nr)
        self._linear_weights[index] = head.weight
        node.register_prehook(functools.partial(self._keep_output_grad, index))

    def _keep_output_grad(self, index: int, grad_outputs: tuple[Tensor, ...]) -> None:
        self._output_grads[index] = grad_outputs[0]

    def take_linear_outputs(self) -> list[tuple[Any, int] | None]:
        """The watched heads' output nodes (for :func:`linear_heads_factor`), no longer kept:
        they hold the step's graph, which holds this object."""
        outputs, self.linear_outputs = self.linear_outputs, [None] * self.num_tasks
        return outputs

    def forget_linear_heads(self) -> None:
        """Use no linear factors this step (the heads' layout does not allow them)."""
        self.wants_linear_factors = False
        self._linear_weights = [None] * self.num_tasks

    def linear_factors(self) -> tuple[Tensor, Tensor, list[int]] | None:
        r"""In the views' backward, when every head is an ``nn.Linear`` on its view (checked by
        :func:`linear_heads_factor`): ``(D, W, sizes)`` with view ``k``'s gradient
        :math:`D_k W_k`, the heads' output gradients :math:`D = [D_1 \dots D_K]` (N × O) and
        weights :math:`W = [W_1; \dots; W_K]` (O × H) in blocks of ``sizes`` (each head's
        outputs; under autocast the weights in the gradients' dtype, as the heads used them).
        ``None`` when a factor is missing (a head's output took no part in the objective)."""
        grads, weights = self._output_grads, self._linear_weights
        self._output_grads = [None] * self.num_tasks
        if not self.wants_linear_factors or any(g is None for g in grads + weights):
            return None
        dtype = grads[0].dtype  # type: ignore[union-attr]
        sizes = [w.shape[0] for w in weights]  # type: ignore[union-attr]
        return torch.cat(grads, dim=1), torch.cat(weights).to(dtype), sizes  # type: ignore[arg-type]


class _IncomingFactor(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, split: GradientsAtHeads, objective: Tensor) -> Tensor:
        ctx.split = split
        return objective.view_as(objective)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[None, Tensor]:
        ctx.split._factor = grad_output
        return None, grad_output


class _LinearHeads(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, split: GradientsAtHeads, representation: Tensor, *parameters: Tensor | None
    ) -> tuple[Tensor, ...]:
        weights, biases = parameters[0::2], parameters[1::2]
        ctx.split, ctx.has_bias = split, [bias is not None for bias in biases]
        ctx.save_for_backward(representation, *weights)
        return tuple(
            F.linear(representation, w, b)  # type: ignore[arg-type]  # weights are never None
            for w, b in zip(weights, biases, strict=True)
        )

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        representation, *_ = ctx.saved_tensors
        split = ctx.split
        receiver, factor = split._receiver, split._factor
        split._receiver = split._factor = None
        representation_grad = None
        if receiver is not None and factor is not None:
            split._output_grads = list(grads)
            representation_grad, _ = _received(receiver, (), factor)
        scales, split.head_scales = split.head_scales, None
        if scales is not None:
            grads = tuple(grad * scale for grad, scale in zip(grads, scales.unbind(), strict=True))
        needs = ctx.needs_input_grad
        parameter_grads: list[Tensor | None] = []
        for index, (grad, has_bias) in enumerate(zip(grads, ctx.has_bias, strict=True)):
            weight_needed, bias_needed = needs[2 + 2 * index], needs[3 + 2 * index]
            parameter_grads.append(grad.t() @ representation if weight_needed else None)
            parameter_grads.append(grad.sum(0) if has_bias and bias_needed else None)
        return (None, representation_grad, *parameter_grads)


class _Views(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, split: GradientsAtHeads, representation: Tensor, *parameters: Tensor
    ) -> tuple[Tensor, ...]:
        ctx.split, ctx.num_parameters = split, len(parameters)
        return tuple(representation.view_as(representation) for _ in range(split.num_tasks))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        split = ctx.split
        receiver, factor = split._receiver, split._factor
        split._receiver = split._factor = None
        if receiver is None or factor is None:
            return (None, None, *[None] * ctx.num_parameters)
        representation_grad, parameter_grads = _received(receiver, grads, factor)
        return (None, representation_grad, *parameter_grads)


def _received(
    receiver: Receiver, grads: tuple[Tensor, ...], factor: Tensor
) -> tuple[Tensor | None, tuple[Tensor | None, ...]]:
    """What ``receiver`` makes of the gradients, outside autocast: under manual optimization
    the backward runs inside the training step's autocast, whose float16 products would
    overflow the Gramian (and bfloat16's round it)."""
    return outside_autocast(factor.device.type, receiver, grads, factor)


def outside_autocast(device: str, function: Callable[..., _T], *args: Any) -> _T:
    """``function(*args)`` with autocast off on ``device`` (a weighting's arithmetic in the
    figures' own dtype); as it is, without a context, when autocast is off already."""
    if not torch.is_autocast_enabled(device):
        return function(*args)
    with torch.autocast(device, enabled=False):
        return function(*args)


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
    """While entered, head ``k`` reads ``views[k]`` or, without views, a new leaf of its own, in
    place of the representation. ``one_call_each`` says whether every head was called exactly
    once, on the representation (a head called again, or on anything else, keeps what it was
    given). With ``watch``, each head's output on its view is handed to
    :meth:`GradientsAtHeads.watch_linear_head`."""

    def __init__(
        self,
        heads: Sequence[nn.Module],
        representation: Tensor,
        views: Sequence[Tensor] | None = None,
        watch: GradientsAtHeads | None = None,
    ) -> None:
        self._heads = heads
        self._representation = representation
        self._views = views
        self._watch = watch
        self.leaves: list[Tensor | None] = [None] * len(heads)
        self.one_call_each = True
        self._handles: list[Any] = []

    def __enter__(self) -> HeadInputs:
        self._handles = [
            head.register_forward_pre_hook(functools.partial(self._own_leaf, index))
            for index, head in enumerate(self._heads)
        ]
        if self._watch is not None:
            self._handles += [
                head.register_forward_hook(functools.partial(self._watch_output, index))
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
        if self._views is None:
            leaf = self._representation.detach().requires_grad_()
        else:
            leaf = self._views[index]
        self.leaves[index] = leaf
        return (leaf, *args[1:])

    def _watch_output(
        self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any
    ) -> None:
        if self._watch is not None and args and args[0] is self.leaves[index]:
            self._watch.watch_linear_head(index, module, output)  # type: ignore[arg-type]

    def created(self) -> tuple[Tensor, ...]:
        """The copies handed out."""
        return tuple(leaf for leaf in self.leaves if leaf is not None)


class FusedLinearHeads:
    """While entered, linear head ``k`` called on ``leaf`` returns output ``k`` of
    :meth:`GradientsAtHeads.linear_heads` on ``representation`` (made at the first call), instead
    of computing its own. ``one_call_each`` says whether every head was called exactly once, on
    ``leaf`` (a head called again, or on anything else, computes as usual)."""

    def __init__(
        self,
        heads: Sequence[nn.Linear],
        leaf: Tensor,
        representation: Tensor,
        split: GradientsAtHeads,
    ) -> None:
        self._heads = heads
        self._leaf = leaf
        self._representation = representation
        self._split = split
        self._outputs: tuple[Tensor, ...] | None = None
        self._called = [False] * len(heads)
        self.one_call_each = True

    def __enter__(self) -> FusedLinearHeads:
        for index, head in enumerate(self._heads):
            head.forward = functools.partial(self._output, index)  # type: ignore[method-assign]
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for head in self._heads:
            del head.forward
        self.one_call_each = self.one_call_each and all(self._called)

    def _output(self, index: int, input: Tensor) -> Tensor:
        head = self._heads[index]
        if self._called[index] or input is not self._leaf:
            self.one_call_each = False
            return nn.Linear.forward(head, input)
        self._called[index] = True
        if self._outputs is None:
            self._outputs = self._split.linear_heads(self._representation, self._heads)
        return self._outputs[index]


def reach_only_own_heads(
    predictions: Mapping[str, Any],
    task_names: Sequence[str],
    own: Sequence[Tensor],
    others: Sequence[Tensor],
) -> str | None:
    """Checks that task ``k``'s prediction reaches none of ``own`` (the heads' copies of the
    representation) but ``own[k]``, and none of ``others`` (the representation the heads were
    called with, the shared parameters) except through ``own[k]``: a walk of each prediction's
    graph that stops at the heads' copies, so it never enters the trunk. Returns what breaks it
    (``None``: nothing)."""
    owners = {_position(tensor): index for index, tensor in enumerate(own)}
    foreign = {_position(tensor) for tensor in others}
    for index, name in enumerate(task_names):
        prediction = predictions.get(name)
        if not isinstance(prediction, Tensor) or not prediction.is_floating_point():
            return f"the prediction of task {name!r} is not a floating-point tensor"
        if not prediction.requires_grad:
            continue
        for position in _reachable(_position(prediction), owners.__contains__):
            owner = owners.get(position)
            if owner is not None and owner != index:
                head = f"the head of task {task_names[owner]!r}"
                return f"the prediction of task {name!r} depends on {head}"
            if position in foreign:
                return (
                    f"the prediction of task {name!r} depends on the representation or a shared "
                    "parameter outside the heads"
                )
    return None


def linear_heads_factor(
    predictions: Mapping[str, Any],
    task_names: Sequence[str],
    views: Sequence[Tensor],
    outputs: Sequence[tuple[Any, int] | None],
) -> bool:
    """Whether view ``k``'s gradient is the gradient at head ``k``'s output times its weight:
    the node that made the output (``outputs[k]``: node and output number, of an ``nn.Linear``
    on a 2-D view) reads view ``k`` itself, and task ``k``'s prediction reaches view ``k`` only
    through it. A walk of each prediction's graph that stops at that node and at the views."""
    for index, name in enumerate(task_names):
        output, view = outputs[index], _position(views[index])
        if output is None or views[index].dim() != 2:
            return False
        node = output[0]
        if view not in {_edge(n, number) for n, number in node.next_functions if n is not None}:
            return False
        prediction = predictions[name]
        if not prediction.requires_grad:
            return False
        stops = {_position(other) for other in views} | {output}
        if view in _reachable(_position(prediction), stops.__contains__):
            return False
    return True


def _reachable(start: tuple[Any, int], stop: Callable[[tuple[Any, int]], bool]) -> Iterator[Any]:
    """The :func:`_position` of every tensor ``start`` depends on, each once: a walk of the
    autograd graph that goes past neither a leaf nor a position where ``stop`` is true."""
    stack, seen = [start], {start}
    while stack:
        position = stack.pop()
        yield position
        node = position[0]
        if stop(position) or isinstance(node, str):
            continue
        for next_node, number in node.next_functions:
            if next_node is not None:
                following = _edge(next_node, number)
                if following not in seen:
                    seen.add(following)
                    stack.append(following)


def _position(tensor: Tensor) -> tuple[Any, int]:
    """Where ``tensor`` sits in the autograd graph: its node and output, or (for a leaf) the
    leaf itself."""
    if tensor.grad_fn is None:
        return ("leaf", id(tensor))
    return (tensor.grad_fn, tensor.output_nr)


def _edge(node: Any, number: int) -> tuple[Any, int]:
    """:func:`_position` of the tensor an edge of the graph leads to."""
    variable = getattr(node, "variable", None)  # a leaf's gradient accumulator
    if variable is not None:
        return ("leaf", id(variable))
    return (node, number)
