"""One learnable scalar per task with its own Adam: on the device for FAMO and GradNorm, whose
gradients are computed there; on the host for UW and IMTL-L, whose gradients are formulas of the
step's global losses."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_lossagg import distributed

_STATE = ("values", "exp_avg", "exp_avg_sq", "steps")
_HOST = torch.float64  # Python floats


class TaskParameters:
    r"""``K`` learnable values, zero at the start, each stepped by its own Adam.

    Adam (Kingma & Ba, 2015) as ``torch.optim.Adam`` computes it (up to rounding), with L2 weight
    decay
    :math:`g \leftarrow g + \lambda x`:

    .. math::
        m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \quad
        x \leftarrow x - \eta \, \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon},

    written out on the ``K``-vector rather than through ``torch.optim.Adam``: every task counts its
    own steps :math:`t`, so a task left out of a step (no valid sample) keeps its value, moments
    and bias correction, as a separate Adam per task would; and a step costs sixteen small tensor
    operations, no optimizer machinery.

    The state lives on the device of the task losses and in their dtype (at least float32). It is
    created at the first training step: the callback's ``setup`` runs before the model moves to its
    device, and ``load_state_dict`` before or after that.

    Args:
        lr: the learning rate :math:`\eta`.
        weight_decay: the L2 weight decay :math:`\lambda`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`.
    """

    def __init__(
        self,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.num_tasks = 0
        self._state: dict[str, Tensor] | None = None

    def set_num_tasks(self, num_tasks: int, owner: str) -> None:
        """Fix ``K`` (in the callback's ``setup``); one instance serves one model."""
        self.num_tasks = fixed_num_tasks(self.num_tasks, num_tasks, owner)

    def values(self, like: Tensor) -> Tensor:
        """The values, on ``like``'s device, in its dtype (at least float32)."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        state = self._state
        if state is None or state["values"].device != like.device or state["values"].dtype != dtype:
            state = state or self._fresh_state()
            self._state = {name: distributed.to_device(state[name], like, dtype) for name in _STATE}
        return self._state["values"]  # type: ignore[index]  # set above if it was None

    def step(self, gradient: Tensor, mask: Tensor) -> None:
        """One Adam step along ``gradient`` for the tasks where ``mask`` is True."""
        state = self._state
        assert state is not None, "values() creates the state at the first training step"
        beta1, beta2 = self.betas
        values = state["values"]
        gradient = gradient.to(values.dtype)
        if self.weight_decay:
            gradient = gradient + self.weight_decay * values
        steps = state["steps"] + mask
        exp_avg = torch.lerp(state["exp_avg"], gradient, 1 - beta1)
        exp_avg_sq = torch.addcmul(beta2 * state["exp_avg_sq"], gradient, gradient, value=1 - beta2)
        # The bias corrections 1 - beta^t: 0 for a task never stepped, whose update (a division
        # by 0) is discarded below.
        corrected_sq = exp_avg_sq / (1 - torch.pow(beta2, steps))
        denominator = corrected_sq.sqrt_().add_(self.eps)
        corrected = exp_avg / (1 - torch.pow(beta1, steps))
        updated = torch.addcdiv(values, corrected, denominator, value=-self.lr)
        self._state = {
            "values": torch.where(mask, updated, values),
            "exp_avg": torch.where(mask, exp_avg, state["exp_avg"]),
            "exp_avg_sq": torch.where(mask, exp_avg_sq, state["exp_avg_sq"]),
            "steps": steps,
        }

    def kept(self) -> dict[str, Tensor] | None:
        """The state as it is, for :meth:`put_back` (no copy: :meth:`step` makes a new one)."""
        return self._state

    def put_back(self, kept: dict[str, Tensor] | None) -> None:
        self._state = kept

    @property
    def parameter(self) -> Tensor | None:
        """The live values (None before they exist): a method may rescale them in place."""
        return None if self._state is None else self._state["values"]

    def snapshot(self) -> Tensor | None:
        """A copy of the values (None before the first step or a loaded state), for the logs."""
        return None if self._state is None else self._state["values"].clone()

    def state_dict(self) -> dict[str, Any]:
        state = self._state or self._fresh_state()
        return {name: state[name].clone() for name in _STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_loaded(state, self.num_tasks)
        self._state = {name: state[name] for name in _STATE}

    def _initial_state(self) -> dict[str, Any]:
        """The start: ``{"values": zeros}``; a subclass may start elsewhere (GradNorm: ones)."""
        return {"values": torch.zeros(self.num_tasks)}

    def _fresh_state(self) -> dict[str, Tensor]:
        values = self._initial_state()["values"]
        moments = {name: torch.zeros_like(values) for name in _STATE if name != "values"}
        return {"values": values, **moments}


class HostTaskParameters:
    """:class:`TaskParameters` on the host, in Python floats (float64): for methods whose gradient
    is a formula of the step's global losses (UW, IMTL-L), which reach the host once per step by a
    copy queued without stalling the device. The same Adam on ``K`` numbers costs a few
    microseconds, where each of its sixteen operations on a ``K``-element tensor costs a kernel
    launch or a dispatch of its own. ``bound``: each value is kept within ``[-bound, bound]``
    after every step (projected Adam).
    """

    def __init__(self, lr: float, bound: float = math.inf) -> None:
        self.lr, self.betas, self.eps = lr, (0.9, 0.999), 1e-8
        self.bound = bound
        self.num_tasks = 0
        self._state: dict[str, list[float]] | None = None

    def set_num_tasks(self, num_tasks: int, owner: str) -> None:
        """Fix ``K`` (in the callback's ``setup``); one instance serves one model."""
        self.num_tasks = fixed_num_tasks(self.num_tasks, num_tasks, owner)

    @property
    def values(self) -> list[float]:
        """The values (a new list at every step; never changed in place)."""
        return self._host_state()["values"]

    def step(self, gradient: list[float], mask: list[bool]) -> None:
        """One Adam step along ``gradient`` for the tasks where ``mask`` is True (into new lists:
        the old values may be logged, the old state kept by :meth:`kept`)."""
        (beta1, beta2), state = self.betas, self._host_state()
        state = self._state = {name: list(column) for name, column in state.items()}
        values, exp_avg, exp_avg_sq, steps = (state[name] for name in _STATE)
        for k, (g, stepped) in enumerate(zip(gradient, mask, strict=True)):
            if not stepped:
                continue
            t = steps[k] = steps[k] + 1
            m = exp_avg[k] = beta1 * exp_avg[k] + (1 - beta1) * g
            v = exp_avg_sq[k] = beta2 * exp_avg_sq[k] + (1 - beta2) * g * g
            denominator = math.sqrt(v / (1 - beta2**t)) + self.eps
            value = values[k] - self.lr * (m / (1 - beta1**t)) / denominator
            values[k] = min(max(value, -self.bound), self.bound)

    def kept(self) -> dict[str, list[float]] | None:
        """The state as it is, for :meth:`put_back` (no copy: :meth:`step` makes a new one)."""
        return self._state

    def put_back(self, kept: dict[str, list[float]] | None) -> None:
        self._state = kept

    def snapshot(self) -> Tensor | None:
        """The values as a tensor (None before the first step or a loaded state), for the logs."""
        return None if self._state is None else torch.tensor(self._state["values"], dtype=_HOST)

    def state_dict(self) -> dict[str, Any]:
        return {
            name: torch.tensor(column, dtype=_HOST) for name, column in self._host_state().items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_loaded(state, self.num_tasks)
        self._state = {name: state[name].double().tolist() for name in _STATE}

    def _host_state(self) -> dict[str, list[float]]:
        if self._state is None:
            self._state = {name: [0.0] * self.num_tasks for name in _STATE}
        return self._state


def fixed_num_tasks(current: int, num_tasks: int, owner: str) -> int:
    """``num_tasks``, once a method instance fixes it (``current`` 0: not yet); an instance that
    holds the state of a model with another number of tasks is refused."""
    if current not in (0, num_tasks):
        raise ValueError(
            f"This {owner} already holds the state of a model with {current} tasks; "
            f"create a new {owner} for this model with {num_tasks} tasks."
        )
    return num_tasks


def _check_loaded(state: dict[str, Any], num_tasks: int) -> None:
    if tuple(state["values"].shape) != (num_tasks,):
        raise ValueError(
            f"The checkpoint holds {tuple(state['values'].shape)} values for a model with "
            f"{num_tasks} tasks: it was saved for another model. Resume the same model."
        )
