"""FAMO: its arguments, and the price of its re-evaluation (one extra forward per optimizer
step; its one extra all-reduce is counted in the 2-process test of test_loss_based_common)."""

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lossagg.callbacks import FAMO
from tests.callbacks._fits import ParametersAfterEachStep, SignedPriceNet, signed_price_batches
from tests.callbacks._loss_based import trainer, training_batches
from tests.models import ThreeTaskNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"lr": 0.0}, "`lr` must be > 0"),
        ({"lr": float("inf")}, "`lr` must be a finite number"),
        ({"weight_decay": -1e-3}, "`weight_decay` must be a finite number >= 0"),
        ({"weight_decay": "0"}, "`weight_decay` must be a number >= 0"),
        ({"eps": float("nan")}, "`eps` must be a finite number >= 0"),
    ],
)
def test_bad_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        FAMO(**arguments)


class CountingNet(ThreeTaskNet):
    def __init__(self) -> None:
        super().__init__()
        self.forward_calls = 0

    def forward(self, inputs):
        self.forward_calls += 1
        return super().forward(inputs)


@pytest.mark.parametrize(("accumulate", "expected_forwards"), [(1, 8), (2, 4 + 2)])
def test_one_extra_forward_per_optimizer_step(accumulate, expected_forwards):
    model, callback = CountingNet().double(), FAMO()
    run = trainer([callback], max_epochs=1, accumulate_grad_batches=accumulate)
    run.fit(model, DataLoader(training_batches(4), batch_size=None))
    assert run.global_step == 4 // accumulate
    assert model.forward_calls == expected_forwards
    assert not torch.equal(callback.state_to_log()["logit"], torch.zeros(3, dtype=torch.float64))


def test_a_loss_at_or_below_minus_eps_is_refused_before_the_optimizer_step():
    # log(L + eps) has no value there: the weights would turn around and the logits become NaN.
    batches = signed_price_batches(3, negative_at=2)
    model, after_step, famo = SignedPriceNet().double(), ParametersAfterEachStep(), FAMO()
    with pytest.raises(ValueError, match=r"FAMO .* 'price' \(-[0-9.]+\).*global step 2"):
        trainer([famo, after_step], max_epochs=1).fit(model, DataLoader(batches, batch_size=None))
    assert len(after_step.parameters) == 2
    for name, value in model.state_dict().items():
        assert torch.equal(value, after_step.parameters[-1][name]), name  # step 2 never applied
    assert torch.isfinite(famo.state_to_log()["logit"]).all()
