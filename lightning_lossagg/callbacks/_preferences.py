"""The preference vector of UPGrad and Aligned-MTL: checked once, restricted to the valid tasks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def check_pref_vector(method: str, pref_vector: Sequence[float] | None) -> list[float] | None:
    """``pref_vector`` as a list of finite floats >= 0 with a positive sum (or ``None``), else a
    ValueError."""
    if pref_vector is None:
        return None
    if isinstance(pref_vector, str | bytes) or not isinstance(pref_vector, Sequence | Tensor):
        raise ValueError(
            f"{method}: `pref_vector` must be a list of numbers, one per task, or None; "
            f"got {pref_vector!r}."
        )
    values = [float(v) for v in pref_vector]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"{method}: `pref_vector` must hold one finite number per task; got {pref_vector!r}."
        )
    if min(values) < 0 or sum(values) <= 0:
        raise ValueError(
            f"{method}: `pref_vector` holds a preference per task: every entry must be >= 0 and "
            f"at least one > 0; got {pref_vector!r}."
        )
    return values


def check_pref_length(method: str, pref_vector: list[float] | None, task_names: tuple) -> None:
    """A ValueError if ``pref_vector`` does not have one entry per task of the model."""
    if pref_vector is not None and len(pref_vector) != len(task_names):
        raise ValueError(
            f"{method}: `pref_vector` has {len(pref_vector)} entries for the model's "
            f"{len(task_names)} tasks {list(task_names)}; give one per task, in that order."
        )


def valid_preferences(pref_vector: list[float] | None, valid: Tensor) -> Tensor | None:
    """The preferences of the step's valid tasks (float64, CPU); ``None`` stays ``None``."""
    if pref_vector is None:
        return None
    return torch.tensor(pref_vector, dtype=torch.float64)[valid]
