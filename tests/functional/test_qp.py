"""The batched active-set solver against one solve per QP, from right, wrong and empty guesses."""

import numpy as np
import pytest

from lightning_lossagg.functional._qp import active_set_qp, active_set_qps


@pytest.mark.parametrize("size", [1, 2, 5, 8])
@pytest.mark.parametrize("seed", range(4))
def test_batched_solves_equal_one_solve_per_qp(size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(size, size + 2))
    hessian = factor @ factor.T / size + 1e-3 * np.eye(size)
    linear = rng.normal(size=size)
    lowers = rng.normal(size=(3, size))
    exact = np.stack([active_set_qp(hessian, linear, lower, 250, 1e-12) for lower in lowers])
    right = exact > lowers
    for guesses in (right, ~right, np.zeros_like(right), rng.random((3, size)) < 0.5):
        solutions = active_set_qps(hessian, linear, lowers, 250, 1e-12, guesses)
        np.testing.assert_allclose(solutions, exact, rtol=1e-9, atol=1e-12)
        # Each is the minimiser: feasible, and no bound it holds has a negative multiplier.
        multipliers = solutions @ hessian + linear
        assert (solutions >= lowers - 1e-12).all()
        at_bound = solutions <= lowers + 1e-12
        assert (multipliers[at_bound] >= -1e-9).all()
        np.testing.assert_allclose(multipliers[~at_bound], 0.0, atol=1e-9)
