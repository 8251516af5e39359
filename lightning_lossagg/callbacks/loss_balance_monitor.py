"""``LossBalanceMonitor``: a warning when one task's trouble hides behind the objective."""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_lossagg.callbacks._balance_window import CONDITIONS, LossWindow, Thresholds
from lightning_lossagg.callbacks._checks import check_int_at_least
from lightning_lossagg.callbacks._direct_log import write_metrics
from lightning_lossagg.callbacks._records import StepRecords, optimizer_step_record
from lightning_lossagg.weighting import check_checkpoint_tasks


class LossBalanceError(RuntimeError):
    """A condition named in ``LossBalanceMonitor(raise_on=...)`` held (raised on every rank)."""


class LossBalanceMonitor(L.Callback):
    """Warns (rank zero, once per condition and task until it clears) when, for a task:

    * ``dominance``: its weighted share of the objective stayed above ``dominance_threshold`` at
      every step of the last ``window`` training steps;
    * ``rising_loss``: its loss rose while the objective fell over the last ``window`` steps (the
      mean of the later half above the earlier half's by more than ``rise_tolerance``, relative,
      and by more than 3 standard errors of the difference; the objective's fall by the same
      test);
    * ``weight_collapse``: its mean weight over the last ``window`` steps fell below
      ``collapse_fraction`` times its mean weight over the first ``window`` steps;
    * ``weight_explosion``: that mean weight rose above ``explosion_factor`` times the first one,
      or the weight stopped being finite;
    * ``nonfinite_loss``: its loss was NaN or infinite at a step with valid samples (with a policy
      of the mixin that lets training go on).

    Steps where a task has no valid sample do not count for its means. The window lives on the
    device; the conditions are evaluated every ``check_every_n_steps`` training steps with one
    host transfer, never per step. They are also logged, at the trainer's logging interval, as
    ``train/monitor/<condition>/<task>`` (1 while the condition holds, else 0).

    Args:
        dominance_threshold: the share of the objective, in (0, 1), that counts as dominating.
        window: training steps a condition is judged over (at least 2).
        check_every_n_steps: evaluate every this many training steps (default: the trainer's
            ``log_every_n_steps``, also without a logger, or ``window`` where it is 0).
        rise_tolerance: relative rise of a task's loss (>= 0) that counts as rising.
        collapse_fraction: the fraction, in (0, 1), of its first weight a weight collapses below.
        explosion_factor: the multiple (> 1) of its first weight a weight explodes above.
        raise_on: conditions that raise :class:`LossBalanceError` instead of warning, e.g.
            ``["nonfinite_loss", "weight_collapse"]`` for the CI of a training job.

    Example:
        >>> monitor = LossBalanceMonitor(window=200, raise_on=["nonfinite_loss"])
    """

    def __init__(
        self,
        dominance_threshold: float = 0.9,
        window: int = 100,
        check_every_n_steps: int | None = None,
        rise_tolerance: float = 0.1,
        collapse_fraction: float = 0.01,
        explosion_factor: float = 100.0,
        raise_on: Iterable[str] = (),
    ) -> None:
        _check_number("dominance_threshold", dominance_threshold, 0.0, 1.0)
        _check_number("rise_tolerance", rise_tolerance, 0.0, math.inf, closed_low=True)
        _check_number("collapse_fraction", collapse_fraction, 0.0, 1.0)
        _check_number("explosion_factor", explosion_factor, 1.0, math.inf)
        window = check_int_at_least("window", window, 2)
        if check_every_n_steps is not None:
            check_every_n_steps = check_int_at_least("check_every_n_steps", check_every_n_steps, 1)
        self.raise_on = _check_conditions(raise_on)
        self.window = window
        self.check_every_n_steps = check_every_n_steps
        self.thresholds = Thresholds(
            float(dominance_threshold),
            float(rise_tolerance),
            float(collapse_fraction),
            float(explosion_factor),
        )
        self._history = LossWindow(window)
        self._every = check_every_n_steps or window
        self._evaluates = True
        self._active: set[tuple[str, str]] = set()
        self._flags: dict[str, float] = {}
        self._skipped_steps = 0
        # The optimizer step's micro-batches so far (restored ones from a checkpoint amid it).
        self._steps = StepRecords()
        self._state_key: str | None = None

    @property
    @override
    def state_key(self) -> str:
        # Cached: Lightning reads it on every hook call, and the arguments never change.
        if self._state_key is None:
            # check_every_n_steps and raise_on only where set: a default monitor keeps the key
            # of the checkpoints written before they were in it.
            settings: dict[str, Any] = {"window": self.window, **vars(self.thresholds)}
            if self.check_every_n_steps is not None:
                settings["check_every_n_steps"] = self.check_every_n_steps
            if self.raise_on:
                settings["raise_on"] = sorted(self.raise_on)
            self._state_key = self._generate_state_key(**settings)
        return self._state_key

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "loss_record"):
            raise TypeError(
                f"LossBalanceMonitor needs a MultiTaskMixin model; {type(pl_module).__name__} is "
                "not one. Add MultiTaskMixin to the model's bases."
            )
        # Lightning's logger connector sets trainer.log_every_n_steps.
        self._every = self.check_every_n_steps or trainer.log_every_n_steps or self.window  # type: ignore[attr-defined]
        # The records are global, so every rank reaches the same verdict: ranks other than zero
        # evaluate only to raise together with it.
        self._evaluates = trainer.is_global_zero or bool(self.raise_on)
        self._skipped_steps = getattr(pl_module, "skipped_steps", 0)
        self._steps.pending = []  # an earlier fit may have stopped amid a step
        names: tuple[str, ...] = pl_module.task_names  # type: ignore[assignment]
        self._flags = {f"train/monitor/{c}/{n}": 0.0 for c in CONDITIONS for n in names}

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if not self._evaluates:
            return
        if getattr(pl_module, "skipped_steps", 0) != self._skipped_steps:
            self._mark_nonfinite(pl_module)
        # One figure per optimizer step; a step skipped for a non-finite loss: none, its finite
        # micro-batches stay out too.
        _, records = self._steps.end_batch(trainer, pl_module)
        if not records:
            return
        names: tuple[str, ...] = pl_module.task_names  # type: ignore[assignment]
        self._history.add(optimizer_step_record(records, names))
        if self._history.seen % self._every == 0:
            self._check(trainer, names)
        if trainer._logger_connector.should_update_logs and trainer.loggers:
            write_metrics(trainer, self._flags)

    def _mark_nonfinite(self, pl_module: L.LightningModule) -> None:
        """A step was skipped or left tasks out (``nonfinite="skip"``/``"drop_task"``): its
        non-finite losses never reach a record, so the mixin names the tasks."""
        self._skipped_steps = getattr(pl_module, "skipped_steps", 0)
        names: tuple[str, ...] = pl_module.task_names  # type: ignore[assignment]
        bad: tuple[str, ...] = pl_module.last_nonfinite_tasks  # type: ignore[assignment]
        self._history.mark_nonfinite([names.index(name) for name in bad])

    def _check(self, trainer: L.Trainer, names: tuple[str, ...]) -> None:
        flags, values = self._history.evaluate(self.thresholds)
        for condition, condition_flags, condition_values in zip(
            CONDITIONS, flags, values, strict=True
        ):
            for name, holds, value in zip(names, condition_flags, condition_values, strict=True):
                if holds is None:  # not judged yet: the window is not full
                    continue
                self._flags[f"train/monitor/{condition}/{name}"] = float(holds)
                key = (condition, name)
                if not holds:
                    self._active.discard(key)
                    continue
                if key in self._active:
                    continue
                self._active.add(key)
                weighted = getattr(trainer.lightning_module, "weighting", None) is not None
                message = f"LossBalanceMonitor at step {trainer.global_step}: " + self._describe(
                    condition, name, value, weighted
                )
                if condition in self.raise_on:
                    raise LossBalanceError(message)
                rank_zero_warn(message, category=UserWarning)

    def _describe(self, condition: str, name: str, value: float, weighted: bool) -> str:
        """The warning of ``condition`` for task ``name``; ``weighted``: the model has a
        weighting method (then its weights, not Task.weight alone, made the share)."""
        window, thresholds = self.window, self.thresholds
        if condition == "dominance":
            advice = (
                "Its weighting method keeps it so: lower its Task.weight, or try another method."
                if weighted
                else "Lower its Task.weight or use an adaptive weighting method."
            )
            return (
                f"task {name!r} made up more than {thresholds.dominance:.0%} of the objective at "
                f"every one of the last {window} steps (mean share {value:.1%}): the other tasks "
                f"barely train. {advice}"
            )
        if condition == "rising_loss":
            return (
                f"the loss of task {name!r} rose by {value - 1:.1%} over the last {window} steps "
                "while the objective fell: the total hides it. Check its weight and its data."
            )
        if condition == "weight_collapse":
            return (
                f"the weight of task {name!r} fell to {value:.2%} of its mean over the first "
                f"{window} steps: the task has all but stopped training."
            )
        if condition == "weight_explosion":
            return (
                f"the weight of task {name!r} grew to {value:.3g} times its mean over the first "
                f"{window} steps, or stopped being finite: the other tasks barely train."
            )
        return (
            f"the loss of task {name!r} was NaN or infinite at a step since the last check. "
            "Check the inputs and targets, lower the learning rate, or clip gradients."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """The reported conditions, the flags last logged, the skipped steps counted and the
        window itself: a resumed run judges, flags and reports as an uninterrupted one."""
        return {
            "active": sorted(self._active),
            "flags": dict(self._flags),
            "skipped_steps": self._skipped_steps,
            "window": self._history.state_dict(),
            "step_records": self._steps.state(),
        }

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        check_checkpoint_tasks(self, trainer, pl_module, checkpoint)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._active = {tuple(key) for key in state_dict["active"]}
        if "window" not in state_dict:  # written before the window was kept: the reference only
            self._history.reference_weights = state_dict["reference_weights"]
            return
        self._flags.update(state_dict["flags"])
        self._skipped_steps = state_dict["skipped_steps"]
        self._history.load_state_dict(state_dict["window"])
        # Restored after setup: a checkpoint saved amid an optimizer step resumes it.
        self._steps.pending = list(StepRecords.restored(state_dict.get("step_records", [])))


def _check_number(
    name: str, value: float, low: float, high: float, closed_low: bool = False
) -> None:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not ((value >= low) if closed_low else (value > low)) or not value < high:
        bounds = f"{'[' if closed_low else '('}{low}, {high})"
        raise ValueError(f"`{name}` must be a number in {bounds}; got {value!r}.")


def _check_conditions(raise_on: Iterable[str]) -> frozenset[str]:
    if isinstance(raise_on, str):
        raise ValueError(f"`raise_on` must be a list of conditions, e.g. [{raise_on!r}].")
    raise_on = tuple(raise_on)
    unknown = sorted(set(raise_on) - set(CONDITIONS))
    if unknown:
        raise ValueError(
            f"`raise_on` names unknown condition(s) {unknown}; use {list(CONDITIONS)}."
        )
    return frozenset(raise_on)
