"""DWA: its arguments, windows of steps, and tasks without a rate."""

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lossagg.callbacks import DWA
from lightning_lossagg.functional.dwa import dwa
from tests.callbacks._fits import ParametersAfterEachStep, SignedPriceNet, signed_price_batches
from tests.callbacks._loss_based import (
    assert_nested_equal,
    at_step,
    expected_record_weights,
    fit_method,
    global_losses,
    trainer,
    training_batches,
)
from tests.models import ThreeTaskNet, make_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("temperature", [0.0, -2.0, float("nan"), float("inf")])
def test_a_bad_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="`temperature` must be"):
        DWA(temperature=temperature)


def test_a_numpy_temperature_is_taken_as_a_float():  # from a NumPy sweep or a config
    assert DWA(temperature=np.float32(2.0)).temperature == 2.0


@pytest.mark.parametrize("window_steps", [0, -5, 2.5, True])
def test_a_bad_window_is_refused(window_steps):
    with pytest.raises(ValueError, match="`window_steps` must be None"):
        DWA(window_steps=window_steps)


def test_windows_of_steps_replace_epochs():
    # One epoch of 8 steps in windows of 2 steps: the weights move within the epoch.
    batches = training_batches(2) * 4
    callback, recorder, _ = fit_method(
        "dwa", batches, max_epochs=1, callback=DWA(temperature=0.5, window_steps=2)
    )
    steps = recorder.steps
    assert [step["epoch"] for step in steps] == [0] * 8
    static = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    for step in steps[:4]:  # windows 0 and 1: weights 1
        assert torch.equal(step["weights"], torch.where(step["valid"], static, 0.0))
    assert not torch.allclose(steps[4]["weights"], steps[2]["weights"])
    for step, expected in zip(steps, expected_record_weights("dwa", steps, callback), strict=True):
        torch.testing.assert_close(step["weights"], expected, rtol=1e-12, atol=1e-12)


def test_a_task_without_a_valid_sample_in_a_period_takes_the_rate_1():
    # Windows of one step: task 1 has no label in window 1, so windows 2 and 3 have no rate for
    # it; the other tasks' rates are theirs.
    callback = DWA(temperature=2.0, window_steps=1)
    callback.setup(None, ThreeTaskNet(), "fit")
    history = [
        global_losses([4.0, 2.0, 1.0]),
        global_losses([2.0, 1.0, 3.0], valid=[True, False, True]),
        global_losses([1.0, 1.0, 1.0]),
        global_losses([1.0, 1.0, 1.0]),
    ]
    weights = [callback.task_weights(at_step(index), step) for index, step in enumerate(history)]
    expected_window_2 = dwa(torch.tensor([2.0, 1.0, 3.0]), torch.tensor([4.0, 1.0, 1.0]))
    expected_window_3 = dwa(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 1.0, 3.0]))
    torch.testing.assert_close(weights[2].float(), expected_window_2)
    torch.testing.assert_close(weights[3].float(), expected_window_3)
    assert callback.state_to_log()["loss_rate"][1] == 1.0


def test_the_rates_are_logged_from_the_third_period():
    callback = DWA(window_steps=1)
    callback.setup(None, ThreeTaskNet(), "fit")
    for index in range(3):
        callback.task_weights(at_step(index), global_losses([1.0 + index, 2.0, 3.0]))
        has_rates = "loss_rate" in callback.state_to_log()
        assert has_rates == (index == 2)
    torch.testing.assert_close(
        callback.state_to_log()["loss_rate"], torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    )


def _long_window_history(steps):
    """Losses of 3 tasks over ``steps`` steps, each task missing from some steps."""
    generator = torch.Generator().manual_seed(1)
    values = (torch.rand(steps, 3, generator=generator, dtype=torch.float64) + 0.5).tolist()
    return [global_losses(row, valid=[index % 5 != 0, True, index % 7 != 3]) for index, row in
            enumerate(values)]  # fmt: skip


def test_periods_longer_than_a_block_average_every_step():
    # Windows of 45 steps: each is summed in blocks of 32 steps and a rest of 13.
    window, history = 45, _long_window_history(3 * 45 + 1)
    callback = DWA(temperature=2.0, window_steps=window)
    callback.setup(None, ThreeTaskNet(), "fit")
    weights = [callback.task_weights(at_step(index), step) for index, step in enumerate(history)]
    losses = torch.stack([step.losses for step in history[: 2 * window]]).view(2, window, 3)
    valid = ~losses.isnan()
    means = torch.where(valid, losses, 0.0).sum(1) / valid.sum(1)  # one sample per valid task
    expected = dwa(means[1], means[0], temperature=2.0)
    for step in range(2 * window, 3 * window):
        torch.testing.assert_close(weights[step], expected, rtol=1e-12, atol=1e-12)


def test_a_checkpoint_amid_a_block_resumes_the_same_sums():
    history = _long_window_history(3 * 45 + 1)
    uninterrupted, first = DWA(window_steps=45), DWA(window_steps=45)
    for callback in (uninterrupted, first):
        callback.setup(None, ThreeTaskNet(), "fit")
    expected = [uninterrupted.task_weights(at_step(i), s) for i, s in enumerate(history)]
    for index, step in enumerate(history[:100]):  # 100 = 2 windows and 10 steps of a block
        first.task_weights(at_step(index), step)
    resumed = DWA(window_steps=45)
    resumed.setup(None, ThreeTaskNet(), "fit")
    resumed.load_state_dict(first.state_dict())
    for index, step in enumerate(history[100:], start=100):
        assert torch.equal(resumed.task_weights(at_step(index), step), expected[index])
    assert_nested_equal(resumed.state_dict(), uninterrupted.state_dict())


def test_a_negative_loss_is_refused_before_the_optimizer_step():
    # A ratio of mean losses that change sign means nothing (and a negative L(t-2) took rate 1).
    batches = signed_price_batches(3, negative_at=2)
    model, after_step = SignedPriceNet().double(), ParametersAfterEachStep()
    with pytest.raises(ValueError, match=r"DWA .* 'price' \(-[0-9.]+\).*global step 2"):
        trainer([DWA(window_steps=1), after_step], max_epochs=1).fit(
            model, DataLoader(batches, batch_size=None)
        )
    assert len(after_step.parameters) == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, after_step.parameters[-1][name]), name  # step 2 never applied


def test_a_loss_of_exactly_zero_is_accepted():
    callback = DWA(temperature=2.0, window_steps=1)
    callback.setup(None, ThreeTaskNet(), "fit")
    for index, losses in enumerate([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]):
        module = at_step(index)
        weights = callback.task_weights(module, global_losses(losses))
        callback.on_before_optimizer_step(module.trainer, module, None)
    expected = dwa(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(weights.float(), expected)


def test_a_period_mean_of_zero_gives_no_rate():
    # L(t-2) = 0 has no ratio: that task takes the rate 1, as a task without a valid sample.
    callback = DWA(temperature=2.0, window_steps=1)
    callback.setup(None, ThreeTaskNet(), "fit")
    history = [[0.0, 2.0, 1.0], [0.5, 1.0, 1.0], [0.5, 1.0, 1.0]]
    weights = [
        callback.task_weights(at_step(index), global_losses(losses))
        for index, losses in enumerate(history)
    ]
    expected = dwa(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 1.0]))
    torch.testing.assert_close(weights[2].float(), expected)
    assert callback.state_to_log()["loss_rate"][0] == 1.0


class _Stream(torch.utils.data.IterableDataset):
    """Batches for ever, without a length: an epoch that never ends."""

    def __iter__(self):
        seed = 0
        while True:
            yield make_batch(6, seed=seed)
            seed += 1


@pytest.mark.parametrize(
    ("window_steps", "endless", "warned"),
    [(None, True, True), (3, True, False), (None, False, False)],
    ids=["epochs-of-a-stream", "windows-of-a-stream", "epochs-of-a-sized-loader"],
)
def test_epoch_periods_on_an_endless_stream_are_warned_of(window_steps, endless, warned):
    data = _Stream() if endless else [make_batch(6, seed=seed) for seed in range(3)]
    run = trainer([DWA(window_steps=window_steps)], max_epochs=1, max_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.fit(ThreeTaskNet().double(), DataLoader(data, batch_size=None))
    messages = [str(warning.message) for warning in caught]
    assert any("DWA(window_steps=N)" in message for message in messages) == warned
