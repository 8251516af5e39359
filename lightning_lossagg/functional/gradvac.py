"""GradVac: pull the cosine similarity of every pair of task gradients up to an adaptive target."""

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_lossagg.functional._qp import validated_gramian
from lightning_lossagg.functional._small import dot

# Floor of sqrt(1 - target^2): a target of +-1 asks for an infinite correction.
_MIN_SINE = 1e-8
_EPS = float(np.finfo(np.float64).eps)


def gradvac(
    gramian: Tensor,
    targets: Tensor | None = None,
    beta: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Weights of GradVac (whole-model variant) and the updated EMA of cosine targets.

    For each task :math:`i`, and each other task :math:`j` in random order, with
    :math:`\phi_{ij}` the cosine between the (already corrected) :math:`g_i^{PC}` and the
    original :math:`g_j`, and :math:`\hat\phi_{ij}` the target:

    .. math::

        \text{if } \phi_{ij} < \hat\phi_{ij}:\quad
        g_i^{PC} \mathrel{+}= \frac{\lVert g_i^{PC}\rVert
            \big(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2} - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\big)}
            {\lVert g_j\rVert \sqrt{1-\hat\phi_{ij}^2}}\, g_j, \qquad
        \hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta\phi_{ij},

    and :math:`d = \sum_i g_i^{PC}`. Each :math:`g_i^{PC}` is tracked as coefficients on the
    original gradients, so everything comes from the Gramian (as torchjd's ``GradVacWeighting``).

    Scale: LibMTL's and torchjd's (the sum of the corrected gradients: weights of 1 when nothing is
    corrected). They add ``1e-8`` to the denominators; here only zero gradients are special, so the
    weights do not change when all gradients are scaled by the same factor. The order of the tasks
    ``j`` is drawn with ``torch.randperm(K - 1, generator=generator)`` per task ``i``, as torchjd
    does: with ``generator=None`` and the same global seed both give the same result. The targets
    are updated at every visit, as in the paper and torchjd; LibMTL updates them only when it
    corrects. Only LibMTL's whole-model grouping (``GradVac_group_type=0``) is provided: one target
    per task pair.

    Degenerate input: a gradient whose squared norm is below ``K * 2.2e-16`` times the largest one
    counts as zero: it is neither corrected nor added, and its cosines count as 0 in the EMA (as
    with LibMTL's and torchjd's ``1e-8``); so does a corrected :math:`g_i^{PC}` that vanished
    (corrected against an exactly opposite gradient). A zero Gramian and ``K = 1`` give weights
    of 1. A target of :math:`\pm 1` asks for an infinite correction;
    :math:`\sqrt{1 - \hat\phi^2}` is floored at ``1e-8``.

    Paper: Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models", ICLR 2021, https://arxiv.org/abs/2010.05874.

    Args:
        gramian: the [K, K] Gramian :math:`G_{ij} = \langle g_i, g_j \rangle` of the task gradients.
        targets: the [K, K] EMA :math:`\hat\phi` of cosine similarities returned by the previous
            call (the state to keep), or ``None`` for zeros at the first step.
        beta: EMA rate in [0, 1] (LibMTL's ``GradVac_beta``, default 0.5).
        generator: random generator for the task order; ``None`` uses the global one.

    Returns:
        The weights of shape [K] and the new targets of shape [K, K], both detached, with the
        Gramian's dtype and device.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.gradvac import gradvac
        >>> jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> weights, targets = gradvac(jacobian @ jacobian.T)
        >>> weights
        tensor([2.0000, 1.5000])
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (LibMTL's default is 0.5), got {beta}.")
    matrix = validated_gramian(gramian)
    num_tasks = matrix.shape[0]
    if targets is None:
        ema = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    else:
        ema = targets.detach().to(device="cpu", dtype=torch.float64).clone()
        if ema.shape != (num_tasks, num_tasks) or not (ema.abs() <= 1.0 + 1e-6).all():
            raise ValueError(
                f"targets must be the [{num_tasks}, {num_tasks}] matrix of cosines in [-1, 1] "
                "returned by the previous call of gradvac; pass None at the first step."
            )
        ema = ema.clamp(-1.0, 1.0)
    orders = task_orders(num_tasks, generator)
    weights, new_ema = gradvac_weights(matrix.numpy(), ema.numpy(), beta, orders)
    options: dict[str, Any] = {"dtype": gramian.dtype, "device": gramian.device}
    return torch.tensor(weights, **options), torch.tensor(new_ema, **options)


def task_orders(num_tasks: int, generator: torch.Generator | None) -> list[list[int]]:
    """Per task ``i``, the order in which the other tasks are visited: ``torch.randperm(K - 1)``
    drawn from ``generator`` for ``i = 0 … K-1`` in turn (torchjd's draws)."""
    return [torch.randperm(num_tasks - 1, generator=generator).tolist() for _ in range(num_tasks)]


def gradvac_weights(
    matrix: np.ndarray, targets: np.ndarray, beta: float, orders: list[list[int]]
) -> tuple[list[float], list[list[float]]]:
    """:func:`gradvac` on a symmetric float64 Gramian and targets in [-1, 1] (unchecked), with
    the visiting orders drawn (:func:`task_orders`), in Python floats, where torch's scalar
    operations cost microseconds each: ``K (K - 1)`` visits, ``<g_i^{PC}, g_k>`` recomputed
    from the coefficients only after a correction."""
    gramian, ema = matrix.tolist(), targets.tolist()
    num_tasks = len(gramian)
    squared = [gramian[i][i] for i in range(num_tasks)]
    zero_level = num_tasks * _EPS * max(squared)
    nonzero = [value > zero_level for value in squared]
    norms = [math.sqrt(max(value, 0.0)) for value in squared]
    weights = [0.0] * num_tasks
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        coefficients = [0.0] * num_tasks
        coefficients[i] = 1.0
        dots = list(gramian[i])  # <g_i^PC, g_k> for every task k
        squared_norm = squared[i]  # ||g_i^PC||^2
        for index in orders[i]:
            j = others[index]
            norm_i = math.sqrt(max(squared_norm, 0.0))
            # A corrected g_i^PC can vanish (against an opposite g_j): then it counts as zero.
            both = nonzero[j] and squared_norm > zero_level
            cosine = _clamped_ratio(dots[j], norm_i * norms[j]) if both else 0.0
            target = ema[i][j]
            if both and cosine < target:
                target_sine = max(math.sqrt(1 - target * target), _MIN_SINE)
                numerator = target * math.sqrt(1 - cosine * cosine) - cosine * target_sine
                step = norm_i * numerator / (norms[j] * target_sine)
                coefficients[j] += step
                dots = _row_times(coefficients, gramian)
                squared_norm = dot(coefficients, dots)
            ema[i][j] = (1 - beta) * target + beta * cosine
        weights = [w + c for w, c in zip(weights, coefficients, strict=True)]
    return weights, ema


def _row_times(row: list[float], matrix: list[list[float]]) -> list[float]:
    """``row @ matrix`` in Python floats, skipping the zeros of ``row`` (most of it)."""
    result = [0.0] * len(matrix)
    for value, line in zip(row, matrix, strict=True):
        if value:
            result = [r + value * m for r, m in zip(result, line, strict=True)]
    return result


def _clamped_ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` clamped to [-1, 1], as torch computes it (±1 for a zero
    denominator, NaN for 0 / 0)."""
    if denominator == 0.0:
        return math.copysign(1.0, numerator) if numerator != 0.0 else math.nan
    return min(max(numerator / denominator, -1.0), 1.0)
