import pytest
import torch
from torch.testing import assert_close
from torchjd.scalarization import Random

from lightning_lossagg.functional.rlw import rlw


def test_matches_torchjd_random_on_the_same_global_draw():
    torch.manual_seed(123)
    weights = rlw(5)
    torch.manual_seed(123)
    values = torch.ones(5, requires_grad=True)
    Random()(values).backward()
    assert_close(weights, values.grad)


def test_weights_are_positive_and_sum_to_one():
    weights = rlw(6, torch.Generator().manual_seed(0))
    assert weights.shape == (6,)
    assert (weights > 0).all()
    assert_close(weights.sum(), torch.tensor(1.0))


def test_generator_makes_draws_reproducible_and_fresh_each_step():
    first = torch.Generator().manual_seed(7)
    second = torch.Generator().manual_seed(7)
    step_one = rlw(4, first)
    assert_close(step_one, rlw(4, second))
    assert not torch.equal(step_one, rlw(4, first))


def test_distribution_is_softmax_of_a_standard_normal():
    # log(w_0 / w_1) = z_0 - z_1 ~ N(0, 2), and E[w_k] = 1/K by symmetry.
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([rlw(3, generator, dtype=torch.float64) for _ in range(20_000)])
    log_ratio = torch.log(draws[:, 0] / draws[:, 1])
    assert abs(log_ratio.mean().item()) < 0.05
    assert abs(log_ratio.var().item() - 2.0) < 0.1
    assert_close(draws.mean(dim=0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01, rtol=0)


def test_dtype_and_device_follow_the_arguments():
    weights = rlw(2, torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")
    assert weights.dtype == torch.float64
    assert weights.device.type == "cpu"


@pytest.mark.parametrize("num_tasks", [0, -1, 2.0, True, "3"])
def test_invalid_number_of_tasks_is_refused(num_tasks):
    with pytest.raises(ValueError, match="`num_tasks` must be an int >= 1"):
        rlw(num_tasks)


def test_several_draws_at_once_are_independent_rows_on_the_simplex():
    weights = rlw(3, torch.Generator().manual_seed(0), dtype=torch.float64, draws=4000)
    assert weights.shape == (4000, 3) and bool((weights > 0).all())
    assert_close(weights.sum(1), torch.ones(4000, dtype=torch.float64))
    assert_close(
        weights.mean(dim=0), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01, rtol=0
    )
    differences = weights[:, 0].log() - weights[:, 1].log()  # z_0 - z_1 ~ N(0, 2)
    assert float(differences.var()) == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize("draws", [0, -2, 1.5, True])
def test_an_invalid_number_of_draws_is_refused(draws):
    with pytest.raises(ValueError, match="`draws` must be None or an int >= 1"):
        rlw(3, draws=draws)


def test_the_draw_is_made_on_the_generators_device_by_default():
    # `device` defaults to the generator's device, not torch's default device: a CUDA
    # generator draws on CUDA. Observable on the CPU through another default device.
    expected = rlw(3, torch.Generator().manual_seed(0))
    with torch.device("meta"):
        weights = rlw(3, torch.Generator().manual_seed(0))
    assert weights.device.type == "cpu"
    assert_close(weights, expected, rtol=0, atol=0)
