"""DB-MTL against the paper's formula by hand and a step-by-step transcription of LibMTL's loop."""

import math

import pytest
import torch
from torch import Tensor

from lightning_lossagg.functional.db_mtl import (
    db_mtl,
    db_mtl_buffer,
    db_mtl_buffer_weights,
    db_mtl_weights,
)
from tests.functional._jacobians import as_params, degenerate_jacobians, random_jacobians


def test_two_steps_by_hand() -> None:
    # Step 1, zero buffer: b = g + 0.9 (0 - g) = 0.1 g = [[0.2, 0], [0, 0.1]]; norms 0.2 and 0.1,
    # so d = b_1 + 2 b_2 = (0.2, 0.2).
    update, buffer = db_mtl(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), None, step=1, beta_sigma=0.5)
    torch.testing.assert_close(update, torch.tensor([0.2, 0.2]))
    torch.testing.assert_close(buffer, torch.tensor([[0.2, 0.0], [0.0, 0.1]]))
    # Step 2, rate r = 0.9 / sqrt(2): b = (1 - r) g + r b_old gives rows
    # (0.2 r, 2 (1 - r)) and (1 - r, 0.1 r); the first is twice as long as the second, so
    # d = b_1 + 2 b_2 = (2 - 1.8 r) (1, 1). Balancing only the current gradients would give (2, 2).
    rate = 0.9 / math.sqrt(2.0)
    update, buffer = db_mtl(torch.tensor([[0.0, 2.0], [1.0, 0.0]]), buffer, step=2, beta_sigma=0.5)
    torch.testing.assert_close(update, torch.full((2,), 2 - 1.8 * rate))
    expected = torch.tensor([[0.2 * rate, 2 * (1 - rate)], [1 - rate, 0.1 * rate]])
    torch.testing.assert_close(buffer, expected)


def libmtl_loop(
    parameters: Tensor, targets: Tensor, steps: int, beta: float, sigma: float
) -> tuple[Tensor, Tensor]:
    """LibMTL's DB_MTL.backward step by step: autograd of log(L_k + 1e-8) per task, the decayed
    buffer update, alpha = max ||b|| / (||b_k|| + 1e-8), d = sum_k alpha_k b_k."""
    buffer = torch.zeros(targets.shape[0], parameters.numel(), dtype=torch.float64)
    for step in range(1, steps + 1):
        theta = (parameters * step).requires_grad_()
        losses = ((theta - targets) ** 2).sum(dim=1)
        rows = [
            torch.autograd.grad(torch.log(loss + 1e-8), theta, retain_graph=True)[0]
            for loss in losses
        ]
        grads = torch.stack(rows)
        buffer = grads + (beta / step**sigma) * (buffer - grads)
        norms = buffer.norm(dim=-1)
        update = (norms.max() / (norms + 1e-8)) @ buffer
    return update, buffer


@pytest.mark.parametrize(("beta", "sigma"), [(0.9, 0.0), (0.5, 0.5)])
def test_matches_libmtl_loop_with_losses_or_log_loss_gradients(beta: float, sigma: float) -> None:
    generator = torch.Generator().manual_seed(0)
    parameters = torch.randn(4, generator=generator, dtype=torch.float64)
    targets = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    buffer, log_buffer = None, None
    for step in range(1, 4):
        theta = parameters * step
        losses = ((theta - targets) ** 2).sum(dim=1)
        loss_grads = 2 * (theta - targets)  # d L_k / d theta
        update, buffer = db_mtl(loss_grads, buffer, step, beta, sigma, losses=losses)
        log_grads = loss_grads / (losses + 1e-8).unsqueeze(1)
        log_update, log_buffer = db_mtl(log_grads, log_buffer, step, beta, sigma)
        torch.testing.assert_close(log_update, update)
    reference_update, reference_buffer = libmtl_loop(parameters, targets, 3, beta, sigma)
    torch.testing.assert_close(buffer, reference_buffer)
    torch.testing.assert_close(update, reference_update)


@pytest.mark.parametrize("jacobian", as_params(random_jacobians(num_tasks=[2, 5])))
def test_weights_from_the_buffer_gramian_give_the_update(jacobian: Tensor) -> None:
    update, buffer = db_mtl(jacobian, -0.5 * jacobian.flip(0), step=3, beta_sigma=0.5)
    weights = db_mtl_weights(buffer @ buffer.T)
    torch.testing.assert_close(weights @ buffer, update)
    scaled = weights.unsqueeze(1) * buffer  # every buffered gradient at the largest norm
    torch.testing.assert_close(scaled.norm(dim=1), buffer.norm(dim=1).max().expand(len(weights)))


@pytest.mark.parametrize("jacobian", as_params(degenerate_jacobians()))
def test_degenerate_input_gives_finite_updates(jacobian: Tensor) -> None:
    update, buffer = db_mtl(jacobian, None, step=1)
    assert torch.isfinite(update).all()
    nonzero = jacobian.any(dim=1)
    # Zero rows contribute nothing; every other row is scaled to the largest norm.
    expected = sum(
        (0.1 * row * jacobian.norm(dim=1).max() / row.norm() for row in jacobian[nonzero]),
        torch.zeros(jacobian.shape[1], dtype=torch.float64),
    )
    torch.testing.assert_close(update, expected)
    assert (db_mtl_weights(buffer @ buffer.T)[~nonzero] == 0).all()
    for factor in (1e-8, 1e6):
        torch.testing.assert_close(db_mtl(factor * jacobian, None, step=1)[0], factor * update)


def test_dtype_and_device_follow_the_gradients() -> None:
    update, buffer = db_mtl(torch.ones(2, 3, dtype=torch.float32), None, step=1)
    assert update.dtype == buffer.dtype == torch.float32
    assert db_mtl_weights(torch.eye(2, dtype=torch.float32)).dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"step": 0}, "step must be"),
        ({"beta": 1.0}, "beta must be in"),
        ({"beta_sigma": -0.5}, "beta_sigma must be"),
        ({"buffer": torch.zeros(3, 3)}, "buffer has shape"),
        ({"losses": torch.tensor([1.0, -1.0])}, "losses must hold 2"),
        ({"losses": torch.tensor([1.0, float("nan")])}, "losses must hold 2"),
    ],
)
def test_invalid_input_is_rejected(kwargs: dict, message: str) -> None:
    arguments = {"grads": torch.ones(2, 3), "buffer": None, "step": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        db_mtl(**arguments)


def test_the_unchecked_buffer_is_the_one_db_mtl_returns_and_balances() -> None:
    grads, losses = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), torch.ones(3)
    buffer = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    update, new_buffer = db_mtl(grads, buffer, 2, 0.9, 0.5, losses=losses)
    unchecked = db_mtl_buffer(grads, buffer, 2, 0.9, 0.5, losses)
    torch.testing.assert_close(unchecked, new_buffer, rtol=0, atol=0)
    torch.testing.assert_close(update, db_mtl_buffer_weights(unchecked) @ unchecked)
    db_mtl_buffer(grads, None, 1, 0.9, 0.0, -losses)  # the caller checks the losses later
    with pytest.raises(ValueError, match="losses must hold 3"):
        db_mtl(grads, None, 1, losses=-losses)
    with pytest.raises(ValueError, match="symmetric"):
        db_mtl_weights(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))


@pytest.mark.parametrize("jacobian", as_params(random_jacobians(num_tasks=[2, 5])))
def test_buffer_weights_equal_those_of_the_buffer_gramian(jacobian: Tensor) -> None:
    torch.testing.assert_close(
        db_mtl_buffer_weights(jacobian), db_mtl_weights(jacobian @ jacobian.T)
    )
    zero_row = torch.cat([jacobian, torch.zeros(1, jacobian.shape[1], dtype=jacobian.dtype)])
    assert db_mtl_buffer_weights(zero_row)[-1] == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_norm_at_the_dtypes_rounding_gets_weight_0_from_either_form(dtype) -> None:
    # Norms 1, 1e-9 and 0.5: in float32 the second is rounding noise of the largest.
    buffer = torch.tensor([[1.0, 0.0], [1e-9, 0.0], [0.0, 0.5]], dtype=dtype)
    expected = torch.tensor([1.0, 0.0, 2.0], dtype=dtype)
    torch.testing.assert_close(db_mtl_buffer_weights(buffer), expected)
    torch.testing.assert_close(db_mtl_weights(buffer @ buffer.T), expected)


# DB-MTL with ``losses`` given: the buffer must hold the gradients of LibMTL's log(L_k + 1e-8), also
# for losses at or near 0 (a task fitted exactly), where dividing by L_k alone gives NaN (0 / 0) or
# gradients 10x too large. Reference: torch.autograd of log(L_k + 1e-8) itself.
@pytest.mark.parametrize("distance", [0.0, 1e-5, 1e-4])
def test_buffer_holds_the_gradients_of_log_loss_plus_1e_8(distance: float) -> None:
    generator = torch.Generator().manual_seed(0)
    targets = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    theta = targets[0] + distance  # task 0 is fitted, or nearly: its loss is 4 distance^2
    theta = theta.requires_grad_()
    losses = ((theta - targets) ** 2).sum(dim=1)
    grads = torch.stack([torch.autograd.grad(loss, theta, retain_graph=True)[0] for loss in losses])
    log_grads = torch.stack(
        [
            torch.autograd.grad(torch.log(loss + 1e-8), theta, retain_graph=True)[0]
            for loss in losses
        ]
    )
    beta = 0.9
    _, buffer = db_mtl(grads, None, step=1, beta=beta, losses=losses.detach())
    assert torch.isfinite(buffer).all()
    torch.testing.assert_close(buffer, (1 - beta) * log_grads, rtol=1e-12, atol=0.0)
