"""The logged method state is the state the same step's logged weights came from, whichever
order the callbacks run in (the learned methods update their state at the optimizer step, before
the loggers read it at the batch's end)."""

import lightning as L
import pytest
import torch

from lightning_lossagg import callbacks
from tests.models import ThreeTaskNet, make_batch, quiet_trainer

STATIC = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)  # ThreeTaskNet's Task.weight


class Reader(L.Callback):
    """What a logger reads at each batch's end: the record's weights and the method's state."""

    def __init__(self, method) -> None:
        self.method, self.seen = method, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = pl_module.loss_record
        state = {k: v.clone() for k, v in self.method.state_to_log().items()}
        self.seen.append((record.weights.clone(), record.losses.clone(), state))


def _famo(state, losses, method):
    z = torch.softmax(state["logit"].double(), 0)
    weights = z / (losses + method.eps)
    return weights / weights.sum()


WEIGHTS_FROM_STATE = {
    "UncertaintyWeighting": lambda state, losses, method: 0.5 * torch.exp(-state["log_var"]),
    "IMTLL": lambda state, losses, method: torch.exp(state["log_scale"]),
    "GradNorm": lambda state, losses, method: state["learned_weight"],
    "FAMO": _famo,
}


@pytest.mark.parametrize("reader_first", [True, False], ids=["reader first", "method first"])
@pytest.mark.parametrize("name", sorted(WEIGHTS_FROM_STATE))
def test_the_logged_state_gives_the_logged_weights_of_the_same_step(name, reader_first):
    method = getattr(callbacks, name)(lr=0.1)
    reader = Reader(method)
    order = [reader, method] if reader_first else [method, reader]
    batches = [make_batch(8, seed=seed) for seed in range(4)]
    trainer = quiet_trainer(1, steps=4, callbacks=order)
    trainer.fit(ThreeTaskNet().double(), torch.utils.data.DataLoader(batches, batch_size=None))
    assert len(reader.seen) == 4
    for step, (weights, losses, state) in enumerate(reader.seen):
        adaptive = WEIGHTS_FROM_STATE[name](state, losses, method).double()
        torch.testing.assert_close(weights.double(), STATIC * adaptive, msg=f"step {step}")
    first, last = reader.seen[0][2], reader.seen[-1][2]
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the state does move
