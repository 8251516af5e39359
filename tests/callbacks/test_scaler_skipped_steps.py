"""An optimizer step that float16 mixed precision's ``GradScaler`` skips (finite losses, gradients
that overflowed at the current loss scale: the first steps of most float16 fits) leaves nothing in
the weighting method's state or the evaluation weights, as the model does not move either; FAMO
learns nothing from it.

The real ``GradScaler`` on the CPU (Lightning's ``MixedPrecision("16-mixed", "cpu")`` plugin; the
``precision="16-mixed"`` flag turns into bfloat16 on a CPU) with a loss scale so large that the
first steps overflow in float16 and the scaler halves it until steps are taken.
"""

import itertools
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from tests.callbacks._fits import (
    ManualOptimization,
    OwnOptimizerStep,
    assert_nested_equal,
    trainer,
)
from tests.callbacks.test_refused_steps import STATEFUL
from tests.models import ThreeTaskNet, make_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FusedOptimizer(ThreeTaskNet):
    """Its optimizer's step() runs when the gradients overflowed and skips the update in its
    kernel (the scaler's found_inf), where another's step() is not called at all."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, fused=True)


# The model, and its batches per optimizer step (with 2, the first one's changes must go too).
MODELS = {
    "Lightning's optimizer_step": (ThreeTaskNet, 2),
    "an optimizer_step of its own": (OwnOptimizerStep, 2),
    "manual optimization": (ManualOptimization, 1),
    "a fused optimizer": (FusedOptimizer, 2),
}


class CheckpointAtEachStep(L.Callback):
    """Listed before the method: at the start, and at the end of each optimizer step's last
    batch, saves a weights-only and a full checkpoint and reads back the method's state, the
    evaluation weights (of both) and the model's parameters, with the scaler's loss scale."""

    def __init__(self, method: L.Callback, micro_batches: int, path: Path) -> None:
        self.method, self.micro_batches, self.path = method, micro_batches, path
        self.states: list[dict] = []

    def _record(self, trainer: L.Trainer) -> None:
        weights_only = self.path.with_suffix(".weights")
        trainer.save_checkpoint(weights_only, weights_only=True)  # first: no callback hook
        trainer.save_checkpoint(self.path)
        saved = torch.load(self.path, weights_only=False)
        self.states.append(
            {
                "method": saved["callbacks"][self.method.state_key],
                "weights": saved["lossagg"]["latest_weights"],
                "weights-only": torch.load(weights_only)["lossagg"]["latest_weights"],
                "parameters": list(saved["state_dict"].values()),
                "scale": trainer.precision_plugin.scaler.get_scale(),
            }
        )

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.micro_batches == 0:
            self._record(trainer)


def _float16_fit(
    name: str, model: str, path: Path, num_steps: int = 8, init_scale: float = 2.0**18
) -> list[dict]:
    method = STATEFUL[name]()
    model_class, micro_batches = MODELS[model]
    recorder = CheckpointAtEachStep(method, micro_batches, path / "step.ckpt")
    torch.manual_seed(0)
    net = model_class()  # float32: autocast runs its layers in float16
    batches = [make_batch(6, seed=i, dtype=torch.float32) for i in range(micro_batches * num_steps)]
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    accumulation = {"accumulate_grad_batches": micro_batches} if micro_batches > 1 else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer(
            [recorder, method],
            max_epochs=1,
            precision=None,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
            **accumulation,
        ).fit(net, DataLoader(batches, batch_size=None))
    return recorder.states


def _moved(before: dict, after: dict) -> bool:
    pairs = zip(before["parameters"], after["parameters"], strict=True)
    return any(not torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_step_the_grad_scaler_skips_leaves_the_method_state_as_before(name, model, tmp_path):
    # What a checkpoint saved right after the step holds, whoever saves it.
    states = _float16_fit(name, model, tmp_path)
    steps = list(itertools.pairwise(states))
    skipped = [after["scale"] < before["scale"] for before, after in steps]
    assert any(skipped) and not all(skipped), [s["scale"] for s in states]
    for index, ((before, after), was_skipped) in enumerate(zip(steps, skipped, strict=True)):
        assert _moved(before, after) != was_skipped, f"step {index}"
        if was_skipped:
            assert_nested_equal(after["method"], before["method"], f"state after step {index}")
            assert_nested_equal(after["weights"], before["weights"], f"weights after {index}")
            assert_nested_equal(after["weights-only"], before["weights"], f"alone after {index}")
    taken = [index for index, was_skipped in enumerate(skipped) if not was_skipped]
    # The comparison can fail: the steps that are taken do move the method's state.
    changed = [not _same(steps[index][1]["method"], steps[index][0]["method"]) for index in taken]
    assert any(changed), "no taken step moved the method's state"


def _same(actual: dict, expected: dict) -> bool:
    try:
        assert_nested_equal(actual, expected)
    except AssertionError:
        return False
    return True


class ManualWithoutSuper(ManualOptimization):
    def on_before_optimizer_step(self, optimizer) -> None:
        pass


def test_a_manual_step_whose_on_before_optimizer_step_skips_super_is_warned_of():
    batches = [make_batch(6, seed=i, dtype=torch.float32) for i in range(2)]
    with pytest.warns(UserWarning, match=r"on_before_optimizer_step does not call super"):
        trainer([], max_epochs=1, precision="32-true").fit(
            ManualWithoutSuper(), DataLoader(batches, batch_size=None)
        )
