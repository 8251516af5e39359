"""PaddedForRanks: an evaluation set padded for DDP with samples that count for nothing, so that
the val/ and test/ figures of a 2-rank run are those of one process on the whole set."""

import math

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_lossagg import PaddedForRanks
from lightning_lossagg.callbacks import LossLogger
from lightning_lossagg.demos.penguins import TaskDataset
from tests.models import ThreeTaskNet, make_batch, reference_task_losses
from tests.process_group import rank_trainer, run_on_lightning_ranks


def _dataset(num_samples: int) -> TaskDataset:
    inputs, targets = make_batch(num_samples, seed=3)
    return TaskDataset(inputs, targets)


@pytest.mark.parametrize(("num_samples", "num_ranks", "padded"), [(7, 2, 8), (8, 2, 8), (7, 3, 9)])
def test_the_set_is_padded_to_a_multiple_of_the_ranks_and_keeps_its_samples(
    num_samples, num_ranks, padded
):
    data = _dataset(num_samples)
    padded_data = PaddedForRanks(data, num_ranks)
    assert len(padded_data) == padded
    for index in range(num_samples):
        inputs, targets = padded_data[index]
        assert torch.equal(inputs, data[index][0])
        for task, target in data[index][1].items():
            torch.testing.assert_close(targets[task], target, rtol=0, atol=0, equal_nan=True)


def test_a_padding_sample_has_the_first_inputs_and_every_label_missing():
    data = [(torch.ones(2), {"kind": torch.tensor([1, 2]), "price": torch.tensor(3.0)})] * 3
    inputs, targets = PaddedForRanks(data, 2, ignore_index={"kind": -1})[-1]
    assert torch.equal(inputs, torch.ones(2))
    assert targets["kind"].tolist() == [-1, -1] and targets["kind"].dtype == torch.int64
    assert math.isnan(targets["price"].item()) and targets["price"].dtype == torch.float32
    assert PaddedForRanks(data, 2)[3][1]["kind"].tolist() == [-100, -100]


def test_an_index_past_the_padding_is_an_index_error():
    padded = PaddedForRanks(_dataset(3), 2)
    with pytest.raises(IndexError, match="index 4 out of range for 4 samples"):
        padded[4]


@pytest.mark.parametrize(
    ("data", "num_ranks", "error", "message"),
    [
        ([(torch.ones(1), {"t": torch.ones(1)})], 0, ValueError, r"`num_ranks` must be an int"),
        ([(torch.ones(1), {"t": torch.ones(1)})], True, ValueError, r"trainer.world_size"),
        ([torch.ones(1)], 2, TypeError, r"pads \(inputs, \{task: target\}\) pairs.*Tensor"),
        ([(torch.ones(1), {"t": torch.tensor(True)})], 2, TypeError, r"Task 't'.*torch.bool"),
    ],
    ids=["no rank", "a bool", "not a pair", "bool target"],
)
def test_bad_input_is_refused_naming_the_fix(data, num_ranks, error, message):
    with pytest.raises(error, match=message):
        PaddedForRanks(data, num_ranks)[1]


def _validate_seven_samples(rank: int) -> dict[str, dict[str, float]]:
    """One rank of a 2-process job: the validation figures of 7 samples (3 per batch), padded
    and as Lightning's sampler gives them (it repeats the first)."""
    figures = {}
    for name, data in (("padded", PaddedForRanks(_dataset(7), 2)), ("plain", _dataset(7))):
        torch.manual_seed(0)
        trainer = rank_trainer(callbacks=[LossLogger(plot=False)])
        loader = DataLoader(data, batch_size=3)
        (metrics,) = trainer.validate(ThreeTaskNet().double(), loader, verbose=False)
        figures[name] = {key: float(value) for key, value in metrics.items()}
    return figures


@pytest.mark.ddp
def test_two_ranks_on_a_padded_set_give_the_figures_of_one_process_on_the_whole_set():
    torch.manual_seed(0)
    model = ThreeTaskNet().double()
    with torch.no_grad():
        expected = reference_task_losses(model, make_batch(7, seed=3))
    for figures in run_on_lightning_ranks(_validate_seven_samples):
        for task, loss in expected.items():
            assert figures["padded"][f"val/loss/{task}"] == pytest.approx(loss.item(), rel=1e-12)
        # The sampler's repeated sample counts twice without the padding (the test can fail).
        assert any(
            figures["plain"][f"val/loss/{task}"] != pytest.approx(loss.item(), rel=1e-6)
            for task, loss in expected.items()
        )
