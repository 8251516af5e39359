"""RLW: its argument, the distribution of its weights, and that it leaves the global RNG alone."""

import pytest
import torch

from lightning_lossagg.callbacks import RLW
from lightning_lossagg.callbacks.rlw import DRAW_BLOCK
from tests.callbacks._loss_based import at_step, global_losses
from tests.models import ThreeTaskNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True, None])
def test_a_bad_seed_is_refused(seed):
    with pytest.raises(ValueError, match="`seed` must be an int >= 0"):
        RLW(seed=seed)


def _draws(seed: int, steps: range) -> torch.Tensor:
    callback = RLW(seed=seed)
    callback.setup(None, ThreeTaskNet(), "fit")
    step = global_losses([1.0, 1.0, 1.0])
    return torch.stack([callback.task_weights(at_step(index), step) for index in steps])


def test_the_weights_are_the_softmax_of_a_standard_normal_draw():
    # log w_i - log w_j = z_i - z_j with z ~ N(0, I): mean 0, variance 2, independent of the
    # steps' order. 4000 steps: the sample moments are within a few percent.
    weights = _draws(seed=0, steps=range(4000))
    assert bool((weights > 0).all())
    torch.testing.assert_close(weights.sum(1), torch.ones(4000, dtype=torch.float64))
    differences = weights[:, 0].log() - weights[:, 1].log()
    assert abs(float(differences.mean())) < 0.1
    assert float(differences.var()) == pytest.approx(2.0, rel=0.1)
    lag_correlation = torch.corrcoef(torch.stack([differences[1:], differences[:-1]]))[0, 1]
    assert abs(float(lag_correlation)) < 0.1


def test_the_weights_depend_on_seed_and_step_only():
    torch.manual_seed(1)
    first = _draws(seed=5, steps=range(10, 13))
    torch.manual_seed(2)
    assert torch.equal(_draws(seed=5, steps=range(10, 13)), first)
    assert torch.equal(_draws(seed=5, steps=range(12, 13)), first[2:])  # resumed at step 12
    assert not torch.equal(_draws(seed=6, steps=range(10, 13)), first)
    assert len({tuple(row.tolist()) for row in first}) == 3


def test_a_run_resumed_in_another_block_of_draws_draws_the_same_weights():
    # Weights are drawn DRAW_BLOCK steps at a time: a resumed run starts mid-block.
    steps = range(DRAW_BLOCK - 3, DRAW_BLOCK + 3)
    uninterrupted = _draws(seed=5, steps=steps)
    assert torch.equal(_draws(seed=5, steps=steps[4:]), uninterrupted[4:])
    assert torch.equal(_draws(seed=5, steps=steps[:2]), uninterrupted[:2])
    assert len({tuple(row.tolist()) for row in uninterrupted}) == len(steps)


def test_the_global_random_generator_is_not_touched():
    callback = RLW(seed=0)
    callback.setup(None, ThreeTaskNet(), "fit")
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    for index in range(5):
        callback.task_weights(at_step(index), global_losses([1.0, 1.0, 1.0]))
    assert torch.equal(torch.rand(4), expected)


def test_each_block_of_draws_has_a_seed_of_its_own():
    same_row_of_three_blocks = _draws(seed=5, steps=range(3, 3 * DRAW_BLOCK, DRAW_BLOCK))
    assert len({tuple(row.tolist()) for row in same_row_of_three_blocks}) == 3


def test_a_seeds_later_blocks_are_not_another_seeds_earlier_ones():
    # Each block's generator is seeded from the pair (seed, block): with a seed derived from
    # seed + block, two runs with seeds 5 and 6 would draw the same weights one block apart.
    for shift in (1, 2):
        start = shift * DRAW_BLOCK
        later_block_of_seed_5 = _draws(seed=5, steps=range(start, start + 3))
        assert not torch.equal(later_block_of_seed_5, _draws(seed=5 + shift, steps=range(3)))
