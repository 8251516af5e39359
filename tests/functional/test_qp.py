"""The active-set solver: batched against one solve per QP, in Python floats against NumPy, from
right, wrong and empty guesses."""

import numpy as np
import pytest

from lightning_lossagg.functional._qp import (
    _active_set_in_floats,
    _active_sets_in_numpy,
    active_set_qp,
    active_set_qps,
)

SMALL = range(1, 9)  # a training step's problems: up to 8 tasks


def _problem(size: int, seed: int, rows: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(size, size + 2))
    hessian = factor @ factor.T / size + 1e-3 * np.eye(size)
    return hessian, rng.normal(size=size), rng.normal(size=(rows, size))


@pytest.mark.parametrize("size", [1, 2, 5, 8, 12])
@pytest.mark.parametrize("seed", range(4))
def test_batched_solves_equal_one_solve_per_qp(size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    hessian, linear, lowers = _problem(size, seed)
    exact = np.stack([active_set_qp(hessian, linear, lower, 250, 1e-12) for lower in lowers])
    right = exact > lowers
    for guesses in (right, ~right, np.zeros_like(right), rng.random((3, size)) < 0.5):
        # The NumPy loop solves all the rows together (Python floats take small ones row by row).
        solutions = _active_sets_in_numpy(hessian, linear, lowers, 250, 1e-12, guesses)
        np.testing.assert_allclose(solutions, exact, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            active_set_qps(hessian, linear, lowers, 250, 1e-12, guesses), exact, rtol=1e-9
        )
        # Each is the minimiser: feasible, and no bound it holds has a negative multiplier.
        multipliers = solutions @ hessian + linear
        assert (solutions >= lowers - 1e-12).all()
        at_bound = solutions <= lowers + 1e-12
        assert (multipliers[at_bound] >= -1e-9).all()
        np.testing.assert_allclose(multipliers[~at_bound], 0.0, atol=1e-9)


@pytest.mark.parametrize("size", SMALL)
@pytest.mark.parametrize("seed", range(6))
def test_python_floats_take_numpys_steps(size: int, seed: int) -> None:
    # Small problems are solved in Python floats, step for step as the NumPy loop: from the
    # same guess and within the same number of iterations (cut short or not), the same free set
    # and the same point, including after steps back to a bound.
    rng = np.random.default_rng(100 + seed)
    hessian, linear, lowers = _problem(size, seed, rows=4)
    right = _active_sets_in_numpy(hessian, linear, lowers, 250, 1e-12) > lowers
    for guesses in (None, right, ~right, rng.random(lowers.shape) < 0.5):
        for max_iter in (1, 2, 3, 250):
            reference = _active_sets_in_numpy(hessian, linear, lowers, max_iter, 1e-12, guesses)
            factors: dict = {}
            for row, lower in enumerate(lowers):
                guess = None if guesses is None else guesses[row].tolist()
                solution = _active_set_in_floats(
                    hessian.tolist(),
                    linear.tolist(),
                    lower.tolist(),
                    guess,
                    max_iter,
                    1e-12,
                    factors,
                )
                assert solution is not None  # well conditioned: no fallback to NumPy
                np.testing.assert_array_equal(np.array(solution) > lower, reference[row] > lower)
                np.testing.assert_allclose(solution, reference[row], rtol=1e-9, atol=1e-12)


def test_a_near_singular_free_set_is_left_to_numpy() -> None:
    # MGDA's Hessian for three identical gradients: the tie-breaking term 1e-10 decides the
    # result, which rounding in a Python elimination would blur; LAPACK solves it.
    hessian = np.full((3, 3), 1 / 3) + 1e-10 * np.eye(3)
    linear, lower = -np.ones(3), np.zeros(3)
    assert (
        _active_set_in_floats(
            hessian.tolist(), linear.tolist(), lower.tolist(), [True] * 3, 250, 1e-12, {}
        )
        is None
    )
    guess = np.ones(3, bool)
    solution = active_set_qp(hessian, linear, lower, 250, 1e-12, guess)
    np.testing.assert_array_equal(
        solution, _active_sets_in_numpy(hessian, linear, lower[None], 250, 1e-12, guess[None])[0]
    )
    np.testing.assert_allclose(solution / solution.sum(), np.full(3, 1 / 3), atol=1e-15)
