"""LossScaling: its arguments, the two level modes, the warm-up, and tasks without labels."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from lightning_lossagg.callbacks import LossScaling
from lightning_lossagg.callbacks.loss_scaling import _host_moving_levels
from lightning_lossagg.functional.loss_scaling import update_loss_levels
from tests.callbacks._fits import (
    ParametersAfterEachStep,
    SignedPriceNet,
    assert_nested_equal,
    loader,
    signed_price_batches,
)
from tests.callbacks._fits import trainer as float64_trainer
from tests.callbacks._loss_based import Recorder, at_step, global_losses, trainer
from tests.models import ThreeTaskNet, make_batch

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
    """The weights of each step of ``history``, an optimizer step after each."""
    callback.setup(None, ThreeTaskNet(), "fit")
    weights = []
    for index, step in enumerate(history):
        module = at_step(index)
        weights.append(callback.task_weights(module, step))
        callback.on_before_optimizer_step(module.trainer, module, None)
    return weights


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


class _Operations(TorchDispatchMode):
    """Counts the tensor operations run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _weights_and_operations(
    callback: LossScaling, index: int, step, optimizer_step: bool = True
) -> tuple[torch.Tensor, int]:
    """One training step's weights and their tensor operations, then (``optimizer_step``) its
    optimizer step, where the host reads which tasks have a level."""
    module = at_step(index)
    step.losses  # the mixin's: computed before the method's hook  # noqa: B018
    with _Operations() as operations:
        weights = callback.task_weights(module, step)
    if optimizer_step:
        callback.on_before_optimizer_step(module.trainer, module, None)
    return weights, operations.count


def _set_up(**arguments) -> LossScaling:
    callback = LossScaling(decay=0.5, **arguments)
    callback.setup(None, ThreeTaskNet(), "fit")
    return callback


def _operations_of_a_general_step(**arguments) -> int:
    """A step's operations where the host has not yet read that every task has a level."""
    callback = _set_up(**arguments)
    _weights_and_operations(callback, 0, global_losses([2.0, 4.0, 8.0]), optimizer_step=False)
    return _weights_and_operations(callback, 1, global_losses([2.0, 4.0, 8.0]))[1]


@pytest.mark.parametrize("mode", ["ema", "initial"])
def test_once_every_task_has_a_level_the_steps_leave_out_the_operations_that_start_levels(mode):
    # decay 0.5. Step 0 starts every level at [2, 4, 8]; from step 1 (the host has read that
    # every task has one) the moving level takes at least three operations fewer, the initial
    # level none once its weights are known.
    callback = _set_up(mode=mode)
    history = [
        global_losses([2.0, 4.0, 8.0]),
        global_losses([4.0, 6.0, 8.0], valid=[True, False, True]),
        global_losses([3.0, 2.0, 4.0], valid=[True, True, False]),
    ]
    steps = [_weights_and_operations(callback, index, step) for index, step in enumerate(history)]
    levels = {
        "ema": [[2.0, 4.0, 8.0], [3.0, 4.0, 8.0], [3.0, 3.0, 8.0]],
        "initial": [[2.0, 4.0, 8.0]] * 3,
    }
    for (weights, _), level in zip(steps, levels[mode], strict=True):
        torch.testing.assert_close(weights, 1 / torch.tensor(level, dtype=torch.float64))
    if mode == "ema":
        general = _operations_of_a_general_step(mode=mode)
        assert all(operations <= general - 3 for _, operations in steps[1:])
    else:
        assert steps[2][1] == 0


@pytest.mark.parametrize("host_knew", [True, False])
def test_a_restored_state_takes_the_shorter_steps_where_the_saved_one_did(host_knew):
    # The two ways may differ in a float32 level's last bit: a resumed fit takes the shorter
    # steps from where the saved fit took them (its host had read that every task has a level),
    # not from where its levels alone would allow them.
    trained = _set_up(mode="ema")
    _weights_and_operations(trained, 0, global_losses([2.0, 4.0, 8.0]), optimizer_step=False)
    if host_knew:
        _weights_and_operations(trained, 1, global_losses([2.0, 4.0, 8.0]))
    restored = _set_up(mode="ema")
    restored.load_state_dict(trained.state_dict())
    weights, operations = _weights_and_operations(restored, 2, global_losses([4.0, 4.0, 4.0]))
    torch.testing.assert_close(weights, 1 / torch.tensor([3.0, 4.0, 6.0], dtype=torch.float64))
    general = _operations_of_a_general_step(mode="ema")
    assert (operations <= general - 3) if host_knew else (operations == general)


@pytest.mark.parametrize("decay", [0.0, 0.3, 0.9, 0.99])
def test_the_cpu_steps_host_levels_equal_the_functional_update(decay):
    # On the CPU a step's moving levels are computed in Python floats (both of torch.lerp's
    # forms); a task without a valid sample (NaN loss) keeps its level, as the tensor path's.
    generator = torch.Generator().manual_seed(0)
    levels = torch.rand(6, generator=generator, dtype=torch.float64) * 5
    for _ in range(30):
        losses = torch.rand(6, generator=generator, dtype=torch.float64) * 5
        losses[torch.rand(6, generator=generator) < 0.2] = torch.nan
        host_levels = _host_moving_levels(levels.tolist(), losses.tolist(), decay)
        host = torch.tensor(host_levels, dtype=torch.float64)
        updated = update_loss_levels(levels, losses, decay, validate_args=False)
        expected = torch.where(losses.isfinite(), updated, levels)
        # torch may fuse lerp's product and sum (one rounding fewer): a last-bit difference.
        torch.testing.assert_close(host, expected, rtol=4 * torch.finfo(torch.float64).eps, atol=0)
        levels = host


def _float32_fit(
    max_epochs: int, extra: tuple = (), ckpt_path=None, **kwargs
) -> tuple[Recorder, ThreeTaskNet]:
    """Two batches an epoch, a warm-up of two steps."""
    torch.manual_seed(0)
    model, recorder = ThreeTaskNet(), Recorder()
    callbacks = [LossScaling(warmup_steps=2), recorder, *extra]
    run = float64_trainer(callbacks, max_epochs, precision="32-true", **kwargs)
    batches = [make_batch(9, seed=seed, dtype=torch.float32) for seed in range(2)]
    run.fit(model, loader(batches), ckpt_path=ckpt_path)
    return recorder, model


def test_a_float32_fit_resumed_at_the_end_of_the_warmup_weighs_as_the_uninterrupted_one(tmp_path):
    # The first step after the warm-up weighs on the device (the host has not yet read that every
    # task has a level); a resumed fit must too: in float32 the host's way differs in a last bit.
    full, full_model = _float32_fit(3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first, _ = _float32_fit(1, extra=(checkpoint,), enable_checkpointing=True)
    second, resumed_model = _float32_fit(3, ckpt_path=tmp_path / "last.ckpt")
    steps = first.steps + second.steps
    assert len(steps) == len(full.steps) == 6
    for index, (resumed, uninterrupted) in enumerate(zip(steps, full.steps, strict=True)):
        assert torch.equal(resumed["weights"], uninterrupted["weights"]), f"step {index}"
    assert_nested_equal(resumed_model.state_dict(), full_model.state_dict())
    static = torch.tensor([task.weight for task in full_model.tasks.values()])
    for step in full.steps[2:]:  # either way, the weights are the reciprocals of the kept levels
        assert torch.equal(step["weights"], 1 / step["state"]["loss_level"] * static)


def test_initial_levels_are_each_tasks_first_loss_after_the_warmup_then_fixed():
    # Task 'sold' has no label at the first step after the warm-up: its level is its next loss,
    # and the other tasks keep theirs meanwhile (they are not re-anchored until all have one).
    callback = LossScaling(mode="initial", warmup_steps=1)
    callback.setup(None, ThreeTaskNet(), "fit")
    steps = [
        ([9.0, 9.0, 9.0], None),  # warm-up
        ([2.0, 4.0, 7.0], [True, True, False]),  # first step after it: levels of price, kind
        ([8.0, 16.0, 5.0], None),  # sold's first loss: its level
        ([3.0, 3.0, 3.0], None),
    ]
    for index, (losses, valid) in enumerate(steps):
        model = at_step(index)
        weights = callback.task_weights(model, global_losses(losses, valid))
        callback.on_before_optimizer_step(model.trainer, model, None)
    expected = 1.0 / torch.tensor([2.0, 4.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)
