"""Properties shared by the loss-based weighting functions, written once and run on each."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from lightning_lossagg.functional.dwa import dwa
from lightning_lossagg.functional.famo import famo_logit_gradient, famo_weights
from lightning_lossagg.functional.gls import gls, gls_weights
from lightning_lossagg.functional.imtl_l import imtl_l_objective, imtl_l_weights
from lightning_lossagg.functional.loss_scaling import loss_scaling_weights, update_loss_levels
from lightning_lossagg.functional.rlw import rlw
from lightning_lossagg.functional.uncertainty import uncertainty_objective, uncertainty_weights

# Each entry maps a dict of per-task inputs (see `_per_task_inputs`) to K weights.
WEIGHTS = {
    "uncertainty": lambda x: uncertainty_weights(x["log_vars"], x["classification"]),
    "dwa": lambda x: dwa(x["prev"], x["prev2"]),
    "gls": lambda x: gls_weights(x["losses"]),
    "imtl_l": lambda x: imtl_l_weights(x["log_vars"]),
    "loss_scaling": lambda x: loss_scaling_weights(x["levels"]),
    "famo": lambda x: famo_weights(x["logits"], x["losses"]),
}
PER_TASK = {
    **WEIGHTS,
    "famo_logit_gradient": lambda x: famo_logit_gradient(x["logits"], x["prev2"], x["prev"]),
}
OBJECTIVES = {
    "gls": lambda x: gls(x["losses"]),
    "uncertainty": lambda x: uncertainty_objective(x["losses"], x["log_vars"], x["classification"]),
    "imtl_l": lambda x: imtl_l_objective(x["losses"], x["log_vars"]),
}
SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
NUM_TASKS = st.integers(min_value=1, max_value=8)


def _per_task_inputs(seed: int, num_tasks: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def positive() -> torch.Tensor:
        return torch.rand(num_tasks, generator=generator, dtype=torch.float64) * 5 + 0.01

    return {
        "log_vars": torch.randn(num_tasks, generator=generator, dtype=torch.float64),
        "classification": torch.rand(num_tasks, generator=generator) < 0.5,
        "logits": torch.randn(num_tasks, generator=generator, dtype=torch.float64),
        "losses": positive(),
        "prev": positive(),
        "prev2": positive(),
        "levels": positive(),
    }


@pytest.mark.parametrize("method", sorted(PER_TASK))
@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, num_tasks=NUM_TASKS)
def test_permuting_the_tasks_permutes_the_output(method, seed, num_tasks):
    inputs = _per_task_inputs(seed, num_tasks)
    permutation = torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed))
    permuted = {name: values[permutation] for name, values in inputs.items()}
    assert_close(PER_TASK[method](permuted), PER_TASK[method](inputs)[permutation])


@pytest.mark.parametrize("method", sorted(OBJECTIVES))
@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, num_tasks=NUM_TASKS)
def test_permuting_the_tasks_leaves_the_objective_unchanged(method, seed, num_tasks):
    inputs = _per_task_inputs(seed, num_tasks)
    permutation = torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed))
    permuted = {name: values[permutation] for name, values in inputs.items()}
    assert_close(OBJECTIVES[method](permuted), OBJECTIVES[method](inputs))


@pytest.mark.parametrize("method", [*sorted(WEIGHTS), "rlw"])
@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, num_tasks=NUM_TASKS)
def test_weights_are_positive_and_finite(method, seed, num_tasks):
    if method == "rlw":
        weights = rlw(num_tasks, torch.Generator().manual_seed(seed), dtype=torch.float64)
    else:
        weights = WEIGHTS[method](_per_task_inputs(seed, num_tasks))
    assert weights.shape == (num_tasks,)
    assert torch.isfinite(weights).all() and (weights > 0).all()


# Every task given the same inputs (loss 2, log-variance/log-scale 0.5, logit 0.3, history 2 → 2):
# the weight each method's formula gives, worked by hand for K = 4.
EQUAL_TASKS_WEIGHT = {
    "uncertainty": 0.5 * math.exp(-0.5),
    "dwa": 1.0,
    "gls": 1 / 4,
    "imtl_l": math.exp(0.5),
    "loss_scaling": 1 / 2,
    "famo": 1 / 4,
}


@pytest.mark.parametrize("method", sorted(WEIGHTS))
def test_equal_tasks_get_equal_finite_weights(method):
    def full(value: float) -> torch.Tensor:
        return torch.full((4,), value, dtype=torch.float64)

    inputs = {
        "log_vars": full(0.5),
        "classification": torch.zeros(4, dtype=torch.bool),
        "logits": full(0.3),
        "losses": full(2.0),
        "prev": full(2.0),
        "prev2": full(2.0),
        "levels": full(2.0),
    }
    assert_close(WEIGHTS[method](inputs), full(EQUAL_TASKS_WEIGHT[method]))


ZERO = torch.tensor([1.0, 0.0, 2.0])


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: dwa(ZERO, torch.ones(3)), id="dwa_latest_epoch_zero"),
        pytest.param(lambda: loss_scaling_weights(ZERO), id="loss_scaling_zero_level"),
        pytest.param(lambda: famo_weights(torch.zeros(3), ZERO), id="famo_weights"),
        pytest.param(
            lambda: famo_logit_gradient(torch.zeros(3), torch.ones(3), ZERO), id="famo_gradient"
        ),
        pytest.param(lambda: uncertainty_objective(ZERO, torch.zeros(3)), id="uncertainty"),
        pytest.param(lambda: imtl_l_objective(ZERO, torch.zeros(3)), id="imtl_l"),
    ],
)
def test_a_zero_loss_gives_a_finite_result(call):
    assert torch.isfinite(call()).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: gls(ZERO), r"indices \[1\]", id="gls"),
        pytest.param(lambda: gls_weights(ZERO), r"indices \[1\]", id="gls_weights"),
        pytest.param(lambda: dwa(torch.ones(3), ZERO), r"`prev2` is 0.*\[1\]", id="dwa_prev2"),
    ],
)
def test_a_zero_loss_without_a_defined_result_is_refused_by_index(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_famo_puts_almost_all_weight_on_a_loss_at_its_bound():
    assert_close(famo_weights(torch.zeros(3), ZERO)[1], torch.tensor(1.0))


POSITIVE_SCALES = st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(scales=POSITIVE_SCALES, seed=SEEDS)
def test_dwa_ignores_a_constant_factor_on_each_tasks_history(scales, seed):
    inputs = _per_task_inputs(seed, len(scales))
    factor = torch.tensor(scales, dtype=torch.float64)
    expected = dwa(inputs["prev"], inputs["prev2"])
    assert_close(dwa(inputs["prev"] * factor, inputs["prev2"] * factor), expected)


@settings(max_examples=40, deadline=None)
@given(scales=POSITIVE_SCALES, seed=SEEDS)
def test_famo_logit_gradient_ignores_a_constant_factor_on_each_tasks_losses(scales, seed):
    inputs = _per_task_inputs(seed, len(scales))
    factor = torch.tensor(scales, dtype=torch.float64)
    before, after = inputs["prev2"], inputs["prev"]
    expected = famo_logit_gradient(inputs["logits"], before, after, eps=0.0)
    scaled = famo_logit_gradient(inputs["logits"], before * factor, after * factor, eps=0.0)
    assert_close(scaled, expected)


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(min_value=1e-3, max_value=1e3), seed=SEEDS, num_tasks=NUM_TASKS)
def test_famo_weights_ignore_a_common_factor_on_all_losses(scale, seed, num_tasks):
    inputs = _per_task_inputs(seed, num_tasks)
    expected = famo_weights(inputs["logits"], inputs["losses"], eps=0.0)
    assert_close(famo_weights(inputs["logits"], inputs["losses"] * scale, eps=0.0), expected)


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(min_value=1e-3, max_value=1e3), seed=SEEDS, num_tasks=NUM_TASKS)
def test_gls_weights_scale_as_one_over_the_loss(scale, seed, num_tasks):
    losses = _per_task_inputs(seed, num_tasks)["losses"]
    weights = gls_weights(losses)
    # w_k L_k = G / K for every task ...
    assert_close(weights * losses, torch.full_like(losses, gls(losses).item() / num_tasks))
    # ... so scaling task 0 by c scales G by c^(1/K): w_0 by c^(1/K - 1), the others by c^(1/K).
    scaled = losses.clone()
    scaled[0] *= scale
    factor = torch.full_like(losses, scale ** (1 / num_tasks))
    factor[0] /= scale
    assert_close(gls_weights(scaled), weights * factor)


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, num_tasks=NUM_TASKS)
def test_loss_scaling_brings_every_task_to_the_common_level_one(seed, num_tasks):
    levels = _per_task_inputs(seed, num_tasks)["levels"]
    assert_close(loss_scaling_weights(levels) * levels, torch.ones_like(levels))


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, num_tasks=NUM_TASKS)
def test_learned_scales_at_their_optimum_equalise_the_weighted_losses(seed, num_tasks):
    inputs = _per_task_inputs(seed, num_tasks)
    losses, classification = inputs["losses"], inputs["classification"]
    # Stationary points worked by hand: UW s* = log(2 c L) with c = 1/2 or 1; IMTL-L s* = -log L.
    uw_optimum = torch.log(torch.where(classification, 2.0, 1.0) * losses)
    uw_weighted = uncertainty_weights(uw_optimum, classification) * losses
    assert_close(uw_weighted, torch.full_like(losses, 0.5))
    assert_close(imtl_l_weights(-torch.log(losses)) * losses, torch.ones_like(losses))


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda: gls(ZERO, validate_args=False), id="gls"),
        pytest.param(lambda: gls_weights(ZERO, validate_args=False), id="gls_weights"),
        pytest.param(lambda: dwa(torch.ones(3), ZERO, validate_args=False), id="dwa"),
        pytest.param(
            lambda: uncertainty_weights(torch.tensor([math.inf]), validate_args=False),
            id="uncertainty",
        ),
        pytest.param(
            lambda: imtl_l_weights(torch.tensor([math.nan]), validate_args=False), id="imtl_l"
        ),
        pytest.param(
            lambda: loss_scaling_weights(-ZERO - 1, validate_args=False), id="loss_scaling"
        ),
        pytest.param(
            lambda: update_loss_levels(None, ZERO * math.nan, 0.5, validate_args=False),
            id="update_loss_levels",
        ),
        pytest.param(lambda: famo_weights(torch.zeros(3), -ZERO, validate_args=False), id="famo"),
    ],
)
def test_validate_args_false_skips_the_value_checks_that_need_a_sync(call):
    # No ValueError: the caller has taken responsibility for the values.
    assert call().shape in {(), (1,), (3,)}


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: gls_weights(torch.tensor([1.0, 4.0, 9.0]), valid=torch.tensor([True])),
            ValueError,
            r"bool mask of the losses' shape \(3,\)",
        ),
        (
            lambda: gls_weights(torch.ones(3), valid=torch.tensor([1, 1, 0])),
            ValueError,
            "found torch.int64",
        ),
        (lambda: update_loss_levels(None, torch.tensor([2, 4]), 0.5), TypeError, "floating-point"),
        (lambda: loss_scaling_weights(torch.tensor([2, 0])), ValueError, "1-D floating-point"),
        (
            lambda: uncertainty_objective(torch.tensor([-1.0, 1.0]), torch.zeros(2)),
            ValueError,
            "unbounded below",
        ),
        (
            lambda: imtl_l_objective(torch.tensor([-1.0, 1.0]), torch.zeros(2)),
            ValueError,
            "unbounded below",
        ),
        (
            lambda: famo_weights(torch.tensor([0, 0]), torch.tensor([1.0, 3.0])),
            ValueError,
            "floating-point",
        ),
    ],
    ids=[
        "gls-valid-shape",
        "gls-valid-dtype",
        "levels-int",
        "scaling-int",
        "uw-negative",
        "imtl_l-negative",
        "famo-int",
    ],
)
def test_malformed_arguments_are_refused_naming_the_argument(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


def test_loss_scaling_weights_stay_finite_in_half_precision() -> None:
    # eps = 1e-8 is 0 in float16: a zero level's weight was inf.
    weights = loss_scaling_weights(torch.tensor([2.0, 0.0, 1e-6], dtype=torch.float16))
    assert weights.dtype == torch.float16 and weights.isfinite().all() and weights[0] == 0.5


def test_levels_keep_their_dtype_when_the_losses_have_another() -> None:
    levels = update_loss_levels(torch.ones(2, dtype=torch.float64), torch.tensor([2.0, 4.0]), 0.5)
    assert levels.dtype == torch.float64 and levels.tolist() == [1.5, 2.5]


def test_rlw_takes_any_integer_number_of_tasks() -> None:
    assert rlw(np.int64(3), torch.Generator().manual_seed(0)).shape == (3,)
