"""Properties every Gramian-to-weights method shares, then method-specific guarantees.

To cover a new method, append ``(name, gramian -> weights)`` to ``GRAMIAN_METHODS``; list it in
``ORDER_DEPENDENT`` or ``UPDATE_DEGREE`` if it is exempt from a shared property.
"""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lightning_lossagg.functional.aligned_mtl import aligned_mtl
from lightning_lossagg.functional.cagrad import cagrad
from lightning_lossagg.functional.imtl_g import imtl_g
from lightning_lossagg.functional.mgda import mgda
from lightning_lossagg.functional.nash_mtl import nash_mtl
from lightning_lossagg.functional.pcgrad import pcgrad
from lightning_lossagg.functional.upgrad import upgrad
from tests.functional._jacobians import (
    as_params,
    assert_same_update,
    degenerate_jacobians,
    random_jacobians,
)


def seeded_pcgrad(gramian: Tensor) -> Tensor:
    """PCGrad with a fresh, fixed generator, so that repeated calls draw the same orders."""
    return pcgrad(gramian, generator=torch.Generator().manual_seed(0))


GRAMIAN_METHODS: list[tuple[str, Callable[[Tensor], Tensor]]] = [
    ("mgda", mgda),
    ("pcgrad", seeded_pcgrad),
    ("imtl_g", imtl_g),
    ("upgrad", upgrad),
    ("aligned_mtl", aligned_mtl),
    ("cagrad", cagrad),
    ("nash_mtl", nash_mtl),
]
# Methods whose weights depend on the task order when K > 2, and why.
ORDER_DEPENDENT = {"pcgrad": "random projection order: permutation-equivariant only in law"}
# d(cJ) = c**degree * d(J) for c > 0; methods not listed promise degree 1.
UPDATE_DEGREE: dict[str, float] = {"nash_mtl": 0.0}  # ||d|| = min(sqrt(K), max_norm)

METHODS = [pytest.param(name, method, id=name) for name, method in GRAMIAN_METHODS]
RANDOM_CASES = as_params(random_jacobians())
DEGENERATE_CASES = as_params(degenerate_jacobians())


def reversed_and_rolled(num_tasks: int) -> Tensor:
    return torch.arange(num_tasks).flip(0).roll(1)


@pytest.mark.parametrize("jacobian", RANDOM_CASES)
@pytest.mark.parametrize(("name", "method"), METHODS)
def test_weights_are_permutation_equivariant(name: str, method: Callable, jacobian: Tensor) -> None:
    if name in ORDER_DEPENDENT and jacobian.shape[0] > 2:
        pytest.skip(ORDER_DEPENDENT[name])
    gramian = jacobian @ jacobian.T
    order = reversed_and_rolled(len(gramian))
    permuted = method(gramian[order][:, order])
    torch.testing.assert_close(permuted, method(gramian)[order])


@pytest.mark.parametrize("jacobian", DEGENERATE_CASES)
@pytest.mark.parametrize(("name", "method"), METHODS)
def test_update_is_permutation_invariant_on_degenerate_input(
    name: str, method: Callable, jacobian: Tensor
) -> None:
    """Weights need not be unique here (e.g. for identical gradients), the update must be."""
    if name in ORDER_DEPENDENT and jacobian.shape[0] > 2:
        pytest.skip(ORDER_DEPENDENT[name])
    order = reversed_and_rolled(jacobian.shape[0])
    permuted = jacobian[order]
    weights = method(jacobian @ jacobian.T)
    assert_same_update(method(permuted @ permuted.T), weights[order], permuted, tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("jacobian", DEGENERATE_CASES)
@pytest.mark.parametrize(("name", "method"), METHODS)
def test_degenerate_input_gives_finite_weights(
    name: str, method: Callable, jacobian: Tensor, dtype: torch.dtype
) -> None:
    matrix = jacobian.to(dtype)
    weights = method(matrix @ matrix.T)
    assert weights.shape == (jacobian.shape[0],)
    assert weights.dtype == dtype
    assert torch.isfinite(weights).all(), weights


@pytest.mark.parametrize("scale", [1e-3, 1e3])
@pytest.mark.parametrize("jacobian", RANDOM_CASES + DEGENERATE_CASES)
@pytest.mark.parametrize(("name", "method"), METHODS)
def test_update_is_positively_homogeneous(
    name: str, method: Callable, jacobian: Tensor, scale: float
) -> None:
    """d(cJ) = c**degree d(J), i.e. the weights for c**2 G are c**(degree - 1) times those for G."""
    gramian = jacobian @ jacobian.T
    degree = UPDATE_DEGREE.get(name, 1.0)
    expected = scale ** (degree - 1) * method(gramian)
    assert_same_update(method(scale**2 * gramian), expected, jacobian, tol=1e-6)


INVALID_GRAMIANS = [
    pytest.param(torch.ones(2, 3), "square", id="not-square"),
    pytest.param(torch.ones(3), "square", id="vector"),
    pytest.param(torch.ones(0, 0), "K >= 1", id="empty"),
    pytest.param(torch.tensor([[1.0, 0.5], [0.0, 1.0]]), "symmetric", id="asymmetric"),
    pytest.param(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), "NaN", id="nan"),
    pytest.param(torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), "infinite", id="inf"),
    pytest.param(torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), "negative diagonal", id="negative"),
    pytest.param(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), "Cauchy-Schwarz", id="not-a-gramian"),
    pytest.param(  # asymmetric against its own pair's scale, not against the largest entry
        torch.tensor([[1e6, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, -0.5, 1.0]]),
        r"not symmetric \(\|G\[1, 2\] - G\[2, 1\]\| = 1",
        id="asymmetric-pair",
    ),
]


@pytest.mark.parametrize(("gramian", "message"), INVALID_GRAMIANS)
@pytest.mark.parametrize(("name", "method"), METHODS)
def test_rejects_invalid_gramians(name: str, method: Callable, gramian: Tensor, message: str):
    with pytest.raises(ValueError, match=message):
        method(gramian)


@pytest.mark.parametrize(("name", "method"), METHODS)
def test_rejects_an_integer_gramian_naming_the_fix(name: str, method: Callable) -> None:
    # Weights in an integer dtype would be truncated: [0.6, 0.4] became [0, 0].
    with pytest.raises(TypeError, match=r"floating-point Gramian, got torch.int64.*double"):
        method(torch.tensor([[1, -1], [-1, 2]]))


@pytest.mark.parametrize("jacobian", RANDOM_CASES[:4])
@pytest.mark.parametrize(("name", "method"), METHODS)
def test_small_asymmetry_is_averaged_away(name: str, method: Callable, jacobian: Tensor) -> None:
    """A Gramian summed or computed in low precision is symmetric only to rounding; the methods
    work on (G + G.T) / 2, so an antisymmetric perturbation changes nothing."""
    gramian = jacobian @ jacobian.T
    antisymmetric = torch.triu(torch.ones_like(gramian), diagonal=1)
    antisymmetric = 1e-7 * gramian.abs().max() * (antisymmetric - antisymmetric.T)
    torch.testing.assert_close(method(gramian + antisymmetric), method(gramian), rtol=1e-9, atol=0)


@pytest.mark.parametrize("below", [1e-9, 1e-7, 1e-6])
@pytest.mark.parametrize(("name", "method"), METHODS)
def test_a_diagonal_rounded_below_zero_is_a_zero_gradient(
    name: str, method: Callable, below: float
) -> None:
    """A factored or summed Gramian can round a zero gradient's squared norm to just below 0
    (within the tolerance, relative to the largest entry): it is taken as 0. At -1e-7 it was
    refused as breaking Cauchy-Schwarz, by its own diagonal entry."""
    gramian = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    rounded = gramian.clone()
    rounded[0, 0] = -below * gramian.abs().max()
    torch.testing.assert_close(method(rounded), method(gramian), rtol=0, atol=0)
    assert rounded[0, 0] < 0  # the caller's Gramian is left as it was


NONZERO_CASES = as_params(
    [case for case in random_jacobians() + degenerate_jacobians() if case[1].any()]
)


@pytest.mark.parametrize("jacobian", NONZERO_CASES)
def test_mgda_update_has_least_norm_in_the_convex_hull(jacobian: Tensor) -> None:
    """Compared with the vertices and 20,000 random points of the simplex."""
    gramian = jacobian @ jacobian.T
    num_tasks = gramian.shape[0]
    weights = mgda(gramian)
    generator = torch.Generator().manual_seed(0)
    exponential = -torch.rand(20_000, num_tasks, generator=generator, dtype=torch.float64).log()
    candidates = torch.cat([torch.eye(num_tasks, dtype=torch.float64), exponential])
    candidates = candidates / candidates.sum(dim=1, keepdim=True)
    candidate_norms = ((candidates @ gramian) * candidates).sum(dim=1)
    assert weights @ gramian @ weights <= candidate_norms.min() + 1e-12 * gramian.trace()


@pytest.mark.parametrize("reg_eps", [1e-4, 1e-10])
@pytest.mark.parametrize("jacobian", as_params(random_jacobians() + degenerate_jacobians()))
def test_upgrad_update_conflicts_with_no_task(jacobian: Tensor, reg_eps: float) -> None:
    """<d, g_i> >= 0, up to the regularisation: the QP's KKT conditions give
    G w >= -reg_eps * tr(G) * w (componentwise) for non-negative preferences."""
    gramian = jacobian @ jacobian.T
    weights = upgrad(gramian, reg_eps=reg_eps)
    trace = gramian.trace()
    slack = reg_eps * trace * weights.abs() + 1e-12 * trace * weights.abs().sum()
    assert (gramian @ weights >= -slack).all(), gramian @ weights


@pytest.mark.parametrize(
    "jacobian",
    [
        [[1.0, 0.0], [0.0, 3.0]],  # orthogonal
        [[1.0, 2.0], [3.0, -1.0]],  # <g_1, g_2> = 1 > 0
        [[1.0, 2.0], [1.0, 2.0]],  # identical
    ],
)
def test_pcgrad_two_agreeing_tasks_is_plain_summation(jacobian: list[list[float]]) -> None:
    matrix = torch.tensor(jacobian, dtype=torch.float64)
    expected = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(pcgrad(matrix @ matrix.T), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "jacobian",
    [[[1.0, 0.0], [-1.0, 1.0]], [[2.0, 1.0, 0.0], [-3.0, 0.5, 1.0]], [[1.0, 1.0], [-1.0, -0.9]]],
)
def test_pcgrad_two_conflicting_tasks_by_the_projection_formula(
    jacobian: list[list[float]],
) -> None:
    """d = (g_1 - <g_1, g_2> / ||g_2||^2 g_2) + (g_2 - <g_1, g_2> / ||g_1||^2 g_1)."""
    g1, g2 = torch.tensor(jacobian, dtype=torch.float64)
    inner_product = g1 @ g2
    assert inner_product < 0
    expected = (g1 - inner_product / (g2 @ g2) * g2) + (g2 - inner_product / (g1 @ g1) * g1)
    matrix = torch.stack([g1, g2])
    torch.testing.assert_close(pcgrad(matrix @ matrix.T) @ matrix, expected)


def test_pcgrad_two_conflicting_tasks_worked_by_hand() -> None:
    """g_1 = (1, 0), g_2 = (-1, 1), <g_1, g_2> = -1: the projections are g_1 + g_2 / 2 = (0.5, 0.5)
    and g_2 + g_1 = (0, 1), so w = [1, 1/2] + [1, 1] = [2, 1.5] and d = (0.5, 1.5)."""
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([2.0, 1.5], dtype=torch.float64)
    torch.testing.assert_close(pcgrad(matrix @ matrix.T), expected)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda g: mgda(g, tol=float("nan")), "tol must be a finite number >= 0"),
        (lambda g: mgda(g, max_iter=2.5), "max_iter must be a positive integer, got 2.5"),
        (lambda g: upgrad(g, reg_eps=float("nan")), "reg_eps must be a finite number > 0"),
        (lambda g: upgrad(g, reg_eps=float("inf")), "reg_eps must be a finite number > 0"),
        (lambda g: upgrad(g, guesses=[[True, True]] * 3), r"bool array of shape \(3,\) per"),
        (lambda g: cagrad(g, c=float("inf")), "c must be a finite number >= 0"),
        (lambda g: nash_mtl(g, max_iter=2.5), "max_iter must be a positive integer, got 2.5"),
    ],
    ids=[
        "mgda-tol",
        "mgda-max_iter",
        "upgrad-nan",
        "upgrad-inf",
        "upgrad-guesses",
        "cagrad-c",
        "nash",
    ],
)
def test_non_finite_or_malformed_arguments_are_refused_not_solved_around(call, message) -> None:
    # Before: NaN weights, uniform weights or zeros without a word.
    with pytest.raises(ValueError, match=message):
        call(torch.eye(3, dtype=torch.float64))


def test_nash_mtls_fallback_shares_no_memory_with_the_previous_weights() -> None:
    previous = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    weights = nash_mtl(torch.zeros(3, 3, dtype=torch.float64), previous=previous)
    weights.mul_(10)
    assert previous.tolist() == [1.0, 2.0, 3.0]
