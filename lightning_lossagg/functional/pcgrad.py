"""PCGrad: project each task gradient away from the gradients it conflicts with."""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_lossagg.functional._qp import validated_gramian
from lightning_lossagg.functional._small import PYTHON_TASKS_UP_TO, dot, two_by_two

_EPS = float(np.finfo(np.float64).eps)


def pcgrad(gramian: Tensor, generator: torch.Generator | None = None) -> Tensor:
    r"""Weights of PCGrad on the original task gradients.

    For each task :math:`i`, starting from :math:`g_i^{\mathrm{PC}} = g_i`, visit the other tasks
    :math:`j` in a random order and remove the conflicting component:

    .. math::

        \text{if } \langle g_i^{\mathrm{PC}}, g_j \rangle < 0:\quad
        g_i^{\mathrm{PC}} \leftarrow g_i^{\mathrm{PC}}
            - \frac{\langle g_i^{\mathrm{PC}}, g_j \rangle}{\lVert g_j \rVert^2}\, g_j,
        \qquad d = \sum_{i=1}^{K} g_i^{\mathrm{PC}}.

    Every :math:`g_i^{\mathrm{PC}}` stays a combination :math:`\sum_j c_{ij} g_j`, and
    :math:`\langle g_i^{\mathrm{PC}}, g_j \rangle = (C G)_{ij}`, so the Gramian is enough: the
    weights are :math:`w = \sum_i c_i`. One random order is drawn per task, with
    ``torch.randperm`` from ``generator``; seeding it like the global generator reproduces
    torchjd's ``PCGradWeighting`` draw for draw.

    Scale: the sum of the projected gradients, as in LibMTL, the paper and torchjd; with no
    conflict the weights are all 1 (plain summation). They do not change when all gradients are
    scaled by the same factor. A task never projects onto itself, as in torchjd (LibMTL's shuffled
    loop also visits :math:`j = i`, which matters only if :math:`g_i^{\mathrm{PC}}` comes to
    conflict with :math:`g_i`). Gradients whose squared norm is below
    ``K * 2.2e-16 * max_j ||g_j||^2`` count as zero, so that the weights stay finite: nothing is
    projected onto them. A zero Gramian and ``K = 1`` give weights of 1. The weights are detached.

    Paper: Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020,
    https://arxiv.org/abs/2001.06782.

    Args:
        gramian: the [K, K] Gramian :math:`G_{ij} = \langle g_i, g_j \rangle` of the task gradients.
        generator: a CPU generator for the projection orders; ``None`` uses torch's global one.

    Returns:
        Weights of shape [K], with the Gramian's dtype and device.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.pcgrad import pcgrad
        >>> jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> pcgrad(jacobian @ jacobian.T)
        tensor([2.0000, 1.5000])
    """
    weights = torch.from_numpy(pcgrad_weights(validated_gramian(gramian).numpy(), generator))
    return weights.to(dtype=gramian.dtype, device=gramian.device)


def pcgrad_weights(matrix: np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
    """:func:`pcgrad` on a symmetric float64 NumPy Gramian, unchecked (for the callback's step)."""
    if matrix.shape[0] == 2:
        return _two_task_pcgrad(*two_by_two(matrix), generator)
    return _general_pcgrad_weights(matrix, generator)


def _general_pcgrad_weights(
    matrix: np.ndarray, generator: torch.Generator | None = None
) -> np.ndarray:
    """:func:`pcgrad_weights` for any number of tasks (two skip it: :func:`_two_task_pcgrad`):
    in Python floats up to ``PYTHON_TASKS_UP_TO`` tasks (its steps are K-element dot products,
    far cheaper there than NumPy calls: see ``functional._small``), else in NumPy."""
    num_tasks = matrix.shape[0]
    squared_norms = matrix.diagonal().tolist()
    negligible = num_tasks * _EPS * max(squared_norms)
    if num_tasks > PYTHON_TASKS_UP_TO:
        coefficients = np.eye(num_tasks)
        for task in range(num_tasks):
            _project(coefficients[task], task, matrix, np.dot, squared_norms, negligible, generator)
        return coefficients.sum(axis=0)
    rows = matrix.tolist()
    weights = [0.0] * num_tasks
    for task in range(num_tasks):
        row = [0.0] * num_tasks
        row[task] = 1.0
        _project(row, task, rows, dot, squared_norms, negligible, generator)
        weights = [total + value for total, value in zip(weights, row, strict=True)]
    return np.array(weights)


def _project(
    row: Any,
    task: int,
    matrix: Any,
    inner: Callable[[Any, Any], float],
    squared_norms: list[float],
    negligible: float,
    generator: torch.Generator | None,
) -> None:
    """Task ``task``'s coefficients ``row`` projected in place away from each other task it
    conflicts with, in a random order (lists with ``inner`` in Python floats, or NumPy rows)."""
    for other in torch.randperm(len(squared_norms), generator=generator).tolist():
        if other == task or squared_norms[other] <= negligible:
            continue
        inner_product = inner(matrix[other], row)
        if inner_product < 0:
            row[other] -= inner_product / squared_norms[other]


def _two_task_pcgrad(
    g11: float, g12: float, g21: float, g22: float, generator: torch.Generator | None
) -> np.ndarray:
    """Two tasks in Python floats (the general loop's NumPy operations on a 2×2 matrix cost
    more). Each gradient has a single other to visit, so the order does not matter, and is
    projected onto the other's original gradient: ``c_12 = -g21 / g22`` if ``g21 < 0`` and
    ``c_21 = -g12 / g11`` if ``g12 < 0``, unless that other's squared norm is negligible, so
    ``w = (1 + c_21, 1 + c_12)``. The orders are drawn all the same, so that ``generator`` ends
    where the general loop leaves it."""
    torch.randperm(2, generator=generator)
    torch.randperm(2, generator=generator)
    negligible = 2 * _EPS * max(g11, g22)
    first = 1.0 - g12 / g11 if g12 < 0 and g11 > negligible else 1.0
    second = 1.0 - g21 / g22 if g21 < 0 and g22 > negligible else 1.0
    return np.array([first, second])
