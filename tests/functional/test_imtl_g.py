"""IMTL-G against torchjd, the paper's closed form on the Jacobian, and its defining property."""

import numpy as np
import pytest
import torch
from torch import Tensor
from torchjd.aggregation import IMTLGWeighting

from lightning_lossagg.functional.imtl_g import (
    _general_imtl_g,
    _inverse_in_floats,
    imtl_g,
    imtl_g_weights,
)
from tests.functional._jacobians import (
    as_params,
    assert_same_update,
    degenerate_jacobians,
    random_jacobians,
    two_task_jacobians,
)

# torchjd's fallback for a vanishing sum is an absolute 1e-12 test, so on these cases its weights
# come from rounding noise (e.g. [-2, 3] for g and -g); our fallback is checked in
# test_degenerate_results instead.
TORCHJD_UNRELIABLE = {"zero", "opposite"}
COMPARABLE_CASES = as_params(
    random_jacobians()
    + [case for case in degenerate_jacobians() if case[0] not in TORCHJD_UNRELIABLE]
)


def paper_closed_form(jacobian: Tensor) -> Tensor:
    """Liu et al. 2021, IMTL-G's closed form: alpha_{2:K} = g_1 U^T (D U^T)^{-1} and
    alpha_1 = 1 - sum alpha_{2:K}, with D_i = g_1 - g_i and U_i = u_1 - u_i, u_i = g_i / ||g_i||."""
    units = jacobian / jacobian.norm(dim=1, keepdim=True)
    differences = jacobian[:1] - jacobian[1:]
    unit_differences = units[:1] - units[1:]
    tail = jacobian[0] @ unit_differences.T @ torch.linalg.inv(differences @ unit_differences.T)
    return torch.cat([1 - tail.sum(dim=0, keepdim=True), tail])


@pytest.mark.parametrize("jacobian", COMPARABLE_CASES)
def test_weights_match_torchjd(jacobian: Tensor) -> None:
    """Same scale: both sum to 1."""
    gramian = jacobian @ jacobian.T
    weights = imtl_g(gramian)
    assert_same_update(weights, IMTLGWeighting()(gramian), jacobian, tol=1e-6)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("jacobian", as_params(random_jacobians()))
def test_weights_match_the_paper_closed_form(jacobian: Tensor) -> None:
    torch.testing.assert_close(imtl_g(jacobian @ jacobian.T), paper_closed_form(jacobian))


@pytest.mark.parametrize("jacobian", as_params(random_jacobians()))
def test_update_has_equal_projections_on_all_gradient_directions(jacobian: Tensor) -> None:
    update = imtl_g(jacobian @ jacobian.T) @ jacobian
    projections = jacobian @ update / jacobian.norm(dim=1)
    torch.testing.assert_close(projections, projections[0].expand_as(projections))


def test_two_tasks_by_hand() -> None:
    """g_1 = (1, 0), g_2 = (0, 2): d = a g_1 + (1 - a) g_2 = (a, 2 - 2a) has equal projections
    a = 2 - 2a on the unit gradients, so a = 2/3."""
    jacobian = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    expected = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    torch.testing.assert_close(imtl_g(jacobian @ jacobian.T), expected)


@pytest.mark.parametrize(
    ("case_id", "expected"),
    [
        ("single-task", [1.0]),
        ("zero", [1 / 3, 1 / 3, 1 / 3]),
        ("zero-pair", [0.5, 0.5]),
        ("identical", [1 / 3, 1 / 3, 1 / 3]),
        ("opposite", [0.5, 0.5]),  # d = 0: both projections are equal (zero)
    ],
)
def test_degenerate_results(case_id: str, expected: list[float]) -> None:
    jacobian = dict(degenerate_jacobians())[case_id]
    weights = imtl_g(jacobian @ jacobian.T)
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))


def test_zero_gradient_gets_zero_weight() -> None:
    jacobian = dict(degenerate_jacobians())["one-zero-row"]
    weights = imtl_g(jacobian @ jacobian.T)
    assert weights[1] == 0
    nonzero = jacobian[[0, 2]]
    torch.testing.assert_close(weights[[0, 2]], imtl_g(nonzero @ nonzero.T))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", range(10))
def test_opposite_gradients_give_uniform_weights_despite_rounding(
    seed: int, dtype: torch.dtype
) -> None:
    """Only d = 0 has equal projections on g and -g; 1ᵀv is then rounding noise, which must not be
    divided by (torchjd does, and returns e.g. [-2, 3])."""
    gradient = torch.randn(12, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    for jacobian in [torch.stack([gradient, -gradient]), torch.stack([gradient, -gradient] * 2)]:
        weights = imtl_g(jacobian @ jacobian.T)
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / len(weights)))


@pytest.mark.parametrize(("dtype", "small"), [(torch.float64, 1e-3), (torch.float32, 0.05)])
def test_opposite_gradients_and_a_small_collinear_one_give_uniform_weights(
    dtype: torch.dtype, small: float
) -> None:
    """g, -g and a small multiple of g: only d = 0 has equal projections on g and -g, and the
    general solver's 1ᵀv (about small³ / 4) is below its cut-off; the weights were about
    ±1 / small³ (e.g. [1000, -1000, 1]) with the cut-off at the precision instead of its root."""
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [small, 0.0]], dtype=dtype)
    weights = imtl_g(jacobian @ jacobian.T)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 3))


@pytest.mark.parametrize("seed", range(3))
def test_two_task_closed_form_equals_the_general_solver(seed: int) -> None:
    # Two tasks skip the pseudo-inverse. Both keep the small eigenvalue above 2 eps times the
    # large one; no Gramian lies near that cut-off but the diagonal ones, whose eigenvalues are
    # exact. The weights then agree to rounding, which the condition number of the kept part
    # amplifies. Also for matrices that are not positive semi-definite (the function does not
    # check them).
    gramians = [jacobian @ jacobian.T for jacobian in two_task_jacobians(seed)]
    by_hand = [[[1, 2], [2, 1]], [[-1e-7, 1], [1, -2e-7]], [[2e-7, 1], [1, -1e-7]]]
    by_hand += [[[1e-17, 1e-9], [1e-9, -1]], [[-1, -2], [-2, -4]], [[3, 0], [0, 3]]]
    for eps in (float(np.finfo(np.float64).eps), float(np.finfo(np.float32).eps)):
        for matrix in gramians:
            eigenvalues = np.linalg.eigvalsh(matrix)
            kept = eigenvalues[eigenvalues > 2 * eps * eigenvalues.max()]
            condition = kept.max() / kept.min() if len(kept) else 1.0
            tol = 1e-10 + 16 * np.finfo(np.float64).eps * condition
            general = _general_imtl_g(matrix, eps)
            atol = tol * np.abs(general).max()
            np.testing.assert_allclose(imtl_g_weights(matrix, eps), general, rtol=tol, atol=atol)
        at_cutoff = [np.diag([1.0, 2 * eps * factor]) for factor in (0.7, 1.4)]
        for matrix in [np.array(case, float) for case in by_hand] + at_cutoff:
            np.testing.assert_allclose(imtl_g_weights(matrix, eps), _general_imtl_g(matrix, eps))


def _by_pseudo_inverse(matrix: np.ndarray, eps: float) -> np.ndarray:
    norms = np.sqrt(np.maximum(matrix.diagonal(), 0.0))
    solution = np.linalg.pinv(matrix, rcond=len(matrix) * eps, hermitian=True) @ norms
    return solution / solution.sum()


@pytest.mark.parametrize("size", range(3, 9))
@pytest.mark.parametrize("seed", range(3))
def test_python_floats_solve_only_what_the_pseudo_inverse_inverts(size: int, seed: int) -> None:
    # Up to 8 tasks a Gramian is solved in Python floats, by its Cholesky factor, only where the
    # pseudo-inverse keeps every eigenvalue (certified: trace(G) trace(G⁻¹) < 1 / (K eps)); on
    # these well-conditioned Gramians the result is the pseudo-inverse's. Rank-deficient
    # Gramians, and those with an eigenvalue near the cut-off, are left to the pseudo-inverse.
    rng = np.random.default_rng(seed)
    jacobian = rng.normal(size=(size, size + 3))
    for eps in (float(np.finfo(np.float64).eps), float(np.finfo(np.float32).eps)):
        matrix = jacobian @ jacobian.T
        norms = np.sqrt(matrix.diagonal()).tolist()
        assert _inverse_in_floats(matrix.tolist(), norms, size * eps) is not None
        np.testing.assert_allclose(_general_imtl_g(matrix, eps), _by_pseudo_inverse(matrix, eps))
        dependent = np.concatenate([jacobian[:-1], jacobian[:1] + jacobian[1:2]])
        near_cutoff = np.diag([1.0] * (size - 1) + [2.0 * size * eps])
        for matrix in (dependent @ dependent.T, near_cutoff):
            norms = np.sqrt(np.maximum(matrix.diagonal(), 0.0)).tolist()
            assert _inverse_in_floats(matrix.tolist(), norms, size * eps) is None
            np.testing.assert_allclose(
                _general_imtl_g(matrix, eps), _by_pseudo_inverse(matrix, eps), atol=1e-9
            )


@pytest.mark.parametrize(("size", "smallest"), [(3, 3e-7), (5, 1e-6), (8, 1e-6)])
@pytest.mark.parametrize("seed", range(5))
def test_gradients_of_very_different_norms_are_solved_exactly(
    size: int, smallest: float, seed: int
) -> None:
    # G = S A S: correlated gradients (A) whose norms span six orders of magnitude (S), so G's
    # condition number is ~1e13, yet the certificate holds and the Cholesky solve meets the exact
    # v = G⁻¹ n = S⁻¹ A⁻¹ S⁻¹ n to rounding.
    rng = np.random.default_rng(seed)
    jacobian = rng.normal(size=(size, size + 3)) + 2.0
    well = jacobian @ jacobian.T
    scales = np.logspace(0, np.log10(smallest), size)
    matrix = scales[:, None] * well * scales
    norms = np.sqrt(matrix.diagonal())
    eps = float(np.finfo(np.float64).eps)
    assert _inverse_in_floats(matrix.tolist(), norms.tolist(), size * eps) is not None
    exact = np.linalg.solve(well, norms / scales) / scales
    np.testing.assert_allclose(_general_imtl_g(matrix, eps), exact / exact.sum(), rtol=1e-9)
