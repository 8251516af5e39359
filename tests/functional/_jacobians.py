"""Seeded task-gradient matrices (Jacobians) for testing Gramian-based weightings.

The case helpers return ``(case_id, jacobian)`` pairs, ``jacobian`` of shape [K, P] in float64,
one row per task gradient; the Gramian is ``jacobian @ jacobian.T``. Use them with
``pytest.mark.parametrize("jacobian", as_params(random_jacobians()))``, and compare two weightings
by the updates they produce with ``assert_same_update``.
"""

from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

NUM_PARAMS = 12
ROUNDING = 1e-9


def random_jacobians(
    num_tasks: Iterable[int] = range(2, 9), seeds: Iterable[int] = (0, 1)
) -> list[tuple[str, Tensor]]:
    """Full-rank gradients with a shared component (so some pairs conflict, some agree) and task
    norms spread over two orders of magnitude, one per (K, seed)."""
    cases = []
    for k in num_tasks:
        for seed in seeds:
            generator = torch.Generator().manual_seed(1000 * k + seed)
            shared = torch.randn(NUM_PARAMS, generator=generator, dtype=torch.float64)
            noise = torch.randn(k, NUM_PARAMS, generator=generator, dtype=torch.float64)
            norms = 10 ** (2 * torch.rand(k, 1, generator=generator, dtype=torch.float64) - 1)
            rows = shared + 1.5 * noise
            cases.append((f"K{k}-seed{seed}", norms * rows / rows.norm(dim=1, keepdim=True)))
    return cases


def degenerate_jacobians() -> list[tuple[str, Tensor]]:
    """Edge cases every weighting must survive without NaN or inf weights."""
    generator = torch.Generator().manual_seed(7)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    gradient = randn(NUM_PARAMS)
    zero_row = randn(3, NUM_PARAMS)
    zero_row[1] = 0.0
    return [
        ("single-task", gradient.unsqueeze(0)),
        ("zero", torch.zeros(3, NUM_PARAMS, dtype=torch.float64)),
        ("zero-pair", torch.zeros(2, NUM_PARAMS, dtype=torch.float64)),  # the closed forms' case
        ("identical", gradient.repeat(3, 1)),
        ("opposite", torch.stack([gradient, -gradient])),
        ("opposite-unequal", torch.stack([gradient, -3.0 * gradient])),
        ("one-zero-row", zero_row),
        ("nearly-collinear", gradient + 1e-4 * randn(3, NUM_PARAMS)),  # angles ~1e-4 rad
        ("rank-deficient", randn(5, 3) @ randn(3, NUM_PARAMS)),
        ("crowded", randn(6, 2)),  # more tasks than dimensions: many conflicts
        ("orthogonal-unequal", torch.diag(torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64))),
        ("tiny", 1e-8 * randn(4, NUM_PARAMS)),
        ("huge", 1e6 * randn(4, NUM_PARAMS)),
    ]


def as_params(cases: list[tuple[str, Tensor]]) -> list[Any]:
    """The cases as ``pytest.param(jacobian, id=case_id)`` for ``parametrize``."""
    return [pytest.param(jacobian, id=case_id) for case_id, jacobian in cases]


def assert_same_update(
    weights: Tensor,
    reference_weights: Tensor,
    jacobian: Tensor,
    *,
    compare_scale: bool = True,
    tol: float = 1e-6,
) -> None:
    """Assert that ``weights @ jacobian`` equals ``reference_weights @ jacobian`` to a relative
    ``tol``, or with ``compare_scale=False`` points the same way (cosine at least ``1 - tol``).

    Differences below ``ROUNDING * max_i ||g_i|| * ||w||_1``, the rounding level of the
    combination, are ignored; an update that small counts as zero."""
    largest_gradient = jacobian.norm(dim=1).max()
    weights, reference_weights = weights.to(jacobian.dtype), reference_weights.to(jacobian.dtype)
    update, reference = weights @ jacobian, reference_weights @ jacobian
    update_rounding = ROUNDING * largest_gradient * weights.abs().sum()
    reference_rounding = ROUNDING * largest_gradient * reference_weights.abs().sum()
    if compare_scale:
        difference = (update - reference).norm()
        allowed = tol * reference.norm() + max(update_rounding, reference_rounding)
        assert difference <= allowed, f"{update} differs from {reference} by {difference.item()}"
        return
    update_is_zero = update.norm() <= update_rounding
    assert update_is_zero == (reference.norm() <= reference_rounding), (update, reference)
    if not update_is_zero:
        cosine = update @ reference / (update.norm() * reference.norm())
        assert cosine >= 1 - tol, f"cosine {cosine.item()} between {update} and {reference}"


def two_task_jacobians(seed: int) -> list[np.ndarray]:
    """Random pairs of gradients at scales 10**-3..10**3, nearly collinear pairs, and exactly
    collinear or zero pairs (integers times a power of 2, so that their Gramian is exact)."""
    generator = np.random.default_rng(seed)
    jacobians = [np.zeros((2, 4))]
    for exponent in range(-3, 4):
        scale = 10.0**exponent
        jacobians += list(generator.normal(size=(20, 2, 4)) * scale)
        gradient = generator.normal(size=4) * scale
        for factor in (1.0, -1.0, 3.0, -0.5):
            noise = 1e-5 * scale * generator.normal(size=4)
            jacobians.append(np.stack([gradient, factor * gradient + noise]))
        exact = np.round(8 * generator.normal(size=4)) * 2.0 ** (3 * exponent)
        for factor in (0.0, 1.0, -1.0, 2.0, -3.0, 0.5):
            jacobians += [np.stack([exact, factor * exact]), np.stack([factor * exact, exact])]
    return jacobians
