"""Linear algebra on K×K matrices in Python floats, for the solves that run at every step.

With K ≤ 8 tasks a NumPy call costs more than its arithmetic, and inside a training step several
times more: the step's tensor work evicts NumPy's code from the caches (an active-set solve that
takes 45 µs alone takes about 100 µs after a few matrix products), while Python's float
arithmetic stays warm (15 µs alone, 35 µs there). The helpers here replace a handful of NumPy
calls with a few dozen float operations; the solvers take NumPy for larger problems.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# Most tasks whose problems (factorizations, active-set solves) run in Python floats: the work
# grows as K³ / 6, NumPy's overhead does not. Measured inside training steps, up to 8 tasks gain,
# UPGrad's K projections included (K = 6 and 8: -2 to -4 % of the step).
PYTHON_TASKS_UP_TO = 8
# Smallest squared pivot (the Schur complement L_ii²) of a factorization, relative to its diagonal
# entry A_ii: below it the matrix is left to LAPACK (near-singular: identical or nearly collinear
# gradients, where the tie-breaking regularization decides and rounding in the elimination would
# show).
PIVOT_RATIO = 1e-6

Matrix = Sequence[Sequence[float]]


def two_by_two(matrix: np.ndarray) -> tuple[float, float, float, float]:
    """``g11, g12, g21, g22``: a 2×2 matrix's entries as Python floats, for the two-task closed
    forms."""
    g11, g12, g21, g22 = matrix.ravel().tolist()
    return g11, g12, g21, g22


def pair(vector: np.ndarray) -> tuple[float, float]:
    """A two-entry vector's entries as Python floats."""
    first, second = vector.tolist()
    return first, second


def dot(left: Sequence[float], right: Sequence[float]) -> float:
    """``<left, right>`` of two vectors of the same length."""
    return sum(map(operator.mul, left, right))


def cholesky(matrix: Matrix) -> list[list[float]] | None:
    """The lower-triangular ``L`` with ``L Lᵀ = matrix`` (symmetric; only its lower triangle is
    read), or ``None`` when a squared pivot ``L_ii²`` is at most ``PIVOT_RATIO`` times ``A_ii``
    (the matrix is near-singular or not positive definite, or has a NaN)."""
    size = len(matrix)
    factor = [[0.0] * size for _ in range(size)]
    for i in range(size):
        row = factor[i]
        for j in range(i + 1):
            other = factor[j]
            total = matrix[i][j]
            for k in range(j):
                total -= row[k] * other[k]
            if j < i:
                row[j] = total / other[j]
            elif total > PIVOT_RATIO * matrix[i][i]:  # total <= A_ii: False for A_ii <= 0
                row[i] = math.sqrt(total)
            else:
                return None
    return factor


def cholesky_solve(factor: Matrix, rhs: Sequence[float]) -> list[float]:
    """``x`` with ``L Lᵀ x = rhs`` for ``L = factor`` from :func:`cholesky`."""
    size = len(rhs)
    y = [0.0] * size
    for i in range(size):
        row = factor[i]
        total = rhs[i]
        for k in range(i):
            total -= row[k] * y[k]
        y[i] = total / row[i]
    x = [0.0] * size
    for i in reversed(range(size)):
        total = y[i]
        for k in range(i + 1, size):
            total -= factor[k][i] * x[k]
        x[i] = total / factor[i][i]
    return x


def inverse_trace(factor: Matrix) -> float:
    """``trace(A⁻¹)`` for ``A = L Lᵀ``, ``L = factor`` from :func:`cholesky`: the squared
    Frobenius norm of ``L⁻¹``. ``1 / trace(A⁻¹)`` bounds ``A``'s smallest eigenvalue from below."""
    size = len(factor)
    total = 0.0
    for column in range(size):
        inverse = [0.0] * size  # column `column` of L⁻¹, zero above the diagonal
        inverse[column] = 1.0 / factor[column][column]
        for i in range(column + 1, size):
            row = factor[i]
            inverse[i] = -sum(row[k] * inverse[k] for k in range(column, i)) / row[i]
        total += sum(value * value for value in inverse)
    return total
