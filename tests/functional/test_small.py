"""Linear algebra in Python floats (the weights' solves at a training step) against NumPy."""

import numpy as np
import pytest

from lightning_lossagg.functional._small import cholesky, cholesky_solve, inverse_trace

SMALL = range(1, 9)  # a training step's problems: up to 8 tasks


def _spd(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(size, size + 2))
    return factor @ factor.T / size + 1e-3 * np.eye(size), rng.normal(size=size)


@pytest.mark.parametrize("size", SMALL)
def test_cholesky_solves_like_numpy(size: int) -> None:
    hessian, linear = _spd(size, seed=size)
    factor = cholesky(hessian.tolist())
    assert factor is not None
    np.testing.assert_allclose(np.array(factor), np.linalg.cholesky(hessian), rtol=1e-12)
    np.testing.assert_allclose(
        cholesky_solve(factor, linear.tolist()), np.linalg.solve(hessian, linear), rtol=1e-10
    )


@pytest.mark.parametrize(
    "matrix",
    [
        [[1.0, 1.0], [1.0, 1.0]],
        [[1.0, 1.0 - 1e-8], [1.0 - 1e-8, 1.0]],  # squared pivot 2e-8 < PIVOT_RATIO
        [[1.0, 2.0], [2.0, 1.0]],
        [[0.0]],
        [[-1.0]],
        [[float("nan")]],
    ],
    ids=["singular", "near-singular", "indefinite", "zero", "negative", "nan"],
)
def test_cholesky_refuses_what_is_not_clearly_positive_definite(matrix: list[list[float]]) -> None:
    # Those are left to LAPACK, whose pivoting handles them (or reports them).
    assert cholesky(matrix) is None
    assert cholesky([[1.0, 1.0 - 1e-4], [1.0 - 1e-4, 1.0]]) is not None  # squared pivot 2e-4


@pytest.mark.parametrize("scale", [1e-9, 1.0, 1e6])
def test_cholesky_judges_a_pivot_against_its_own_diagonal_whatever_the_scale(scale: float) -> None:
    # A Gramian's scale is the gradients' (1e-9 for tiny ones): what is refused is a pivot small
    # against its diagonal, not against 1.
    near = [[scale, scale * (1 - 1e-8)], [scale * (1 - 1e-8), scale]]
    clear = [[scale, scale * (1 - 1e-4)], [scale * (1 - 1e-4), scale]]
    assert cholesky(near) is None
    assert cholesky(clear) is not None


@pytest.mark.parametrize("size", SMALL)
def test_inverse_trace_is_the_trace_of_the_inverse(size: int) -> None:
    matrix, _ = _spd(size, seed=10 + size)
    factor = cholesky(matrix.tolist())
    assert factor is not None
    np.testing.assert_allclose(inverse_trace(factor), np.trace(np.linalg.inv(matrix)), rtol=1e-12)
