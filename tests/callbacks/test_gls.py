"""GLS: the weighted objective is the geometric mean, and a loss <= 0 stops training before the
optimizer step, naming the task and the step."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lossagg.callbacks import GLS, NonPositiveLossError
from lightning_lossagg.callbacks.gls import _host_gls_weights
from lightning_lossagg.functional.gls import gls_weights
from tests.callbacks._fits import ParametersAfterEachStep, SignedPriceNet, signed_price_batches
from tests.callbacks._loss_based import at_step, global_losses, trainer
from tests.models import ThreeTaskNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _weights(losses: list[float], valid: list[bool] | None = None) -> torch.Tensor:
    callback = GLS()
    callback.setup(None, ThreeTaskNet(), "fit")
    return callback.task_weights(at_step(0), global_losses(losses, valid))


def test_the_weighted_losses_are_the_geometric_mean_and_its_gradient():
    losses = torch.tensor([0.5, 4.0, 32.0], dtype=torch.float64, requires_grad=True)
    weights = _weights(losses.tolist())
    geometric_mean = losses.prod() ** (1 / 3)  # 4
    assert float((weights * losses.detach()).sum()) == pytest.approx(4.0)
    (gradient,) = torch.autograd.grad(geometric_mean, losses)
    torch.testing.assert_close(weights, gradient)


def test_a_task_without_labels_leaves_the_mean_of_the_others():
    weights = _weights([0.5, 7.0, 2.0], valid=[True, False, True])
    # G over the two valid tasks is 1: w_k = G / (2 L_k).
    torch.testing.assert_close(weights[[0, 2]], torch.tensor([1.0, 0.25], dtype=torch.float64))


def test_a_non_positive_loss_is_refused_before_the_optimizer_step():
    batches = signed_price_batches(3, negative_at=2)
    model, after_step = SignedPriceNet().double(), ParametersAfterEachStep()
    with pytest.raises(NonPositiveLossError, match=r"'price' \(-[0-9.]+\).*global step 2"):
        trainer([GLS(), after_step], max_epochs=1).fit(model, DataLoader(batches, batch_size=None))
    assert len(after_step.parameters) == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, after_step.parameters[-1][name]), name  # step 2 never applied


def test_a_loss_of_exactly_zero_is_refused():
    callback = GLS()
    callback.setup(None, ThreeTaskNet(), "fit")
    module = at_step(1)
    callback.task_weights(module, global_losses([0.0, 2.0, 3.0]))
    with pytest.raises(NonPositiveLossError, match=r"'price' \(0\).*global step 1"):
        callback.on_before_optimizer_step(module.trainer, module, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_cpu_steps_host_arithmetic_equals_the_functional_weights(dtype):
    # On the CPU a step weighs in Python floats; every other device takes gls_weights.
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        losses = torch.rand(5, generator=generator, dtype=dtype) * 10 + 1e-3
        counts = (torch.rand(5, generator=generator) < 0.7).to(dtype) * 4
        losses = torch.where(counts > 0, losses, torch.nan)
        host = torch.tensor(_host_gls_weights(losses.tolist(), counts.tolist()), dtype=dtype)
        expected = gls_weights(losses, validate_args=False, valid=counts > 0)
        torch.testing.assert_close(host, expected, rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("loss", [0.0, -1.0, math.inf, math.nan])
def test_a_loss_the_host_cannot_take_is_left_to_the_tensor_arithmetic(loss):
    # <= 0 is GLS's error at the optimizer step, NaN and inf with a valid sample the mixin's.
    assert _host_gls_weights([1.0, loss], [3.0, 2.0]) is None
