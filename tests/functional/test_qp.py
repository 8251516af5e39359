"""The active-set solver: batched against one solve per QP, in Python floats against NumPy, from
right, wrong and empty guesses."""

import numpy as np
import pytest

from lightning_lossagg.functional import _qp
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


# The active-set solver on degenerate QPs: bounds whose KKT multiplier is exactly 0 at the optimum,
# solved at ``tol=0`` (which ``mgda`` accepts). Rounding then makes some of those multipliers
# slightly negative; freeing such a bound gives a point at or below it ("blocked at once"), which
# the solver must take as optimal instead of freeing the same bound again until ``max_iter`` runs
# out. Reference: the QP is built around a known minimiser ``x*`` (``c = -H x*`` with ``x* >= l``,
# some entries exactly at their bound), which is therefore the unconstrained and the constrained
# minimiser — independent of the solver.
MAX_ITER = 250


def _degenerate(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(size, size + 2))
    hessian = factor @ factor.T / size + 1e-3 * np.eye(size)
    lower = rng.normal(size=size)
    at_bound = rng.random(size) < 0.5
    minimiser = lower + np.where(at_bound, 0.0, np.abs(rng.normal(size=size)))
    return hessian, -hessian @ minimiser, lower, minimiser


def _solve(path: str, hessian, linear, lower) -> np.ndarray:
    if path == "floats":
        solution = _qp._active_set_in_floats(
            hessian.tolist(), linear.tolist(), lower.tolist(), None, MAX_ITER, 0.0, {}
        )
        assert solution is not None  # well conditioned: no fallback
        return np.array(solution)
    return _qp._active_sets_in_numpy(hessian, linear, lower[None], MAX_ITER, 0.0)[0]


@pytest.mark.parametrize("path", ["floats", "numpy"])
def test_a_freed_bound_blocked_at_once_ends_the_solve(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    solves = {"count": 0}
    for name in ("_solve_on_free_set", "_solve_on_free_sets"):
        original = getattr(_qp, name)

        def counted(*args, _original=original):
            solves["count"] += 1
            return _original(*args)

        monkeypatch.setattr(_qp, name, counted)
    slow = 0
    cases = [(size, seed) for size in range(2, 9) for seed in range(40)]
    for size, seed in cases:
        hessian, linear, lower, minimiser = _degenerate(size, seed)
        solves["count"] = 0
        solution = _solve(path, hessian, linear, lower)
        np.testing.assert_allclose(solution, minimiser, rtol=1e-9, atol=1e-12)
        # Lawson-Hanson terminates in about 2K solves; freeing a blocked bound again and again
        # would spend all of max_iter (hundreds of solves).
        slow += solves["count"] > 4 * size
    assert slow <= 0.05 * len(cases), f"{slow} of {len(cases)} solves ran past 4K passes"


# The Python-float active-set loop is documented as "one row of ``_active_sets_in_numpy``, step for
# step". The tests above compare their points and free sets; this compares the work: the same number
# of free-set solves for the same problem. It fails when one of the loops, after stepping back,
# leaves the nearest blocked variable a rounding error above its bound instead of fixing it (the
# Lawson-Hanson step puts it exactly on the bound): that loop then spends an extra solve on an
# unchanged free set. The solutions are also checked against an independent minimiser (SciPy's
# bounded L-BFGS-B is too loose; the KKT conditions are checked instead).
@pytest.mark.parametrize("tol", [1e-12, 0.0])
def test_python_floats_and_numpy_take_the_same_number_of_solves(
    monkeypatch: pytest.MonkeyPatch, tol: float
) -> None:
    solves = {"count": 0}
    single, batched = _qp._solve_on_free_set, _qp._solve_on_free_sets

    def count_single(*args):
        solves["count"] += 1
        return single(*args)

    def count_batched(hessian, linear, lowers, free):
        solves["count"] += len(lowers)  # one solve per row
        return batched(hessian, linear, lowers, free)

    monkeypatch.setattr(_qp, "_solve_on_free_set", count_single)
    monkeypatch.setattr(_qp, "_solve_on_free_sets", count_batched)
    mismatches = []
    for seed in range(200):
        hessian, linear, (lower,) = _problem(2 + seed % 7, seed, rows=1)
        solves["count"] = 0
        in_floats = _qp._active_set_in_floats(
            hessian.tolist(), linear.tolist(), lower.tolist(), None, 250, tol, {}
        )
        floats_solves, solves["count"] = solves["count"], 0
        in_numpy = _qp._active_sets_in_numpy(hessian, linear, lower[None], 250, tol)[0]
        numpy_solves = solves["count"]
        for solution in (np.array(in_floats), in_numpy):
            # KKT: feasible, zero multiplier on free variables, >= 0 on those at their bound.
            multipliers = hessian @ solution + linear
            at_bound = solution <= lower + 1e-12
            assert (solution >= lower - 1e-12).all()
            np.testing.assert_allclose(multipliers[~at_bound], 0.0, atol=1e-9)
            assert (multipliers[at_bound] >= -1e-9).all()
        if floats_solves != numpy_solves:
            mismatches.append((seed, floats_solves, numpy_solves))
    assert not mismatches, f"(seed, solves in floats, solves in NumPy): {mismatches}"
