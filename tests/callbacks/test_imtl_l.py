"""IMTLL: its argument and its default, its optimum on fixed losses (every scaled loss at 1), and
one model per instance and state."""

import lightning as L
import pytest
import torch

from lightning_lossagg import MultiTaskMixin, Task
from lightning_lossagg.callbacks import IMTLL
from tests.callbacks._loss_based import at_step, global_losses
from tests.models import ThreeTaskNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), None])
def test_a_bad_learning_rate_is_refused(lr):
    with pytest.raises(ValueError, match="`lr` must be"):
        IMTLL(lr=lr)


def test_on_fixed_losses_every_scaled_loss_reaches_1():
    # e^s L - s is minimal at e^s = 1 / L. Direct calls: one step of the log-scales per model step.
    callback = IMTLL(lr=0.05)
    callback.setup(None, ThreeTaskNet(), "fit")
    losses = [0.1, 1.0, 20.0]
    step = global_losses(losses)
    for _ in range(400):
        weights = callback.task_weights(at_step(0), step)
        callback.on_before_optimizer_step(None, at_step(0), None)
    scaled = weights * torch.tensor(losses, dtype=torch.float64)
    torch.testing.assert_close(scaled, torch.ones(3, dtype=torch.float64), rtol=0.02, atol=0)
    torch.testing.assert_close(
        callback.state_to_log()["log_scale"].exp(), 1 / step.losses, rtol=0.02, atol=0
    )


class TwoTaskNet(MultiTaskMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__(tasks={"a": Task("mse"), "b": Task("mse")})


def test_one_instance_serves_one_model():
    callback = IMTLL()
    callback.setup(None, ThreeTaskNet(), "fit")
    callback.task_weights(at_step(0), global_losses([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="create a new IMTLL for this model with 2 tasks"):
        callback.setup(None, TwoTaskNet(), "fit")


def test_a_state_saved_for_a_model_with_other_tasks_is_refused():
    saved = IMTLL()
    saved.setup(None, TwoTaskNet(), "fit")
    saved.task_weights(at_step(0), global_losses([1.0, 2.0]))
    saved.on_before_optimizer_step(None, at_step(0), None)
    callback = IMTLL()
    callback.setup(None, ThreeTaskNet(), "fit")
    with pytest.raises(ValueError, match=r"holds \(2,\) values for a model with 3 tasks"):
        callback.load_state_dict(saved.state_dict())


def test_by_default_the_first_step_moves_each_log_scale_by_0_01():
    # Adam's first step is lr * sign(gradient); d/ds (e^s L - s) = L - 1 = 1 at s = 0, L = 2.
    callback = IMTLL()
    callback.setup(None, ThreeTaskNet(), "fit")
    callback.task_weights(at_step(0), global_losses([2.0, 2.0, 2.0]))
    callback.on_before_optimizer_step(None, at_step(0), None)
    torch.testing.assert_close(
        callback.state_dict()["scales"]["values"], torch.full((3,), -0.01, dtype=torch.float64)
    )
