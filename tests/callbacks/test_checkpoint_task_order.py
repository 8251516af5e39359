"""A callback's per-task state is kept by position in the model's task order: resuming it on a
model whose tasks are others, or the same in another order, is refused with the fix, before a
figure lands on the wrong task; a state that is not per task (a seed) resumes in any order."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_lossagg.callbacks import LossBalanceMonitor, LossLogger
from tests.callbacks._fits import loader, trainer, training_batches
from tests.callbacks.test_every_method import METHODS
from tests.models import ThreeTaskNet

CALLBACKS = {
    **METHODS,
    "LossLogger": lambda: LossLogger(),
    "LossBalanceMonitor": lambda: LossBalanceMonitor(window=2),
}
STATEFUL = ["DBMTL", "DWA", "FAMO", "GradNorm", "GradVac", "IMTLL", "LossBalanceMonitor"]
STATEFUL += ["LossLogger", "LossScaling", "NashMTL", "PCGrad", "RLW", "UncertaintyWeighting"]


def _checkpoint(tmp_path, name: str) -> str:
    # Saved after the first of two batches: mid-epoch, so that LossLogger's epoch figures are
    # in it too.
    torch.manual_seed(0)
    saving = ModelCheckpoint(tmp_path, "step1", every_n_train_steps=1)
    run = trainer([CALLBACKS[name](), saving], max_epochs=1, max_steps=1, enable_checkpointing=True)
    run.fit(ThreeTaskNet().double(), loader(training_batches(2)))
    return saving.best_model_path


def _resume(path: str, name: str, task_order: tuple[str, ...]) -> None:
    model = ThreeTaskNet(task_order=task_order).double()
    trainer([CALLBACKS[name]()], max_epochs=1).fit(
        model, loader(training_batches(2)), ckpt_path=path
    )


@pytest.mark.parametrize("name", STATEFUL)
def test_a_callbacks_state_resumes_only_on_its_tasks_in_their_order(tmp_path, name):
    path = _checkpoint(tmp_path, name)
    callback = CALLBACKS[name]()
    saved = torch.load(path, weights_only=False)["callbacks"]
    assert callback.state_key in saved, "the callback saved no state"
    if not getattr(callback, "state_is_per_task", True):
        _resume(path, name, ("kind", "price", "sold"))  # a seed: any order resumes
        return
    with pytest.raises(
        ValueError,
        match=r"for the tasks \['price', 'kind', 'sold'\], in that "
        r"order; this model's tasks are \['kind', 'price', 'sold'\]",
    ) as error:
        _resume(path, name, ("kind", "price", "sold"))
    assert "Give the tasks in the checkpoint's order" in str(error.value)
    assert callback.state_key in str(error.value)
    with pytest.raises(ValueError, match="Resume the model the checkpoint was saved from"):
        _resume(path, name, ("price", "kind"))
    _resume(path, name, ("price", "kind", "sold"))  # its own tasks and order resume
    # Evaluation does not use the state: a reordered model validates from the checkpoint.
    reordered = ThreeTaskNet(task_order=("kind", "price", "sold")).double()
    trainer([CALLBACKS[name]()], max_epochs=1).validate(
        reordered, loader(training_batches(1)), ckpt_path=path, verbose=False
    )
