"""Hypothesis fuzzing: random task sets, batches, masks and Gramians never give NaN or hang.

Either a documented, clear error (ValueError/TypeError/KeyError naming the problem) or finite
output. Run with ``--hypothesis-show-statistics`` to see how many cases ran.
"""

import math

import lightning as L
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_lossagg import MultiTaskMixin, Task
from lightning_lossagg.functional.aligned_mtl import aligned_mtl
from lightning_lossagg.functional.cagrad import cagrad
from lightning_lossagg.functional.dwa import dwa
from lightning_lossagg.functional.gls import gls_weights
from lightning_lossagg.functional.imtl_g import imtl_g
from lightning_lossagg.functional.mgda import mgda
from lightning_lossagg.functional.nash_mtl import nash_mtl
from lightning_lossagg.functional.pcgrad import pcgrad
from lightning_lossagg.functional.upgrad import upgrad

LOSS_KINDS = {
    "mse": "float",
    "mae": "float",
    "huber": "float",
    "smooth_l1": "float",
    "bce_with_logits": "binary",
    "cross_entropy": "class",
}
CLASSES = 3
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FuzzNet(MultiTaskMixin, L.LightningModule):
    def __init__(self, losses: list[str], rank_weighting: str) -> None:
        super().__init__(
            tasks={f"t{i}": Task(loss) for i, loss in enumerate(losses)},
            rank_weighting=rank_weighting,
        )
        self.kinds = [LOSS_KINDS[loss] for loss in losses]
        self.trunk = nn.Linear(3, 4)
        self.heads = nn.ModuleDict(
            {
                f"t{i}": nn.Linear(4, CLASSES if kind == "class" else 1)
                for i, kind in enumerate(self.kinds)
            }
        )

    def forward(self, inputs):
        shared = self.trunk(inputs)
        return {
            name: head(shared) if kind == "class" else head(shared).squeeze(-1)
            for (name, head), kind in zip(self.heads.items(), self.kinds, strict=True)
        }


@st.composite
def task_batches(draw):
    losses = draw(st.lists(st.sampled_from(sorted(LOSS_KINDS)), min_size=1, max_size=4))
    size = draw(st.integers(0, 6))
    inputs = torch.tensor(draw(st.lists(st.floats(-5, 5), min_size=3 * size, max_size=3 * size)))
    targets = {}
    for i, loss in enumerate(losses):
        missing = draw(st.lists(st.booleans(), min_size=size, max_size=size))
        if LOSS_KINDS[loss] == "class":
            target = torch.tensor(
                draw(st.lists(st.integers(0, CLASSES - 1), min_size=size, max_size=size)),
                dtype=torch.long,
            )
            target[torch.tensor(missing, dtype=torch.bool)] = -100
        else:
            low = 0.0 if LOSS_KINDS[loss] == "binary" else -1e3
            high = 1.0 if LOSS_KINDS[loss] == "binary" else 1e3
            target = torch.tensor(
                draw(st.lists(st.floats(low, high), min_size=size, max_size=size))
            )
            target[torch.tensor(missing, dtype=torch.bool)] = torch.nan
        targets[f"t{i}"] = target
    return losses, (inputs.reshape(size, 3), targets), draw(st.sampled_from(["samples", "uniform"]))


@SETTINGS
@given(task_batches())
def test_the_mixin_step_is_finite_for_any_tasks_batch_and_labels(case):
    losses, batch, rank_weighting = case
    model = FuzzNet(losses, rank_weighting)
    objective = model.training_step(batch, 0)
    record = model.loss_record
    assert torch.isfinite(objective)
    assert torch.isfinite(record.weights).all() and torch.isfinite(record.objective)
    valid = record.counts > 0
    assert torch.isfinite(record.losses[valid]).all()
    assert torch.isnan(
        record.losses[~valid]
    ).all()  # documented: no valid sample → NaN loss, weight 0
    assert (record.weights[~valid] == 0).all()
    objective.backward()
    for parameter in model.parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all()


GRAMIAN_FUNCTIONS = {
    "mgda": mgda,
    "pcgrad": lambda g: pcgrad(g, torch.Generator().manual_seed(0)),
    "imtl_g": imtl_g,
    "upgrad": upgrad,
    "aligned_mtl": aligned_mtl,
    "cagrad": cagrad,
    "nash_mtl": nash_mtl,
}


@st.composite
def gramians(draw):
    num_tasks = draw(st.integers(1, 6))
    rank = draw(st.integers(0, num_tasks))
    scale = 10.0 ** draw(st.integers(-8, 8))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(max(rank, 1), 7, generator=generator, dtype=torch.float64)
    mixing = torch.randn(num_tasks, max(rank, 1), generator=generator, dtype=torch.float64)
    jacobian = scale * (mixing @ basis) if rank else torch.zeros(num_tasks, 7, dtype=torch.float64)
    return jacobian @ jacobian.T


@SETTINGS
@given(gramians(), st.sampled_from(sorted(GRAMIAN_FUNCTIONS)))
def test_every_gramian_method_gives_finite_weights_on_any_psd_gramian(gramian, name):
    weights = GRAMIAN_FUNCTIONS[name](gramian)
    assert weights.shape == (len(gramian),)
    assert torch.isfinite(weights).all(), (name, gramian)


@SETTINGS
@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=6), st.floats(0.1, 10))
def test_loss_based_methods_error_clearly_or_stay_finite_on_zero_and_huge_losses(
    losses, temperature
):
    losses = torch.tensor(losses, dtype=torch.float64)
    for function in (lambda: gls_weights(losses), lambda: dwa(losses, losses.flip(0), temperature)):
        try:
            weights = function()
        except ValueError as error:  # documented: the message names the offending task indices
            assert "indices" in str(error)
        else:
            assert torch.isfinite(weights).all() and math.isfinite(weights.sum().item())
