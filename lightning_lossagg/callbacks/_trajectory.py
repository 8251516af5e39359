"""The task losses and weights of a run at its logged steps, for the end-of-fit chart and plot."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_lossagg.weighting import LossRecord

SUMMARY_COLUMNS = ("task", "first_loss", "best_loss", "last_loss", "final_weight")


class Trajectory:
    """Per-task losses and weights at the steps they were logged.

    Each :meth:`add` keeps one small device tensor; :meth:`flush` (once per epoch) moves what was
    added since the last flush to the host in ONE transfer, so training never waits on the host.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self._pending: list[Tensor] = []
        self._host: list[Tensor] = []

    def add(self, step: int, record: LossRecord) -> None:
        """Keep ``record``'s losses and weights as the values at training step ``step``; a task
        without a valid sample there has neither (NaN: a gap in the chart and the plot, as in
        the per-step keys; its record's weight of 0 only keeps it out of the objective)."""
        self.steps.append(step)
        losses = record.losses
        weights = torch.where(record.counts > 0, record.weights.to(losses.dtype), torch.nan)
        self._pending.append(torch.stack([losses, weights]))

    def flush(self) -> None:
        """Move the values added since the last flush to the host."""
        if self._pending:
            self._host.append(torch.stack(self._pending).double().cpu())
            self._pending = []

    def values(self) -> tuple[Tensor, Tensor]:
        """Losses and weights on the host, each ``[steps, tasks]`` (call :meth:`flush` first)."""
        if self._pending:
            raise RuntimeError("Trajectory.values() before flush(): some values are on the device.")
        stacked = torch.cat(self._host) if self._host else torch.empty(0, 2, 0)
        return stacked[:, 0], stacked[:, 1]

    def summary_rows(self, names: tuple[str, ...]) -> list[list[object]]:
        """One row per task: ``SUMMARY_COLUMNS`` (None where a task never had a finite loss)."""
        losses, weights = self.values()
        rows: list[list[object]] = []
        for index, name in enumerate(names):
            task_losses = losses[:, index]
            had_it = torch.isfinite(task_losses)
            finite = task_losses[had_it].tolist()
            first, best, last = (finite[0], min(finite), finite[-1]) if finite else (None,) * 3
            # The weight of the last logged step that had the task (0 in the others).
            steps = had_it.nonzero()
            final_weight = weights[steps[-1, 0], index].item() if len(steps) else None
            rows.append([name, first, best, last, _finite_or_none(final_weight)])
        return rows


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
