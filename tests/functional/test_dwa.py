import math

import pytest
import torch
from torch.testing import assert_close
from torchjd.scalarization import DWA

from lightning_lossagg.functional.dwa import dwa


def _torchjd_dwa_weights(prev: torch.Tensor, prev2: torch.Tensor, temperature: float):
    """Feeds torchjd's DWA two one-batch epochs, then reads its weights off the gradient."""
    scalarizer = DWA(temperature)
    for epoch_mean in (prev2, prev):
        scalarizer(epoch_mean)
        scalarizer.step()
    values = torch.ones_like(prev, requires_grad=True)
    scalarizer(values).backward()
    return values.grad


@pytest.mark.parametrize("temperature", [0.5, 2.0, 10.0])
def test_matches_torchjd_dwa(temperature):
    generator = torch.Generator().manual_seed(1)
    prev2 = torch.rand(5, generator=generator) + 0.5
    prev = prev2 * (torch.rand(5, generator=generator) + 0.3)
    expected = _torchjd_dwa_weights(prev, prev2, temperature)
    assert_close(dwa(prev, prev2, temperature), expected)


def test_hand_worked_example():
    # r = [1, 2], T = 1: w = 2·[e, e²] / (e + e²) = [2 / (1 + e), 2e / (1 + e)].
    weights = dwa(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), temperature=1.0)
    assert_close(weights, torch.tensor([2 / (1 + math.e), 2 * math.e / (1 + math.e)]))


def test_weights_sum_to_the_number_of_tasks():
    generator = torch.Generator().manual_seed(2)
    weights = dwa(
        torch.rand(7, generator=generator) + 0.1, torch.rand(7, generator=generator) + 0.1
    )
    assert_close(weights.sum(), torch.tensor(7.0))


def test_temperature_limits():
    prev, prev2 = torch.tensor([1.0, 3.0, 2.0]), torch.ones(3)
    assert_close(dwa(prev, prev2, temperature=1e6), torch.ones(3), atol=1e-5, rtol=0)
    # A cold softmax puts all K = 3 of the weight on the slowest-falling task.
    assert_close(dwa(prev, prev2, temperature=1e-3), torch.tensor([0.0, 3.0, 0.0]))


def test_zero_latest_loss_is_a_finite_rate_of_zero():
    weights = dwa(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), temperature=1.0)
    assert_close(weights, torch.tensor([2 / (1 + math.e), 2 * math.e / (1 + math.e)]))


def test_weights_are_detached():
    prev = torch.ones(2, requires_grad=True)
    assert not dwa(prev, torch.ones(2)).requires_grad


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((torch.ones(2), torch.tensor([1.0, 0.0])), r"`prev2` is 0 at task indices \[1\]"),
        ((torch.tensor([math.nan, 1.0]), torch.ones(2)), r"`prev` must be finite.*\[0\]"),
        ((torch.ones(2), torch.tensor([1.0, math.inf])), r"`prev2` must be finite.*\[1\]"),
        ((torch.tensor([1e30, 1.0]), torch.tensor([1e-30, 1.0])), r"overflows.*\[0\]"),
        # A finite rate that the temperature pushes past the largest float (found by test_fuzz).
        (
            (
                torch.tensor([1.0, 1.0], dtype=torch.float64),
                torch.tensor([1e-308, 1.0], dtype=torch.float64),
                0.5,
            ),
            r"divided by the temperature overflows.*\[0\]",
        ),
        ((torch.ones(2), torch.ones(3)), "same shape"),
        ((torch.ones(2), torch.ones(2), 0.0), "`temperature`"),
        ((torch.ones(2), torch.ones(2), -1.0), "`temperature`"),
        ((torch.ones(2), torch.ones(2), math.nan), "`temperature`"),
    ],
)
def test_invalid_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        dwa(*arguments)
