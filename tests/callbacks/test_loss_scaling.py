"""LossScaling: its arguments, the two level modes, the warm-up, and tasks without labels."""

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lossagg.callbacks import LossScaling
from tests.callbacks._fits import ParametersAfterEachStep, SignedPriceNet, signed_price_batches
from tests.callbacks._loss_based import at_step, global_losses, trainer
from tests.models import ThreeTaskNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mode": "median"}, "`mode` must be 'ema'"),
        ({"decay": 1.0}, r"`decay` must be in \[0, 1\)"),
        ({"decay": -0.1}, r"`decay` must be in \[0, 1\)"),
        ({"decay": float("nan")}, r"`decay` must be in \[0, 1\)"),
        ({"warmup_steps": -1}, "`warmup_steps` must be an int >= 0"),
        ({"warmup_steps": 1.5}, "`warmup_steps` must be an int >= 0"),
        ({"eps": 0.0}, "`eps` must be > 0"),
    ],
)
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        LossScaling(**arguments)


def _run(callback: LossScaling, history: list) -> list[torch.Tensor]:
    callback.setup(None, ThreeTaskNet(), "fit")
    return [callback.task_weights(at_step(index), step) for index, step in enumerate(history)]


def test_initial_mode_divides_by_the_losses_of_the_first_step_after_the_warmup():
    history = [global_losses([8.0, 8.0, 8.0]), global_losses([4.0, 2.0, 5.0])]
    history += [global_losses([1.0, 1.0, 1.0])] * 2
    weights = _run(LossScaling(mode="initial", warmup_steps=1), history)
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(weights[0], ones)  # warm-up
    expected = 1 / torch.tensor([4.0, 2.0, 5.0], dtype=torch.float64)
    for step_weights in weights[1:]:
        torch.testing.assert_close(step_weights, expected)


def test_the_moving_level_runs_through_the_warmup():
    # decay 0.5: levels 4 -> 3 -> 2.5; the weights start after two warm-up steps.
    history = [global_losses([4.0, 4.0, 4.0]), global_losses([2.0, 2.0, 2.0])]
    history.append(global_losses([2.0, 2.0, 2.0]))
    weights = _run(LossScaling(mode="ema", decay=0.5, warmup_steps=2), history)
    torch.testing.assert_close(weights[1], torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(weights[2], torch.full((3,), 1 / 2.5, dtype=torch.float64))


def test_a_task_without_labels_keeps_its_level_and_has_weight_1_until_its_first():
    callback = LossScaling(mode="ema", decay=0.5)
    history = [
        global_losses([2.0, 5.0, 4.0], valid=[True, False, True]),
        global_losses([4.0, 5.0, 4.0], valid=[True, True, False]),
    ]
    weights = _run(callback, history)
    torch.testing.assert_close(weights[0], torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(weights[1], torch.tensor([1 / 3, 0.2, 0.25], dtype=torch.float64))
    torch.testing.assert_close(
        callback.state_to_log()["loss_level"], torch.tensor([3.0, 5.0, 4.0], dtype=torch.float64)
    )


def test_a_negative_loss_is_refused_before_the_optimizer_step():
    # A negative level would turn the task's weight around (1 / level < 0, or 1 / eps).
    batches = signed_price_batches(3, negative_at=2)
    model, after_step = SignedPriceNet().double(), ParametersAfterEachStep()
    with pytest.raises(ValueError, match=r"LossScaling .* 'price' \(-[0-9.]+\).*global step 2"):
        trainer([LossScaling(), after_step], max_epochs=1).fit(
            model, DataLoader(batches, batch_size=None)
        )
    assert len(after_step.parameters) == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, after_step.parameters[-1][name]), name  # step 2 never applied


def test_a_loss_of_exactly_zero_is_accepted():
    # decay 0.5: the level of price goes 1 -> 0.5.
    callback = LossScaling(mode="ema", decay=0.5)
    callback.setup(None, ThreeTaskNet(), "fit")
    for index, losses in enumerate([[1.0, 2.0, 4.0], [0.0, 2.0, 4.0]]):
        module = at_step(index)
        weights = callback.task_weights(module, global_losses(losses))
        callback.on_before_optimizer_step(module.trainer, module, None)
    torch.testing.assert_close(weights, torch.tensor([2.0, 0.5, 0.25], dtype=torch.float64))
