"""The last training steps of a run, on the device, and the balance conditions read from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_lossagg.weighting import LossRecord

# The order of the rows of LossWindow.evaluate's result.
CONDITIONS = ("dominance", "rising_loss", "weight_collapse", "weight_explosion", "nonfinite_loss")
# A rise (or fall) counts when it exceeds this many standard errors of the difference of the means
# of the window's halves.
RISE_Z = 3.0


@dataclass(frozen=True)
class Thresholds:
    """When each condition holds (see :class:`LossBalanceMonitor`)."""

    dominance: float
    rise_tolerance: float
    collapse_fraction: float
    explosion_factor: float


class LossWindow:
    """A ring buffer of the last ``size`` training records, kept on the record's device.

    :meth:`add` writes the step's losses, weights and counts into one preallocated device tensor
    (and keeps a running non-finite flag); :meth:`evaluate` derives every condition for every
    task on the device and moves the result to the host in ONE transfer. The reference weights
    (each task's mean weight over the first full window) are fixed when the first window fills.
    Its state (:meth:`state_dict`) holds the window itself, so a resumed run judges the same
    steps as an uninterrupted one.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen = 0
        self.reference_weights: Tensor | None = None
        self._buffer: Tensor | None = None  # [size, 3, K]: losses, weights, counts
        self._nonfinite: Tensor | None = None
        # Tasks whose non-finite loss never reached a record (a step the mixin skipped, or a
        # task it left out), told by the monitor.
        self._marked_nonfinite: set[int] = set()
        self._on_host = False  # restored from a checkpoint: moved to the records' device

    def state_dict(self) -> dict[str, object]:
        """The window, copied to the host (the live buffers change in place)."""
        return {
            "seen": self.seen,
            "buffer": None if self._buffer is None else self._buffer.to("cpu", copy=True),
            "nonfinite": None if self._nonfinite is None else self._nonfinite.to("cpu", copy=True),
            "marked_nonfinite": sorted(self._marked_nonfinite),
            "reference_weights": (
                None if self.reference_weights is None else self.reference_weights.cpu()
            ),
        }

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        buffer, nonfinite = state["buffer"], state["nonfinite"]
        self._buffer = None if buffer is None else buffer.clone()  # written in place later
        self._nonfinite = None if nonfinite is None else nonfinite.clone()
        self._marked_nonfinite = set(state["marked_nonfinite"])
        self.reference_weights = state["reference_weights"]
        self._on_host = self._buffer is not None

    def mark_nonfinite(self, tasks: list[int]) -> None:
        """Report these tasks at the next :meth:`evaluate` as ``nonfinite_loss``."""
        self._marked_nonfinite.update(tasks)

    def add(self, record: LossRecord) -> None:
        """Write ``record`` over the oldest step of the window."""
        losses = record.losses
        if self._on_host:
            assert self._buffer is not None and self._nonfinite is not None
            self._buffer, self._on_host = self._buffer.to(losses.device), False
            self._nonfinite = self._nonfinite.to(losses.device)
        if self._buffer is None:
            self._buffer = losses.new_zeros((self.size, 3, len(losses)))
            self._nonfinite = torch.zeros(len(losses), dtype=torch.bool, device=losses.device)
        self._buffer[self.seen % self.size] = torch.stack(
            [losses, record.weights.to(losses.dtype), record.counts.to(losses.dtype)]
        )
        self._nonfinite |= (record.counts > 0) & ~torch.isfinite(losses)  # type: ignore[operator]
        self.seen += 1
        if self.seen == self.size and self.reference_weights is None:
            _, weights, counts = self._buffer.unbind(1)
            self.reference_weights = _masked_mean(weights, counts > 0)

    def evaluate(self, thresholds: Thresholds) -> tuple[list[list[bool | None]], list[list[float]]]:
        """Per condition (rows in ``CONDITIONS`` order) and task: whether it holds (None: not
        judged yet, the window is not full), and the figure it was judged on (share, loss ratio,
        weight ratio, weight ratio, 0/1)."""
        assert self._buffer is not None and self._nonfinite is not None, "evaluate() before add()"
        nonfinite, self._nonfinite = self._nonfinite, torch.zeros_like(self._nonfinite)
        if self._marked_nonfinite:
            nonfinite[sorted(self._marked_nonfinite)] = True
            self._marked_nonfinite = set()
        dtype = self._buffer.dtype
        flags = torch.zeros(
            len(CONDITIONS), len(nonfinite), dtype=torch.bool, device=nonfinite.device
        )
        values = torch.full(flags.shape, torch.nan, dtype=dtype, device=nonfinite.device)
        flags[-1], values[-1] = nonfinite, nonfinite.to(dtype)
        judged = self.seen >= self.size
        if judged:
            self._window_conditions(thresholds, flags, values)
        packed = torch.cat([flags.to(dtype), values]).tolist()  # the one host transfer
        count = len(CONDITIONS)
        verdicts: list[list[bool | None]] = [
            [bool(flag) if judged or row == count - 1 else None for flag in packed[row]]
            for row in range(count)
        ]
        return verdicts, packed[count:]

    def _window_conditions(self, thresholds: Thresholds, flags: Tensor, values: Tensor) -> None:
        """Dominance, rising loss, weight collapse and explosion over the full window."""
        assert self._buffer is not None and self.reference_weights is not None
        oldest_first = (torch.arange(self.size) + self.seen) % self.size
        losses, weights, counts = self._buffer[oldest_first.to(self._buffer.device)].unbind(1)
        valid = counts > 0
        weighted = torch.where(valid, weights * losses, 0.0)
        objective = weighted.sum(1, keepdim=True)
        shares = weighted / torch.where(objective != 0, objective, 1.0)
        flags[0] = (shares > thresholds.dominance).all(0)
        values[0] = shares.mean(0)

        half = self.size // 2
        early, early_error = _mean_and_error(losses[:half], valid[:half])
        late, late_error = _mean_and_error(losses[-half:], valid[-half:])
        every = torch.ones_like(objective, dtype=torch.bool)
        objective_early, objective_early_error = _mean_and_error(objective[:half], every[:half])
        objective_late, objective_late_error = _mean_and_error(objective[-half:], every[-half:])
        # Both the rise and the fall must be clear of the batch-to-batch noise; the rise must
        # also be large.
        rose = _clear_change(late - early, early_error, late_error)
        fell = _clear_change(
            objective_early - objective_late, objective_early_error, objective_late_error
        )
        flags[1] = (late - early > thresholds.rise_tolerance * early.abs()) & rose & fell
        values[1] = late / early

        reference = self.reference_weights.to(weights.device, weights.dtype)
        ratio = _masked_mean(weights, valid) / torch.where(reference > 0, reference, torch.nan)
        flags[2] = ratio < thresholds.collapse_fraction
        flags[3] = (ratio > thresholds.explosion_factor) | (valid & ~torch.isfinite(weights)).any(0)
        values[2], values[3] = ratio, ratio


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over the steps (dim 0) where ``mask`` holds; NaN where it never does."""
    total = torch.where(mask, values, 0.0).sum(0)
    return total / mask.sum(0)


def _clear_change(change: Tensor, error_before: Tensor, error_after: Tensor) -> Tensor:
    """Whether ``change`` (a difference of two means) is above ``RISE_Z`` standard errors."""
    return change > RISE_Z * (error_before**2 + error_after**2).sqrt()


def _mean_and_error(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The masked mean over dim 0 and its standard error (NaN with fewer than two steps)."""
    count = mask.sum(0)
    mean = _masked_mean(values, mask)
    squares = torch.where(mask, (values - mean) ** 2, 0.0).sum(0)
    variance = squares / (count - 1).clamp(min=0)
    return mean, (variance / count).sqrt()
