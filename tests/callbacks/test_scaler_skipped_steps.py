"""An optimizer step that float16 mixed precision's ``GradScaler`` skips (finite losses, gradients
that overflowed at the current loss scale: the first steps of most float16 fits) leaves nothing in
the weighting method's state or the evaluation weights, as the model does not move either; FAMO
learns nothing from it.

The real ``GradScaler`` on the CPU (Lightning's ``MixedPrecision("16-mixed", "cpu")`` plugin; the
``precision="16-mixed"`` flag turns into bfloat16 on a CPU) with a loss scale so large that the
first steps overflow in float16 and the scaler halves it until steps are taken.
"""

import copy
import itertools
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader

from tests.callbacks._fits import assert_nested_equal, trainer
from tests.callbacks.test_refused_steps import STATEFUL
from tests.models import ThreeTaskNet, make_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MICRO_BATCHES = 2  # per optimizer step: the first one's changes must go too


class StateAtEachStep(L.Callback):
    """At the start, and at the end of each optimizer step's last batch (as a callback that
    saves a checkpoint there, listed before the method, sees it): the method's state, the
    evaluation weights, the model's parameters and the scaler's loss scale."""

    def __init__(self, method: L.Callback) -> None:
        self.method = method
        self.states: list[dict] = []

    def _record(self, trainer: L.Trainer, pl_module) -> None:
        self.states.append(
            {
                "method": copy.deepcopy(self.method.state_dict()),
                "weights": pl_module._fold_step_weights(),
                "parameters": [p.detach().clone() for p in pl_module.parameters()],
                "scale": trainer.precision_plugin.scaler.get_scale(),
            }
        )

    def on_train_start(self, trainer, pl_module) -> None:
        self._record(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % MICRO_BATCHES == 0:
            self._record(trainer, pl_module)


def _float16_fit(name: str, num_steps: int = 6, init_scale: float = 2.0**18) -> list[dict]:
    method = STATEFUL[name]()
    recorder = StateAtEachStep(method)
    torch.manual_seed(0)
    model = ThreeTaskNet()  # float32: autocast runs its layers in float16
    batches = [make_batch(6, seed=i, dtype=torch.float32) for i in range(MICRO_BATCHES * num_steps)]
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer(
            [recorder, method],
            max_epochs=1,
            precision=None,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
            accumulate_grad_batches=MICRO_BATCHES,
        ).fit(model, DataLoader(batches, batch_size=None))
    return recorder.states


def _moved(before: dict, after: dict) -> bool:
    pairs = zip(before["parameters"], after["parameters"], strict=True)
    return any(not torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("name", list(STATEFUL))
def test_a_step_the_grad_scaler_skips_leaves_the_method_state_as_before(name):
    states = _float16_fit(name)
    steps = list(itertools.pairwise(states))
    skipped = [after["scale"] < before["scale"] for before, after in steps]
    assert any(skipped) and not all(skipped), [s["scale"] for s in states]
    for index, ((before, after), was_skipped) in enumerate(zip(steps, skipped, strict=True)):
        assert _moved(before, after) != was_skipped, f"step {index}"
        if was_skipped:
            assert_nested_equal(after["method"], before["method"], f"state after step {index}")
            assert_nested_equal(after["weights"], before["weights"], f"weights after {index}")
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
