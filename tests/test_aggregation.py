"""The exact global task losses: one process, and a real 2-process gloo group."""

import pytest
import torch

from lightning_lossagg import MaskedLoss, Task, global_task_losses
from lightning_lossagg.aggregation import GlobalTaskLosses, TaskLossReducer
from lightning_lossagg.tasks import StackedLosses
from tests.process_group import CollectiveCounter, run_on_ranks

TASKS = {
    "a": Task("mse"),
    "b": Task("mse", reduction="sum"),
    "c": Task("mse"),
    "d": Task("mse", reduction="sum"),
}

# Per-rank per-sample losses and masks: uneven sizes, rank 1 has no valid sample of task "c",
# no rank has one of task "d" (a sum of nothing: no loss, not a loss of 0).
RANK_DATA = {
    0: {
        "a": ([1.0, 2.0, 3.0], [1, 1, 0]),
        "b": ([1.0, 1.0], [1, 1]),
        "c": ([4.0, 6.0], [1, 1]),
        "d": ([7.0], [0]),
    },
    1: {
        "a": ([5.0], [1]),
        "b": ([2.0, 3.0, 4.0], [1, 0, 1]),
        "c": ([9.0, 9.0], [0, 0]),
        "d": ([2.0, 3.0], [0, 0]),
    },
}


def _masked(rank: int, requires_grad: bool = False) -> dict[str, MaskedLoss]:
    return {
        name: MaskedLoss(
            torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad),
            torch.tensor(mask, dtype=torch.bool),
        )
        for name, (values, mask) in RANK_DATA[rank].items()
    }


def _expected(rank_weighting: str) -> list[float]:
    if rank_weighting == "samples":  # one process on the concatenated batch
        return [(1 + 2 + 5) / 3, 1 + 1 + 2 + 4, (4 + 6) / 2, float("nan")]
    # every rank with a valid sample has an equal say
    return [((1 + 2) / 2 + 5) / 2, (1 + 1 + 2 + 4) / 2, 5.0, float("nan")]


def _rank_step(rank: int, rank_weighting: str, separate_tasks: bool) -> dict:
    masked = _masked(rank, requires_grad=True)
    with CollectiveCounter() as counter:
        step = global_task_losses(masked, TASKS, rank_weighting, separate_tasks)
    terms = step.task_terms if separate_tasks else step.local_terms
    all_values = [masked[n].values for n in step.names]
    grads, reached = [], []
    for term in terms:
        per_input = torch.autograd.grad(term, all_values, retain_graph=True, allow_unused=True)
        grads.append(per_input[len(grads)])
        reached.append([grad is not None for grad in per_input])
    return {
        "losses": step.losses,
        "counts": step.counts,
        "valid": step.valid,
        "calls": counter.calls,
        "grads": grads,
        "reached": reached,
    }


@pytest.mark.ddp
@pytest.mark.parametrize("rank_weighting", ["samples", "uniform"])
@pytest.mark.parametrize("separate_tasks", [False, True])
def test_two_ranks_give_the_global_losses_and_gradients_with_one_all_reduce(
    rank_weighting, separate_tasks
):
    results = run_on_ranks(_rank_step, rank_weighting, separate_tasks)
    if separate_tasks:  # each task's term reaches its own values only
        for result in results:
            assert result["reached"] == [[j == k for j in range(4)] for k in range(4)]
    expected = torch.tensor(_expected(rank_weighting), dtype=torch.float64)
    for result in results:
        torch.testing.assert_close(result["losses"], expected, equal_nan=True)
        assert result["valid"].tolist() == [True, True, True, False]
        assert result["counts"][3] == 0
        assert result["calls"] == ["all_reduce"]
    # DDP averages the ranks' gradients of the local terms: that average must be the gradient of
    # the global loss with respect to each rank's per-sample values.
    for k, name in enumerate(TASKS):
        for rank in (0, 1):
            values = torch.tensor(RANK_DATA[rank][name][0], dtype=torch.float64, requires_grad=True)
            all_values = {
                r: torch.tensor(RANK_DATA[r][name][0], dtype=torch.float64) for r in (0, 1)
            }
            all_values[rank] = values
            loss = _global_loss_by_hand(name, all_values, rank_weighting)
            if loss.requires_grad:
                (expected_grad,) = torch.autograd.grad(loss, values)
            else:  # this rank's values do not enter the global loss
                expected_grad = torch.zeros_like(values)
            torch.testing.assert_close(results[rank]["grads"][k] / 2, expected_grad)


def _global_loss_by_hand(name: str, values: dict, rank_weighting: str) -> torch.Tensor:
    masks = {r: torch.tensor(RANK_DATA[r][name][1], dtype=torch.bool) for r in (0, 1)}
    sums = {r: values[r][masks[r]].sum() for r in (0, 1)}
    counts = {r: int(masks[r].sum()) for r in (0, 1)}
    if rank_weighting == "samples":
        total = sums[0] + sums[1]
        return total if TASKS[name].reduction == "sum" else total / (counts[0] + counts[1])
    present = [r for r in (0, 1) if counts[r]]
    if not present:  # no loss: no gradient either
        return (sums[0] + sums[1]) * 0.0
    per_rank = [sums[r] / (counts[r] if TASKS[name].reduction == "mean" else 1) for r in present]
    return sum(per_rank) / len(present)


def test_one_process_issues_no_collective_and_matches_the_masked_mean():
    masked = {**_masked(0), **{}}
    with CollectiveCounter() as counter:
        step = global_task_losses(masked, TASKS)
    assert counter.calls == []
    expected = torch.tensor([1.5, 2.0, 5.0, torch.nan], dtype=torch.float64)
    torch.testing.assert_close(step.losses, expected, equal_nan=True)
    assert step.valid.tolist() == [True, True, True, False]
    torch.testing.assert_close(step.local_terms.detach()[:3], step.losses[:3])
    assert step.local_terms[3] == 0


@pytest.mark.parametrize("weights", [None, [2.0, 0.5, 0.0, 3.0]], ids=["ones", "weighted"])
@pytest.mark.parametrize("rank_weighting", ["samples", "uniform"])
def test_the_weighted_sum_is_the_weighted_terms_in_value_and_gradient(rank_weighting, weights):
    masked = _masked(0, requires_grad=True)
    step = global_task_losses(masked, TASKS, rank_weighting)
    w = torch.ones(4, dtype=torch.float64) if weights is None else torch.tensor(weights)
    expected = w.double() @ step.local_terms  # the terms themselves, from the cached property
    weighted = step.weighted_sum(None if weights is None else w)
    torch.testing.assert_close(weighted, expected, rtol=1e-15, atol=0)
    values = [masked[name].values for name in TASKS]
    grads = torch.autograd.grad(weighted, values, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, values)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-15, atol=0)
    assert step.dtype == weighted.dtype == torch.float64


@pytest.mark.parametrize("rank_weighting", ["samples", "uniform"])
def test_one_process_task_terms_equal_the_local_terms_each_in_its_own_graph(rank_weighting):
    masked = _masked(0, requires_grad=True)
    step = global_task_losses(masked, TASKS, rank_weighting, separate_tasks=True)
    assert step.task_terms is not None
    torch.testing.assert_close(torch.stack(step.task_terms), step.local_terms)
    for k, term in enumerate(step.task_terms):
        values = [masked[name].values for name in TASKS]
        grads = torch.autograd.grad(term, values, retain_graph=True, allow_unused=True)
        (expected,) = torch.autograd.grad(step.local_terms[k], values[k], retain_graph=True)
        torch.testing.assert_close(grads[k], expected)
        assert all(grad is None for j, grad in enumerate(grads) if j != k)
    assert global_task_losses(masked, TASKS, rank_weighting).task_terms is None


@pytest.mark.parametrize("separate_tasks", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rank_weighting", ["samples", "uniform"])
def test_a_task_without_a_valid_sample_has_no_loss_and_a_zero_term_still_in_the_graph(
    rank_weighting, reduction, separate_tasks
):
    # Its loss is its sum of nothing over a count of 0: NaN, whatever finite values are masked.
    values = torch.tensor([1e30, 4.0], requires_grad=True)
    masked = {"a": MaskedLoss(values, torch.tensor([False, False]))}
    tasks = {"a": Task("mse", reduction=reduction)}
    step = global_task_losses(masked, tasks, rank_weighting, separate_tasks)
    assert not step.valid[0] and torch.isnan(step.losses[0]) and step.counts[0] == 0
    terms = step.task_terms if separate_tasks else step.local_terms
    assert terms[0].item() == 0.0
    (grad,) = torch.autograd.grad(terms[0], values)
    assert torch.equal(grad, torch.zeros(2))


def test_stacked_groups_out_of_task_order_give_each_task_its_own_loss():
    # a, d share a loss and b, c another: groups [a, d] and [b, c], concatenated as a, d, b, c
    # (an order that is not its own inverse).
    tasks = {"a": Task("mse"), "b": Task("l1"), "c": Task("l1"), "d": Task("mse")}
    values = torch.tensor([1.0, 2.0, 3.0]) * torch.tensor([[1.0], [10.0], [100.0], [1000.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    groups = [(rows, MaskedLoss(values[rows], mask[rows])) for rows in ([0, 3], [1, 2])]
    step = TaskLossReducer(tasks)(StackedLosses(tuple(tasks), groups))
    expected = torch.stack([values[k][mask[k]].mean() for k in range(4)])
    torch.testing.assert_close(step.losses, expected)
    assert step.counts.tolist() == [2.0, 2.0, 2.0, 3.0]


def test_stacked_losses_weighted_uniformly_over_ranks_keep_a_sum_task_a_sum():
    tasks = {"a": Task("mse"), "b": Task("mse", reduction="sum")}
    values = torch.tensor([[1.0, 2.0, 6.0], [1.0, 4.0, 8.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    stacked = StackedLosses(tuple(tasks), [([0, 1], MaskedLoss(values, mask))])
    step = TaskLossReducer(tasks, "uniform")(stacked)
    expected = torch.stack([values[0][mask[0]].mean(), values[1][mask[1]].sum()])
    torch.testing.assert_close(step.losses, expected)
    torch.testing.assert_close(step.local_terms, expected)
    assert step.counts.tolist() == [1.0, 1.0]  # one rank with a valid sample of each


def test_a_nan_in_a_masked_out_position_is_ignored_but_a_valid_nan_is_flagged():
    masked = {
        "a": MaskedLoss(torch.tensor([1.0, torch.nan]), torch.tensor([True, False])),
        "b": MaskedLoss(torch.tensor([1.0, torch.inf]), torch.tensor([True, True])),
    }
    step = global_task_losses(masked, {"a": Task("mse"), "b": Task("mse")})
    assert step.losses[0] == 1.0
    assert step.nonfinite_ranks.tolist() == [0.0, 1.0]  # bit of rank 0 set for task b


def test_a_dropped_task_has_no_loss_even_when_its_sum_was_infinite():
    tasks = {"a": Task("mse"), "b": Task("mse")}
    masked = {
        "a": MaskedLoss(torch.tensor([1.0, 3.0]), torch.tensor([True, True])),
        "b": MaskedLoss(torch.tensor([1.0, torch.inf]), torch.tensor([True, True])),
    }
    reducer = TaskLossReducer(tasks)
    step = reducer(masked)
    assert step.losses.tolist() == [2.0, torch.inf]
    dropped = reducer.drop_tasks(step, masked, torch.tensor([False, True]))
    assert dropped.losses[0] == 2.0 and torch.isnan(dropped.losses[1])
    assert dropped.valid.tolist() == [True, False]


@pytest.mark.parametrize("path", ["stacked", "per task", "separate tasks"])
def test_bfloat16_losses_are_summed_and_counted_in_float32(path):
    # In bfloat16, 256 + 1 == 256: a count or sum kept in it stops growing. 1000 valid samples.

    tasks = {"a": Task("mse"), "b": Task("mse", reduction="sum")}
    reference = torch.rand(2, 1200, generator=torch.Generator().manual_seed(0)) + 0.5
    values = reference.to(torch.bfloat16).requires_grad_()
    mask = torch.ones(2, 1200, dtype=torch.bool)
    mask[:, 1000:] = False
    if path == "stacked":
        losses = StackedLosses(("a", "b"), [([0, 1], MaskedLoss(values, mask))])
    else:
        losses = {name: MaskedLoss(values[k], mask[k]) for k, name in enumerate(tasks)}
    step = TaskLossReducer(tasks)(losses, separate_tasks=path == "separate tasks")
    exact = values.detach().double()[:, :1000].sum(1)
    assert step.counts.tolist() == [1000.0, 1.0]
    assert step.losses.dtype == torch.float32
    torch.testing.assert_close(step.losses.double(), exact / torch.tensor([1000.0, 1.0]))
    (grad,) = torch.autograd.grad(step.local_terms.sum(), values)
    assert grad.dtype == torch.bfloat16
    assert torch.equal(grad[0, :1000], torch.full((1000,), 1e-3, dtype=torch.bfloat16))
    assert torch.equal(grad[1, :1000], torch.ones(1000, dtype=torch.bfloat16))
    assert not grad[:, 1000:].any()


def test_many_values_of_one_task_are_counted_and_summed_exactly():
    # Per-task losses as a dict (a custom task_losses) go through index_add, which adds one value
    # after another: in float32 a count stops at 2**24. A dense task: 2**24 + 2**22 values.
    tasks = {"pixels": Task("mse"), "label": Task("mse")}
    values = torch.rand(2**24 + 2**22, generator=torch.Generator().manual_seed(0)) + 0.5
    masked = {
        "pixels": MaskedLoss(values, torch.ones_like(values, dtype=torch.bool)),
        "label": MaskedLoss(torch.tensor([2.0, 4.0]), torch.tensor([True, True])),
    }
    step = global_task_losses(masked, tasks)
    assert step.counts.tolist() == [2**24 + 2**22, 2]
    assert step.losses.dtype == torch.float32
    torch.testing.assert_close(
        step.losses.double(), torch.stack([values.double().mean(), torch.tensor(3.0).double()])
    )


def test_stacked_losses_named_in_another_order_than_the_tasks_give_each_task_its_own_loss():
    # A StackedLosses' rows are indices into its own names: ("b", "a") puts b's values first.
    tasks = {"a": Task("mse"), "b": Task("mse")}
    values = torch.tensor([[10.0, 30.0, 50.0], [1.0, 3.0, 8.0]])  # rows: b, a
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    stacked = StackedLosses(("b", "a"), [([0, 1], MaskedLoss(values, mask))])
    step = global_task_losses(stacked, tasks)
    expected = torch.stack([values[1][mask[1]].mean(), values[0][mask[0]].mean()])  # a, b
    torch.testing.assert_close(step.losses, expected)
    assert step.counts.tolist() == [2.0, 3.0]


def test_dropping_a_task_keeps_the_other_tasks_terms_apart_for_per_task_gradients():
    # A gradient method takes one gradient per task from task_terms: after drop_task they must
    # still be there, the kept task's its own masked mean, the dropped one's 0 with no graph.
    tasks = {"a": Task("mse"), "b": Task("mse")}
    a = torch.tensor([1.0, 3.0, 100.0], requires_grad=True)
    b = torch.tensor([1.0, torch.inf], requires_grad=True)
    masked = {
        "a": MaskedLoss(a, torch.tensor([True, True, False])),
        "b": MaskedLoss(b, torch.tensor([True, True])),
    }
    reducer = TaskLossReducer(tasks)
    step = reducer(masked, separate_tasks=True)
    dropped = reducer.drop_tasks(step, masked, torch.tensor([False, True]))
    assert dropped.task_terms is not None
    kept, gone = dropped.task_terms
    torch.testing.assert_close(kept, a.detach()[:2].mean())
    (grad,) = torch.autograd.grad(kept, a)
    torch.testing.assert_close(grad, torch.tensor([0.5, 0.5, 0.0]))
    assert gone.item() == 0.0
    assert not gone.requires_grad or torch.autograd.grad(gone, b, allow_unused=True)[0] is None


def test_dropping_a_task_keeps_the_ranks_whose_loss_was_not_finite():
    # Under DDP the bit-sets come from the all-reduce (rank 1's bit: 2); dropping the task must
    # not replace them with figures of its own (rank 0's bit, from the NaN numerator).
    tasks = {"a": Task("mse"), "b": Task("mse")}
    masked = {
        "a": MaskedLoss(torch.tensor([1.0, 3.0]), torch.tensor([True, True])),
        "b": MaskedLoss(torch.tensor([1.0, 2.0]), torch.tensor([True, True])),
    }
    reducer = TaskLossReducer(tasks)
    local = reducer(masked)
    numerators = torch.tensor([4.0, torch.inf], dtype=torch.float64)
    bits = torch.tensor([0.0, 2.0], dtype=torch.float64)  # task b not finite on rank 1 only
    step = GlobalTaskLosses(
        local.names, numerators, local.counts, local.local_sums, local.term_scale, bits
    )
    dropped = reducer.drop_tasks(step, masked, bits > 0)
    assert dropped.nonfinite_ranks.tolist() == [0.0, 2.0]
