"""Aligned-MTL against torchjd and against aligning the Jacobian's SVD by hand."""

import numpy as np
import pytest
import torch
from torch import Tensor
from torchjd.aggregation import AlignedMTLWeighting

from lightning_lossagg.functional.aligned_mtl import (
    ScaleMode,
    _general_aligned_mtl,
    aligned_mtl,
    aligned_mtl_weights,
)
from tests.functional._jacobians import (
    as_params,
    assert_same_update,
    degenerate_jacobians,
    random_jacobians,
    two_task_jacobians,
)

ALL_CASES = as_params(random_jacobians() + degenerate_jacobians())


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("jacobian", ALL_CASES)
def test_weights_match_torchjd_with_unit_preferences(jacobian: Tensor, scale_mode: str) -> None:
    """LibMTL's scale (sum of the aligned gradients) is torchjd's with pref_vector = ones.

    With "median" or "rmse" the balance matrix has eigenvalues sqrt(common / lambda) above 1,
    which amplify rounding (by ~1e4 for the nearly collinear case): the tolerance follows."""
    gramian = jacobian @ jacobian.T
    ones = torch.ones(jacobian.shape[0], dtype=torch.float64)
    reference = AlignedMTLWeighting(pref_vector=ones, scale_mode=scale_mode)(gramian)
    weights = aligned_mtl(gramian, scale_mode=scale_mode)
    eigenvalues = torch.linalg.eigvalsh(gramian)
    kept = eigenvalues[eigenvalues > 1e-14 * eigenvalues.max()]
    amplification = 1.0
    if scale_mode != "min" and len(kept) > 0:
        amplification = (kept.max() / kept.min()).sqrt().item()
    torch.testing.assert_close(weights, reference, rtol=1e-7 * amplification, atol=1e-9)


@pytest.mark.parametrize("jacobian", as_params(random_jacobians()))
def test_torchjd_default_is_the_mean_of_the_aligned_gradients(jacobian: Tensor) -> None:
    gramian = jacobian @ jacobian.T
    weights = aligned_mtl(gramian)
    torchjd_default = AlignedMTLWeighting()(gramian)
    torch.testing.assert_close(weights / jacobian.shape[0], torchjd_default)
    assert_same_update(weights, torchjd_default, jacobian, compare_scale=False)


@pytest.mark.parametrize("jacobian", as_params(random_jacobians()))
def test_update_is_the_sum_of_the_aligned_gradients(jacobian: Tensor) -> None:
    """Senushkin et al., Algorithm 1, from the SVD J = A S V^T: the aligned Jacobian is
    s_min A V^T (equal singular values) and the update its rows' sum."""
    left, singular_values, right = torch.linalg.svd(jacobian, full_matrices=False)
    aligned = singular_values.min() * left @ right
    update = aligned_mtl(jacobian @ jacobian.T) @ jacobian
    torch.testing.assert_close(update, aligned.sum(dim=0))


@pytest.mark.parametrize("jacobian", as_params(random_jacobians()))
def test_aligned_gradients_are_orthogonal_with_the_smallest_eigenvalue_as_norm(
    jacobian: Tensor,
) -> None:
    """Column i of the balance matrix B is the weights for the preference e_i, and the aligned
    Gramian is B G B = lambda_min I."""
    gramian = jacobian @ jacobian.T
    num_tasks = gramian.shape[0]
    balance = torch.stack(
        [aligned_mtl(gramian, pref_vector=unit) for unit in torch.eye(num_tasks).double()], dim=1
    )
    smallest = torch.linalg.eigvalsh(gramian).min()
    expected = smallest * torch.eye(num_tasks, dtype=torch.float64)
    torch.testing.assert_close(balance @ gramian @ balance, expected, rtol=0, atol=1e-9 * smallest)


def test_orthogonal_gradients_by_hand() -> None:
    """g_1 = (2, 0) and g_2 = (0, 1) are already orthogonal; aligning rescales both to the smallest
    norm, 1: the aligned gradients are (1, 0) = g_1 / 2 and (0, 1) = g_2."""
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(aligned_mtl(jacobian @ jacobian.T), expected)


@pytest.mark.parametrize("case_id", ["single-task", "zero"])
def test_degenerate_results_are_the_preferences(case_id: str) -> None:
    jacobian = dict(degenerate_jacobians())[case_id]
    preferences = torch.arange(1.0, jacobian.shape[0] + 1, dtype=torch.float64)
    weights = aligned_mtl(jacobian @ jacobian.T, pref_vector=preferences)
    torch.testing.assert_close(weights, preferences)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("scale_mode", "max"),
        ("pref_vector", torch.ones(3)),
        ("pref_vector", torch.ones(2, 1)),
        ("pref_vector", torch.zeros(2)),
        ("pref_vector", torch.tensor([1.0, -0.5])),
    ],
)
def test_rejects_bad_arguments(keyword: str, value: object) -> None:
    with pytest.raises(ValueError, match=keyword):
        aligned_mtl(torch.eye(2), **{keyword: value})


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("seed", range(3))
def test_two_task_closed_form_equals_the_general_solver(seed: int, scale_mode: ScaleMode) -> None:
    # Two tasks skip the eigendecomposition. Both keep the small eigenvalue above 2 eps times the
    # large one; no Gramian lies near that cut-off but the diagonal ones, whose eigenvalues are
    # exact. The weights then agree to rounding, which the condition number of the kept part
    # amplifies, relative to the preferences as well (u·p cancels for p ⊥ u). Also for matrices
    # that are not positive semi-definite (the function does not check them), and for negative
    # and zero preferences.
    generator = np.random.default_rng(seed)
    gramians = [jacobian @ jacobian.T for jacobian in two_task_jacobians(seed)]
    by_hand = [[[1, 2], [2, 1]], [[-1e-7, 1], [1, -2e-7]], [[2, 0], [0, -1]], [[-1, 0], [0, -2]]]
    by_hand.append([[3, 0], [0, 3]])
    choices = [[1.0, 1.0], [0.0, 0.5], [-1.0, 2.0], [0.0, 0.0], generator.normal(size=2)]
    for eps in (float(np.finfo(np.float64).eps), float(np.finfo(np.float32).eps)):
        at_cutoff = [np.diag([1.0, 2 * eps * factor]) for factor in (0.7, 1.4)]
        for preferences in map(np.array, choices):
            for matrix in gramians:
                eigenvalues = np.linalg.eigvalsh(matrix)
                kept = eigenvalues[eigenvalues > 2 * eps * eigenvalues.max()]
                condition = kept.max() / kept.min() if len(kept) else 1.0
                tol = 1e-10 + 16 * np.finfo(np.float64).eps * condition
                general = _general_aligned_mtl(matrix, preferences, scale_mode, eps)
                weights = aligned_mtl_weights(matrix, preferences, scale_mode, eps)
                atol = tol * max(np.abs(general).max(), np.abs(preferences).max())
                np.testing.assert_allclose(weights, general, rtol=tol, atol=atol)
            for matrix in [np.array(case, float) for case in by_hand] + at_cutoff:
                general = _general_aligned_mtl(matrix, preferences, scale_mode, eps)
                weights = aligned_mtl_weights(matrix, preferences, scale_mode, eps)
                atol = 1e-15 * max(np.abs(general).max(), np.abs(preferences).max())
                np.testing.assert_allclose(weights, general, atol=atol)
