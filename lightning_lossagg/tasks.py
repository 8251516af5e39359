"""Task specification and the registry of per-sample losses.

A task loss is always computed per sample (per element for element-wise losses, per position for
class maps), so that missing labels can be masked and ranks can be aggregated exactly.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_lossagg.representation import outside_autocast

PerSampleLossFn = Callable[[Tensor, Tensor], Tensor]


class MaskedLoss(NamedTuple):
    """Per-sample loss values and the mask of the samples that count.

    ``values`` and ``mask`` have the same shape; masked-out positions of ``values`` never reach
    the objective. Their gradient is 0 times their own derivative, though, which is NaN for a
    loss computed on the NaN of a missing label. So in training a NaN or infinite value under a
    False mask makes the task's loss non-finite, for the mixin's ``nonfinite`` policy, even where
    its derivative would happen to be finite; a finite value whose derivative is NaN (0/0, say)
    poisons the backward unseen. Compute the loss on a finite placeholder target at missing
    labels (``torch.where(mask, target, prediction.detach())``).
    """

    values: Tensor
    mask: Tensor


class ZeroMaskedLoss(MaskedLoss):
    """A :class:`MaskedLoss` whose values are exactly 0, and pass no gradient, wherever the mask
    is False and the prediction is finite, and non-finite where the prediction is not: their sums
    need no masking, and a non-finite prediction at a missing label is a non-finite loss (its
    gradient would be NaN however it were masked), which the mixin's ``nonfinite`` policy takes.

    The registry's losses give it: a distance (:data:`ZERO_AT_MATCH`) measures the prediction
    against itself at a missing label; the others are computed on a placeholder label there and
    multiplied by the mask. Values changed with ``_replace`` make a plain :class:`MaskedLoss`
    again, masked as usual.
    """

    __slots__ = ()

    def _replace(self, **changes: Tensor) -> MaskedLoss:  # type: ignore[override]
        return MaskedLoss(*self)._replace(**changes)


def _class_loss(fn: Callable[..., Tensor]) -> PerSampleLossFn:
    return partial(fn, reduction="none")  # no Python frame of its own on the hot path


def _probability_bce(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample ``binary_cross_entropy``, non-finite where the probability is (PyTorch's fails
    on a NaN probability: a device-side assert on CUDA), so the ``nonfinite`` policy takes it.
    Outside autocast, whose CUDA policy refuses ``binary_cross_entropy`` as unsafe in float16:
    the probability and the label come in float32 at least (see ``checked_per_sample_loss``)."""
    return outside_autocast(prediction.device.type, _finite_probability_bce, prediction, target)


def _finite_probability_bce(prediction: Tensor, target: Tensor) -> Tensor:
    placeholder = prediction.nan_to_num(nan=0.5, posinf=0.5, neginf=0.5)
    return F.binary_cross_entropy(placeholder, target, reduction="none") + prediction.detach() * 0


# Losses whose targets are class indices (missing labels marked with ``ignore_index``).
CLASS_LOSSES: dict[str, PerSampleLossFn] = {
    "cross_entropy": _class_loss(F.cross_entropy),
    "nll": _class_loss(F.nll_loss),
}

# Losses whose targets are floats (missing labels marked with NaN).
FLOAT_LOSSES: dict[str, PerSampleLossFn] = {
    "mse": _class_loss(F.mse_loss),
    "mae": _class_loss(F.l1_loss),
    "l1": _class_loss(F.l1_loss),
    "huber": _class_loss(F.huber_loss),
    "smooth_l1": _class_loss(F.smooth_l1_loss),
    "bce": _probability_bce,
    "bce_with_logits": _class_loss(F.binary_cross_entropy_with_logits),
}

LOSSES: dict[str, PerSampleLossFn] = {**CLASS_LOSSES, **FLOAT_LOSSES}

# Distances: loss(x, x) = 0 with a zero gradient. A missing target replaced by the prediction
# (detached) gives a value of exactly 0 that passes no gradient: see ZeroMaskedLoss.
ZERO_AT_MATCH = frozenset({"mse", "mae", "l1", "huber", "smooth_l1"})


class StackedLosses(Mapping[str, MaskedLoss]):
    """Per-sample losses of several tasks, computed a group at a time.

    ``groups`` holds ``(task indices, MaskedLoss of shape [G, ...])``; a group's first dimension
    runs over its tasks. Reading one task returns a view of its group. ``predictions`` holds each
    group's stacked predictions, the input of its loss (``None`` for a group of one task).
    """

    def __init__(
        self,
        names: tuple[str, ...],
        groups: list[tuple[list[int], MaskedLoss]],
        predictions: list[Tensor | None] | None = None,
    ):
        self.names, self.groups = names, groups
        self.predictions = predictions if predictions is not None else [None] * len(groups)

    def stop_gradients(self, tasks: Collection[int]) -> None:
        """Pass no gradient back through the rows of the task indices ``tasks``: a task left out
        of the step passes 0 times its loss's derivative, which is NaN at an infinite value
        (0 · ∞), back into the stacked predictions of its whole group. Zeroed there."""
        for (rows, _), predictions in zip(self.groups, self.predictions, strict=True):
            cut = [position for position, task in enumerate(rows) if task in tasks]
            if not cut or predictions is None or not predictions.requires_grad:
                continue
            keep = torch.ones(len(rows), dtype=torch.bool, device=predictions.device)
            keep[cut] = False
            keep = keep.view(-1, *(1,) * (predictions.ndim - 1))
            predictions.register_hook(partial(torch.where, keep, other=0.0))

    @cached_property
    def _where(self) -> dict[int, tuple[int, int]]:
        """Task index to (group, row): built only if a task is read on its own."""
        groups = self.groups
        return {
            index: (g, row) for g, (rows, _) in enumerate(groups) for row, index in enumerate(rows)
        }

    def __getitem__(self, name: str) -> MaskedLoss:
        group, row = self._where[self.names.index(name)]
        loss = values, mask = self.groups[group][1]
        return type(loss)(values[row], mask[row])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Task:
    """One task of a multi-task model.

    A missing label never counts in the task's loss. With a registry loss, a non-finite
    prediction there counts as a non-finite loss, as at a present label: its gradient would be
    NaN however it were masked (see :class:`ZeroMaskedLoss`). Float losses are computed in the
    prediction's dtype, at least float32 (a half-precision prediction is compared with the exact
    labels, as under autocast).

    Args:
        loss: a name from the registry (``mse``, ``mae``/``l1``, ``huber``, ``smooth_l1``,
            ``cross_entropy``, ``bce``, ``bce_with_logits``, ``nll``) or a callable
            ``(prediction, target) -> per-sample losses``, never a scalar: one value per label
            (the target's shape; it sees class 0 or 0.0 at a missing label, masked out after),
            or one value per sample of several labels (the target's leading dimensions, ``[N]``
            for ``[N, H, W]`` class maps). Such a callable gets class maps as they are and
            handles ``ignore_index`` itself; a map counts when one pixel is labelled (a map
            without any is all class 0). Its first call on a layout of dimensions, on
            class-0-filled maps, tells which kind it is; it is called once more then (side
            effects repeat). On float targets it sees 0.0 at NaN, and a sample counts when all
            its elements are labelled (a partly labelled one is left out; warned about when met
            at the first batch of a layout).
        weight: static weight; it multiplies any adaptive weight (a preference on top).
        reduction: ``"mean"`` over the valid samples of the global batch, or ``"sum"``.
        ignore_index: the class target that marks a missing label (float targets use NaN).
    """

    loss: str | PerSampleLossFn
    weight: float = 1.0
    reduction: Literal["mean", "sum"] = "mean"
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if isinstance(self.loss, str) and self.loss not in LOSSES:
            raise ValueError(
                f"Unknown loss {self.loss!r}. Use one of {sorted(LOSSES)} or pass a callable "
                "(prediction, target) -> per-sample losses."
            )
        if not isinstance(self.loss, str) and not callable(self.loss):
            raise TypeError(f"Task.loss must be a loss name or a callable, got {self.loss!r}.")
        if isinstance(self.loss, type):
            raise TypeError(
                f"Task.loss is the class {self.loss.__name__}; give an instance that returns "
                f"per-sample losses, e.g. {self.loss.__name__}(reduction='none')."
            )
        object.__setattr__(self, "weight", _finite_weight(self.weight))
        if self.weight < 0:
            raise ValueError(f"Task.weight must be >= 0, got {self.weight}.")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"Task.reduction must be 'mean' or 'sum', got {self.reduction!r}.")
        try:  # an int, or any integer (a NumPy or 0-d torch integer from a config or dataset)
            if isinstance(self.ignore_index, bool):
                raise TypeError
            object.__setattr__(self, "ignore_index", operator.index(self.ignore_index))
        except TypeError:
            raise TypeError(
                "Task.ignore_index must be an int, the class target that marks a missing label "
                f"(default -100), got {self.ignore_index!r}."
            ) from None
        if self.takes_float_targets and self.ignore_index != -100:
            raise ValueError(
                f"Task.ignore_index marks a missing class label; loss {self.loss!r} takes float "
                "targets: mark missing labels with NaN instead (e.g. "
                "`target[target == -1] = float('nan')`)."
            )
        # torch's own: in a partial's keywords, or a loss module's attribute (nn.CrossEntropyLoss,
        # nn.NLLLoss).
        if isinstance(self.loss, partial):
            theirs, where = self.loss.keywords.get("ignore_index"), "in its partial"
        else:
            theirs, where = getattr(self.loss, "ignore_index", None), "as its attribute"
        theirs = _integer_or_none(theirs)
        if theirs is not None and theirs != self.ignore_index:
            raise ValueError(
                f"Task.loss has torch's ignore_index={theirs} {where}, and "
                f"Task.ignore_index={self.ignore_index} marks the missing labels: the library "
                f"would count the labels {theirs} as present. Give Task(..., "
                f"ignore_index={theirs})."
            )

    @cached_property
    def loss_fn(self) -> PerSampleLossFn:
        """The per-sample loss function: the registry's, or :attr:`loss` itself."""
        return LOSSES[self.loss] if isinstance(self.loss, str) else self.loss

    @cached_property
    def takes_float_targets(self) -> bool:
        """A registry loss whose targets are floats (missing labels marked with NaN)."""
        return isinstance(self.loss, str) and self.loss in FLOAT_LOSSES

    @cached_property
    def _at_missing_labels(self) -> Literal["distance", "times_mask", "masked"]:
        """How a missing label's value is made: a distance measures the prediction against
        itself; the other registry losses take a placeholder label and are multiplied by the
        mask; a callable takes a placeholder label and the reducer masks its values."""
        if not isinstance(self.loss, str):
            return "masked"
        return "distance" if self.loss in ZERO_AT_MATCH else "times_mask"

    @property
    def zero_where_missing(self) -> bool:
        """Its per-sample losses are a :class:`ZeroMaskedLoss`: a registry loss."""
        return self._at_missing_labels != "masked"

    @property
    def loss_name(self) -> str:
        """The registry name, or the callable's qualified name (a partial's function's)."""
        if isinstance(self.loss, str):
            return self.loss
        function = self.loss.func if isinstance(self.loss, partial) else self.loss
        name = getattr(function, "__qualname__", type(function).__name__)
        return f"partial({name})" if isinstance(self.loss, partial) else name

    def per_sample_loss(self, name: str, prediction: Tensor, target: Tensor) -> MaskedLoss:
        """Per-sample losses of task ``name`` with missing labels masked out."""
        if not isinstance(prediction, Tensor) or not isinstance(target, Tensor):
            raise TypeError(
                f"Task {name!r}: prediction and target must be tensors, got "
                f"{type(prediction).__name__} and {type(target).__name__}."
            )
        self.check_target(name, prediction, target)
        return self.checked_per_sample_loss(name, prediction, target)

    def checked_per_sample_loss(self, name: str, prediction: Tensor, target: Tensor) -> MaskedLoss:
        """:meth:`per_sample_loss` of tensors that passed :meth:`check_target` (the mixin checks
        a layout of the batch once, not at every step)."""
        if self.takes_float_targets:
            if prediction.ndim == 0:  # a batch of one squeezed to a scalar: one sample still
                prediction = prediction.reshape(target.shape)
            elif target.shape != prediction.shape:  # dimensions of size 1 added or dropped
                target = target.reshape(prediction.shape)
            # In the prediction's dtype, at least float32: labels never rounded to half precision.
            dtype = torch.promote_types(prediction.dtype, torch.float32)
            if prediction.dtype != dtype:
                prediction = prediction.to(dtype)
            if target.dtype != dtype:
                target = target.to(dtype)
        elif prediction.ndim == 1 and target.ndim == 0 and isinstance(self.loss, str):
            # One sample's logits and class, squeezed: a batch of one.
            prediction, target = prediction.unsqueeze(0), target.unsqueeze(0)
        try:
            # Replace the missing targets before the loss: a NaN or an out-of-range class index
            # there would poison the gradient or fail the loss. A target on another device than
            # its prediction fails here.
            rule = self._at_missing_labels
            if target.is_floating_point():
                mask = target == target  # False exactly at NaN
                if rule == "distance":  # the prediction's distance to itself there: 0
                    clean = torch.where(mask, target, prediction.detach())
                    values = self.loss_fn(prediction, clean)
                else:
                    clean = target.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
                    values = self.loss_fn(prediction, clean)
                    if rule == "times_mask":
                        values = values * mask
                    elif (layout := (prediction.ndim, target.ndim)) not in self._value_ndims:
                        self._value_ndims[layout] = _tensor_values(name, self, values).ndim
                        if _reduces_samples(values.ndim, target.shape):
                            _warn_if_partly_labelled(name, self, mask, values.ndim)
            else:
                mask = self.valid_classes(target)
                if rule == "times_mask":
                    placeholder = torch.where(mask, target, 0)  # class 0 at a missing label
                    if placeholder.dtype != torch.long:  # a uint8 map: torch takes int64 maps
                        placeholder = placeholder.long()
                    values = self.loss_fn(prediction, placeholder)
                    # There 0 with no gradient, also where class 0's loss is infinite (a class
                    # ruled out with -inf, a probability of 0); NaN where the prediction is.
                    missing = values.detach().nan_to_num(nan=math.nan, posinf=0.0) * 0
                    values = torch.where(mask, values, missing)
                else:
                    values = self._callable_on_classes(name, prediction, target, mask)
        except (RuntimeError, ValueError, IndexError) as error:
            hint = ""
            if self.loss == "bce" and "between 0 and 1" in str(error):
                hint = (
                    " Loss 'bce' takes probabilities: apply a sigmoid to the prediction, or give "
                    "the logits to Task('bce_with_logits') (steadier, and safe under autocast)."
                )
            if not target.is_floating_point() and "out of bounds" in str(error):
                hint = (
                    f" Class targets are indices in [0, classes), and Task.ignore_index="
                    f"{self.ignore_index} marks a missing label: if your data marks them "
                    "otherwise (-1, say), give Task(..., ignore_index=-1)."
                )
            raise ValueError(
                f"Task {name!r}: loss {self.loss_name!r} failed on prediction of shape "
                f"{tuple(prediction.shape)} ({prediction.dtype}) and target of shape "
                f"{tuple(target.shape)} ({target.dtype}): {error}{hint}"
            ) from error
        if _tensor_values(name, self, values).shape != mask.shape or values.ndim == 0:
            mask = _mask_like(name, self, values, mask, classes=not target.is_floating_point())
        return ZeroMaskedLoss(values, mask) if self.zero_where_missing else MaskedLoss(values, mask)

    @cached_property
    def _value_ndims(self) -> dict[tuple[int, int], int]:
        """A callable's number of output dimensions per (prediction, target) dimensions, learnt
        at its first call on that layout."""
        return {}

    def _callable_on_classes(
        self, name: str, prediction: Tensor, target: Tensor, mask: Tensor
    ) -> Tensor:
        """A callable's values on class targets. One value per label: computed on class 0 at a
        missing label (masked out after). One value per sample of several labels (a class map
        reduced per image): on the maps as they are, ``ignore_index`` included, which the
        callable handles itself; a map without any label is all class 0 (left out after: its
        value and gradient stay finite). Which one it is, its first call on a layout of
        dimensions tells (on class-0-filled maps; then it is called once more)."""
        layout = (prediction.ndim, target.ndim)
        ndim = self._value_ndims.get(layout)
        if ndim is None:
            values = self.loss_fn(prediction, target.masked_fill(~mask, 0))
            ndim = self._value_ndims[layout] = _tensor_values(name, self, values).ndim
            if not _reduces_samples(ndim, target.shape):
                return values
            del values  # the second call must not hold the first one's graph too
        elif not _reduces_samples(ndim, target.shape):
            return self.loss_fn(prediction, target.masked_fill(~mask, 0))
        labelled = mask.flatten(ndim).any(dim=-1)
        labelled = labelled.view(labelled.shape + (1,) * (target.ndim - ndim))
        return self.loss_fn(prediction, torch.where(labelled, target, 0))

    def valid_classes(self, target: Tensor) -> Tensor:
        """Where an integer ``target`` holds a label: not :attr:`ignore_index` (everywhere when
        the target's dtype cannot hold it, such as -100 in ``uint8``, which would wrap around)."""
        if target.dtype != torch.bool:
            info = torch.iinfo(target.dtype)
            if info.min <= self.ignore_index <= info.max:
                return target != self.ignore_index
        return torch.ones_like(target, dtype=torch.bool)

    def stacking_key(self, prediction: Tensor, target: Tensor) -> tuple | None:
        """Tasks with equal keys can compute their per-sample losses in one stacked call (an
        element-wise registry loss on predictions and targets of one shape); ``None``: alone
        (a target whose dimensions of size 1 differ from its prediction's, too)."""
        if not self.takes_float_targets:
            return None
        if target.shape != prediction.shape:
            return None
        return (self.loss, prediction.shape, prediction.dtype, target.dtype, prediction.device)

    def check_target(self, name: str, prediction: Tensor, target: Tensor) -> None:
        """Refuse a target of the wrong dtype or size for a registry loss, naming the task."""
        if not isinstance(self.loss, str):
            return
        if self.loss in CLASS_LOSSES:
            if target.is_floating_point() or target.dtype == torch.bool:
                raise TypeError(
                    f"Task {name!r}: loss {self.loss!r} needs integer class targets, got "
                    f"{target.dtype}. Convert class indices with `.long()` and mark missing "
                    f"labels with ignore_index={self.ignore_index}; for soft labels (class "
                    "probabilities), give a function returning F.cross_entropy(logits, p, "
                    "reduction='none') as the loss."
                )
            if target.dtype not in (torch.long, torch.uint8):
                raise TypeError(
                    f"Task {name!r}: loss {self.loss!r} needs int64 class targets, got "
                    f"{target.dtype}. Convert them with `.long()`."
                )
            one_logit = prediction.ndim == 1 and target.shape == prediction.shape
            if one_logit or (prediction.ndim >= 2 and prediction.shape[1] == 1):
                raise ValueError(
                    f"Task {name!r}: loss {self.loss!r} on logits of shape "
                    f"{tuple(prediction.shape)}, one logit per sample: that is a binary task. "
                    "Give Task('bce_with_logits') float targets 0.0 or 1.0 (NaN for a missing "
                    "label), or the head one output per class."
                )
            if target.ndim == prediction.ndim >= 2 and target.shape[1] == 1:
                raise ValueError(
                    f"Task {name!r}: class targets of shape {tuple(target.shape)} for logits "
                    f"of shape {tuple(prediction.shape)}: give one class index per sample, "
                    "without the class dimension (`target.squeeze(1)`)."
                )
            if target.shape == prediction.shape and prediction.ndim >= 2:
                raise ValueError(
                    f"Task {name!r}: class targets of the logits' shape "
                    f"{tuple(prediction.shape)}: give one class index per sample (of one-hot "
                    "targets, `target.argmax(1)`)."
                )
        if self.loss in FLOAT_LOSSES:
            if not target.is_floating_point():
                raise TypeError(
                    f"Task {name!r}: loss {self.loss!r} needs float targets, got {target.dtype}. "
                    "Convert them with `.float()` and mark missing labels with NaN."
                )
            if not _shapes_pair(prediction.shape, target.shape):
                raise ValueError(
                    f"Task {name!r}: target of shape {tuple(target.shape)} does not match the "
                    f"prediction of shape {tuple(prediction.shape)} for loss {self.loss!r}. Give "
                    "a target of the prediction's shape; only dimensions of size 1 may differ "
                    "([B] against [B, 1], [B, H, W] against [B, 1, H, W])."
                )
            if self.loss == "bce_with_logits":
                self._check_probabilities(name, target)

    def _check_probabilities(self, name: str, target: Tensor) -> None:
        """Refuse targets outside [0, 1] for ``bce_with_logits`` (whose loss would fall without
        bound instead of failing), read on the host at the first batch of a layout."""
        layout = _layout(target)
        if layout in self._checked_layouts:
            return
        labelled = target[target.isfinite()]  # NaN: missing; ±inf: the nonfinite policy's
        if not labelled.numel():  # nothing to check yet: the next batch of the layout is checked
            return
        low, high = labelled.aminmax()
        if low < 0 or high > 1:
            raise ValueError(
                f"Task {name!r}: loss 'bce_with_logits' needs targets in [0, 1] (0/1 labels or "
                f"probabilities), got values from {low.item():g} to {high.item():g}. Scale them "
                "(a 0/255 mask: `target / 255`), use 'cross_entropy' for more than two classes, "
                "and mark missing labels with NaN."
            )
        self._checked_layouts.add(layout)

    def target_checked(self, target: Tensor) -> bool:
        """Whether :meth:`check_target` has checked targets of ``target``'s layout in full: a
        ``bce_with_logits`` batch without a label leaves the range of its values unchecked."""
        if self.loss != "bce_with_logits":
            return True
        return _layout(target) in self._checked_layouts

    @cached_property
    def _checked_layouts(self) -> set[tuple[object, ...]]:
        return set()


def _layout(target: Tensor) -> tuple[object, ...]:
    """What :meth:`Task.check_target` checks a ``bce_with_logits`` target's range once for."""
    return (target.shape, target.dtype, target.device)


def _tensor_values(name: str, task: Task, values: object) -> Tensor:
    """``values`` of a loss callable, refused unless a tensor, naming the task."""
    if not isinstance(values, Tensor):
        raise TypeError(
            f"Task {name!r}: loss {task.loss_name!r} returned a {type(values).__name__}; it must "
            "return a tensor of per-sample losses (torch's losses with reduction='none')."
        )
    return values


def _finite_weight(weight: object) -> float:
    """``Task.weight`` as a float: any finite real number (a NumPy or 0-d torch scalar too)."""
    if isinstance(weight, Tensor) and weight.numel() > 1:
        raise ValueError(
            f"Task.weight is the task's static weight, one number; got a tensor of shape "
            f"{tuple(weight.shape)}. For class weights, give them to the loss: "
            "Task(partial(F.cross_entropy, weight=class_weights, reduction='none'))."
        )
    try:
        if isinstance(weight, bool | str):
            raise TypeError
        value = float(weight)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"Task.weight must be a finite number, got {weight!r}.")
    return value


def _shapes_pair(prediction: torch.Size, target: torch.Size) -> bool:
    """Shapes equal but for dimensions of size 1 ([B] and [B, 1], [B, H, W] and [B, 1, H, W]):
    pairing the elements in order then pairs the same samples (any other reshape, a transposed
    [T, B] for a [B, T] say, would scramble them)."""
    return [size for size in prediction if size != 1] == [size for size in target if size != 1]


def _reduces_samples(ndim: int, target_shape: torch.Size) -> bool:
    """Values of ``ndim`` dimensions hold one value per sample of several target elements."""
    return 0 < ndim < len(target_shape) and math.prod(target_shape[ndim:]) > 1


def _warn_if_partly_labelled(name: str, task: Task, mask: Tensor, ndim: int) -> None:
    """Warn when a callable that reduces float samples met one with only some elements labelled
    (checked at the first batch of a layout only: it reads the mask on the host)."""
    per_sample = mask.flatten(ndim)
    if bool((per_sample.any(-1) & ~per_sample.all(-1)).any()):
        warnings.warn(
            f"Task {name!r}: loss {task.loss_name!r} returns one value per sample of targets of "
            f"shape {tuple(mask.shape)}, and some samples have only some elements labelled (the "
            "others NaN). Such a sample is left out whole (the callable sees its NaN as 0.0). To "
            "count its labelled elements, return one value per element.",
            stacklevel=2,
        )


def _mask_like(name: str, task: Task, values: Tensor, mask: Tensor, classes: bool) -> Tensor:
    """The mask at the shape of the per-sample values. A sample of several class labels counts
    when one of them is labelled (the callable saw ``ignore_index`` and handled it); a sample of
    several float elements when all of them are (the callable saw 0.0 at a missing one)."""
    if values.ndim == 0:
        raise ValueError(
            f"Task {name!r}: loss {task.loss_name!r} returned a scalar. Losses must return one "
            "value per sample (use reduction='none'); per-sample values are what makes masking "
            "and exact aggregation across ranks possible."
        )
    if mask.shape == values.shape:
        return mask
    if values.shape == mask.shape[: values.ndim]:
        per_sample = mask.flatten(values.ndim)
        return per_sample.any(dim=-1) if classes else per_sample.all(dim=-1)
    raise ValueError(
        f"Task {name!r}: loss {task.loss_name!r} returned values of shape "
        f"{tuple(values.shape)}, which does not match the target's shape {tuple(mask.shape)} or "
        "its leading dimensions."
    )


def _integer_or_none(value: object) -> int | None:
    """``value`` as an int if it is any integer (a NumPy or 0-d torch one too), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None
