"""Argument and setting checks shared by the loss-based weighting callbacks."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from numbers import Integral, Real
from typing import cast

import lightning as L
from torch import Tensor

from lightning_lossagg import distributed
from lightning_lossagg.aggregation import GlobalTaskLosses, finite
from lightning_lossagg.mixin import MultiTaskMixin


def check_positive(name: str, value: float, fix: str) -> float:
    """``value`` as a float if it is a finite number > 0 (a NumPy scalar too), else a
    ValueError naming ``fix``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number > 0; got {value!r}. {fix}")
    if value <= 0:
        raise ValueError(f"`{name}` must be > 0; got {value!r}. {fix}")
    return float(value)


def check_non_negative(name: str, value: float, fix: str = "") -> float:
    """``value`` as a float if it is a finite number >= 0 (a NumPy scalar too), else a
    ValueError naming ``fix``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"`{name}` must be a finite number >= 0; got {value!r}. {fix}".rstrip())
    return float(value)


def check_int_at_least(name: str, value: int, minimum: int, fix: str = "") -> int:
    """``value`` as an int if it is an integer >= ``minimum`` (a NumPy one too), else a
    ValueError naming ``fix``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}; got {value!r}. {fix}".rstrip())
    return int(value)


def require_multitask(callback: L.Callback, pl_module: L.LightningModule) -> tuple[str, ...]:
    """The model's task names; a TypeError if the model does not use :class:`MultiTaskMixin`."""
    if not isinstance(pl_module, MultiTaskMixin):
        raise TypeError(
            f"{type(callback).__name__} needs a MultiTaskMixin model; "
            f"{type(pl_module).__name__} is not one. Add MultiTaskMixin to the model's bases."
        )
    return pl_module.task_names


def check_task_names(argument: str, names: Iterable[str], task_names: tuple[str, ...]) -> None:
    """A ValueError listing the model's tasks if ``names`` holds a name that is not one of them."""
    unknown = [name for name in names if name not in task_names]
    if unknown:
        raise ValueError(
            f"`{argument}` names {unknown}, which the model does not have; its tasks are "
            f"{list(task_names)}. Use those names."
        )


def usable_tasks(step: GlobalTaskLosses) -> Tensor:
    """Tasks whose global loss may update a method's state: a valid sample and a finite loss.

    A non-finite loss is the mixin's to report (``nonfinite``); it must not poison the state.
    """
    return finite(step.losses)  # NaN (not finite) for a task without a valid sample


class LossesReadLater:
    """Each step's global task losses, copied to the host without stalling the device and read
    at the optimizer step: :meth:`check` raises before a bad step updates the model, and costs no
    wait for the device in the hot path. The steps read at an optimizer step are that global
    step's batches (several under gradient accumulation).

    Args:
        method_takes: what the method does with the losses, the start of the error message.
        offends: whether a loss is one the method cannot take.
        bound: the offending values, for the message (e.g. ``"<= 0"``).
        fix: what to do, for the message.
        error: the exception raised.
    """

    def __init__(
        self,
        method_takes: str,
        offends: Callable[[float], bool],
        bound: str,
        fix: str,
        error: type[Exception] = ValueError,
    ) -> None:
        self._rule = (method_takes, offends, bound, fix, error)
        self._unread: list[distributed.HostCopy] = []

    def add(self, losses: Tensor) -> None:
        """Queue a step's losses."""
        self._unread.append(distributed.HostCopy(losses))

    def clear(self) -> None:
        self._unread = []

    def queued(self) -> list[distributed.HostCopy]:
        """The queue as it is, for a method's :meth:`~WeightingCallback.step_state`: a step put
        back leaves it as at the step's start."""
        return self._unread.copy()

    def put_back(self, queued: list[distributed.HostCopy]) -> None:
        """Put back what :meth:`queued` returned."""
        self._unread = queued.copy()

    def offending(self) -> list[Tensor]:
        """The queued losses that the check will refuse, on the host, for a checkpoint (one saved
        amid an optimizer step holds its earlier micro-batches'): the fit resumed from it queues
        them again (:meth:`queue_again`), and refuses them where the uninterrupted fit would."""
        unread = [copy.get() for copy in self._unread]
        return [losses.clone() for losses in unread if any(map(self._offends, losses.tolist()))]

    def queue_again(self, offending: Iterable[Tensor]) -> None:
        """Replace the queue with the losses :meth:`offending` gave a checkpoint."""
        self._unread = [distributed.HostCopy(losses) for losses in offending]

    def _offends(self, loss: float) -> bool:
        # A non-finite loss is the mixin's to report (nonfinite=...), with its own advice.
        return math.isfinite(loss) and self._rule[1](loss)

    def check(self, pl_module: L.LightningModule, global_step: int) -> None:
        """Read (and forget) every unread step; raise, naming the tasks of the first with a loss
        that offends, their values and ``global_step`` (the step whose batches were read), once
        the model has put back the state from before the step, unless the step was taken
        (:meth:`MultiTaskMixin.forget_unfinished_step`)."""
        model = cast(MultiTaskMixin, pl_module)  # required at setup
        method_takes, _, bound, fix, error = self._rule
        unread, self._unread = self._unread, []
        for copy in unread:
            pairs = zip(model.task_names, copy.get().tolist(), strict=True)
            bad = [f"{n!r} ({v:g})" for n, v in pairs if self._offends(v)]
            if bad:
                model.forget_unfinished_step()
                raise error(
                    f"{method_takes}, but the global loss of task(s) {', '.join(bad)} was "
                    f"{bound} at global step {global_step}. {fix}, or use another weighting "
                    "method."
                )
