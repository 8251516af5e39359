"""Linear heads: the Gramian and the update from the heads' factors (the gradient at their
outputs and their weights), at the first step on the heads' views, and from the second step on
with every head computed in one autograd node that makes no per-task gradient at all (checked
against the views' path, which the first step checks against the hand-made reference)."""

import copy

import pytest
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch.utils.data import DataLoader

from lightning_lossagg.callbacks import NashMTL, gradient_weighting
from lightning_lossagg.callbacks.gradient_weighting import (
    _factored_combination,
    _factored_gramian,
)
from tests.callbacks._recording_nets import (
    FactoredGradients,
    InPlaceOutputNet,
    LinearFactorsNet,
    ManyClassesNet,
    NormalisedGradients,
    OwnForwardNet,
    PriceInputResidualNet,
    RecordingNet,
    ScaledHeadOutputNet,
    assert_matches,
    fit_model,
    reference_update,
)
from tests.models import ThreeTaskNet, concat_batches, make_batch, quiet_trainer


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("net", "rows"),
    [
        (LinearFactorsNet, (5, 8)),
        # Uneven batches on either side of where the exact operation counts cross: the choice
        # must not depend on the batch, or the ranks issue their all-reduces in different orders.
        (RecordingNet, (20, 40)),
    ],
)
def test_two_rank_linear_head_factors_equal_one_process_on_the_concatenated_batch(
    tmp_path, net, rows
):
    rank0, rank1 = make_batch(rows[0], seed=1), make_batch(rows[1], seed=2)
    rank1[1]["kind"][:] = -100
    model = net(str(tmp_path), [rank0, rank1])
    reference = reference_update(model, concat_batches(rank0, rank1), rep_grad=True)
    method = FactoredGradients(rep_grad=True)
    method.linear_factors_from = 3  # with 3 tasks the others take dot products
    fit_model(model, 2, method, "64-true")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [result["linear_heads"] for result in results] == [True, True]
    torch.testing.assert_close(results[0]["weights"], results[1]["weights"], rtol=0, atol=0)
    for result in results:
        assert_matches(result, reference)


def _cast(batch, dtype):
    inputs, targets = batch
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in targets.items()}
    return inputs.to(dtype), cast


@pytest.mark.parametrize(
    ("net", "method", "linear", "factored"),
    [
        (LinearFactorsNet, FactoredGradients, True, True),
        (InPlaceOutputNet, FactoredGradients, True, True),
        (OwnForwardNet, FactoredGradients, False, False),
        (ScaledHeadOutputNet, FactoredGradients, False, False),
        (PriceInputResidualNet, FactoredGradients, False, False),
        # 3 tasks, below linear_factors_from (which serves the views, under autocast): the
        # heads run as one node from the first step on, the layout checked on a probe.
        (LinearFactorsNet, NormalisedGradients, True, True),
        (ManyClassesNet, FactoredGradients, False, False),  # the sizes favour the views
    ],
)
def test_linear_heads_give_the_gramian_and_update_from_their_factors(
    tmp_path, monkeypatch, net, method, linear, factored
):
    calls = []
    original = gradient_weighting._factored_gramian
    monkeypatch.setattr(
        gradient_weighting, "_factored_gramian", lambda *a: calls.append(1) or original(*a)
    )
    batch = make_batch(9, seed=5)
    model = net(str(tmp_path), [batch])
    reference = reference_update(model, batch, rep_grad=True)
    fit_model(model, 1, method(rep_grad=True))
    assert_matches(torch.load(tmp_path / "rank0.pt"), reference)
    assert len(calls) == int(factored)
    assert bool(model._linear_heads) is linear


def _per_head_gradients(outputs: torch.Tensor, weights: torch.Tensor, sizes: list[int]):
    """The K × (N·H) gradients ``D_k W_k``, one row per head of ``sizes[k]`` outputs."""
    blocks = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    return torch.stack(
        [(outputs[:, blocks == k] @ weights[blocks == k]).flatten() for k in range(len(sizes))]
    )


def test_factored_gramian_and_combination_equal_those_of_the_products():
    generator = torch.Generator().manual_seed(0)
    sizes = [1, 3, 2]
    outputs = torch.randn(7, sum(sizes), generator=generator, dtype=torch.float64)
    weights = torch.randn(sum(sizes), 4, generator=generator, dtype=torch.float64)
    gradients = _per_head_gradients(outputs, weights, sizes)
    factors = (outputs, weights, sizes)
    torch.testing.assert_close(_factored_gramian(*factors), gradients @ gradients.T)
    adaptive = torch.tensor([0.5, -2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(
        _factored_combination(*factors, adaptive), (adaptive @ gradients).view(7, 4)
    )
    ones = (outputs[:, :3], weights[:3], [1, 1, 1])  # one output per head: no block sums
    torch.testing.assert_close(
        _factored_gramian(*ones),
        (outputs[:, :3].T @ outputs[:, :3]) * (weights[:3] @ weights[:3].T),
    )


def _softmax_head_with_a_common_row_part(offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A regression head's and a 3-class head's factors, the class head's output gradients
    summing to 0 in each row (softmax minus one-hot) and its weight rows sharing a part of size
    ``offset``, which no gradient ``D_k W_k`` sees."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(32, 3, generator=generator)
    classes = torch.nn.functional.one_hot(torch.randint(0, 3, (32,), generator=generator), 3)
    outputs = torch.cat([torch.randn(32, 1, generator=generator), logits.softmax(1) - classes], 1)
    weights = torch.randn(4, 16, generator=generator)
    weights[1:] += offset * torch.linspace(-1, 1, 16)
    return outputs, weights


def _autocast_factors(num_outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(num_outputs)
    outputs = torch.randn(64, num_outputs, generator=generator).bfloat16()
    return outputs, torch.randn(num_outputs, 16, generator=generator)


@pytest.mark.parametrize(
    ("factors", "sizes"),
    [
        pytest.param(_softmax_head_with_a_common_row_part(0.0), [1, 3], id="softmax"),
        # Cancelled to nothing in float32: the class task's gradient norm logged as 0, and its
        # MGDA weight from a Gramian without its gradient.
        pytest.param(_softmax_head_with_a_common_row_part(3000.0), [1, 3], id="common-part"),
        # Under autocast: bfloat16 output gradients, float32 weights.
        pytest.param(_autocast_factors(5), [1, 1, 1, 1, 1], id="bf16"),
        pytest.param(_autocast_factors(7), [2, 1, 3, 1], id="bf16-blocks"),
    ],
)
def test_the_factored_gramian_is_the_float32_gramian_of_the_factors_values(factors, sizes):
    outputs, weights = factors
    gradients = _per_head_gradients(outputs.double(), weights.double(), sizes)
    gramian = _factored_gramian(outputs, weights, sizes)
    assert gramian.dtype == torch.float32
    torch.testing.assert_close(gramian.double(), gradients @ gradients.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sizes", [[1, 3], [1, 1, 1, 1]])
def test_the_factored_gramian_takes_the_widest_dtype_of_its_factors(sizes):
    outputs, weights = _softmax_head_with_a_common_row_part(0.0)
    gramian = _factored_gramian(outputs, weights.double(), sizes)
    gradients = _per_head_gradients(outputs.double(), weights.double(), sizes)
    assert gramian.dtype == torch.float64
    torch.testing.assert_close(gramian, gradients @ gradients.T, rtol=1e-12, atol=1e-12)


def test_the_factors_are_used_where_they_take_fewer_operations():
    pays = ThreeTaskNet._linear_factors_pay
    two_heads = [torch.nn.Linear(256, 1), torch.nn.Linear(256, 1)]
    assert pays(two_heads, torch.zeros(256, 256))
    three = [torch.nn.Linear(8, 1), torch.nn.Linear(8, 3), torch.nn.Linear(8, 1)]
    # Per row: 5 * 5 + 5 * 8 = 65 against (6 + 3) * 8 = 72, whatever the batch (the same choice
    # on every rank).
    assert pays(three, torch.zeros(4, 8)) and pays(three, torch.zeros(64, 8))
    many_classes = [torch.nn.Linear(8, 1), torch.nn.Linear(8, 12), torch.nn.Linear(8, 1)]
    assert not pays(many_classes, torch.zeros(4096, 8))  # 14 outputs: 308 against 72
    assert not pays([torch.nn.Linear(256, 256)] * 2, torch.zeros(256, 256))  # wide heads
    assert not pays(two_heads, torch.zeros(4, 8, 256))  # not a matrix: the views' gradients


class SecondKindCallNet(LinearFactorsNet):
    """From the second step on, kind's head is called a second time (the output unused)."""

    def forward_heads(self, shared):
        predictions = ThreeTaskNet.forward_heads(self, shared)
        if self.global_step >= 1:
            self.heads["kind"](shared)
        return predictions


class KindReadsATransformFromTheSecondStepNet(LinearFactorsNet):
    """From the second step on, kind's head is called once, on tanh of the representation."""

    def forward_heads(self, shared):
        kind_input = torch.tanh(shared) if self.global_step >= 1 else shared
        return {
            "price": self.heads["price"](shared).squeeze(-1),
            "kind": self.heads["kind"](kind_input),
            "sold": self.heads["sold"](shared).squeeze(-1),
        }


def _with_views_throughout(model):
    views = copy.deepcopy(model)
    views._predict_with_linear_heads = lambda *args: None
    return views


@pytest.mark.parametrize(
    ("net", "method", "one_node"),
    [
        (LinearFactorsNet, FactoredGradients, [True, True, True]),
        (LinearFactorsNet, NormalisedGradients, [True, True, True]),
        (InPlaceOutputNet, NormalisedGradients, [True, True, True]),
        (SecondKindCallNet, NormalisedGradients, [True, False]),  # refused once, then the views
        (KindReadsATransformFromTheSecondStepNet, NormalisedGradients, [True, False]),
        # Its heads take its weights too: one node, or the pass before backward (not the views).
        (LinearFactorsNet, NashMTL, [True, True, True]),
    ],
)
def test_heads_in_one_node_give_the_weights_and_update_of_the_views(
    tmp_path, net, method, one_node
):
    batch = make_batch(9, seed=5)
    batch[1]["sold"][:4] = float("nan")  # a task with fewer valid samples
    model = net(str(tmp_path), [batch])
    views = _with_views_throughout(model)
    fit_model(model, 1, method(rep_grad=True), steps=3)
    fit_model(views, 1, method(rep_grad=True), steps=3)
    assert model.one_node_steps == one_node
    assert bool(model._linear_heads) is all(one_node)
    assert len(model.records) == len(views.records) == 3
    assert not torch.equal(model.records[0]["weights"], model.records[2]["weights"])
    for index, (record, expected) in enumerate(zip(model.records, views.records, strict=True)):
        assert_matches(record, expected)
        assert all(grad.abs().sum() > 0 for grad in record["grads"].values()), index


def _l1_pruned(head: torch.nn.Linear) -> torch.nn.Linear:
    return torch.nn.utils.prune.l1_unstructured(head, "weight", amount=0.25)


def _max_norm(head: torch.nn.Linear) -> torch.nn.Linear:
    """A max-norm constraint kept by a pre-hook: the weight, still the head's parameter, is
    renormalised in place at each call."""

    def renormalise(module: torch.nn.Module, args: tuple) -> None:
        with torch.no_grad():
            module.weight.copy_(torch.renorm(module.weight, 2, 0, 0.5))

    head.register_forward_pre_hook(renormalise)
    return head


class HookedHeadsNet(LinearFactorsNet):
    """Seeded, with three batches an epoch."""

    def __init__(self, *args, wrap=None) -> None:
        torch.manual_seed(0)
        super().__init__(*args)
        for name, head in self.heads.items():
            self.heads[name] = head if wrap is None else wrap(head)

    def train_dataloader(self):
        return DataLoader(self.rank_batches * 3, batch_size=None)


def _fit_with_views_too(tmp_path, steps: int, wrap=None, prune: bool = False):
    """The net fitted, and a twin that takes the views at every step (the old hooks refuse
    deepcopy); ``prune``: Lightning's ``ModelPruning`` prunes the heads at each epoch's end."""
    batch = make_batch(9, seed=5)
    model, views = (HookedHeadsNet(str(tmp_path), [batch], wrap=wrap) for _ in range(2))
    views._predict_with_linear_heads = lambda *args: None
    for net in (model, views):
        callbacks = [NormalisedGradients(rep_grad=True)]
        if prune:
            heads = [(head, "weight") for head in net.heads.values()]
            callbacks.append(
                ModelPruning(
                    "l1_unstructured", heads, amount=0.25, use_lottery_ticket_hypothesis=False
                )
            )
        quiet_trainer(1, steps, "64-true", callbacks).fit(net)
    assert len(model.records) == len(views.records) == steps
    for record, expected in zip(model.records, views.records, strict=True):
        assert_matches(record, expected)
    return model


@pytest.mark.parametrize(
    "wrap", [_l1_pruned, torch.nn.utils.weight_norm, torch.nn.utils.spectral_norm, _max_norm]
)
def test_heads_whose_weight_a_pre_hook_computes_take_their_views(tmp_path, wrap):
    # Each head's pre-hook sets its weight at its own call: one node made at the first head's
    # call would compute the others with their weights of the step before.
    model = _fit_with_views_too(tmp_path, 3, wrap=wrap)
    assert model._linear_heads is False and model.one_node_steps == []


def test_heads_pruned_amid_the_fit_take_their_views_from_then_on(tmp_path):
    model = _fit_with_views_too(tmp_path, 6, prune=True)  # pruned after the third step
    assert model.one_node_steps == [True, True, True, False] and model._linear_heads is False


class SoldReadsPricesHeadFromTheSecondStepNet(LinearFactorsNet):
    """From the second step on, sold's prediction is price's head output: sold's own head is
    not called (its parameters then get a zero gradient)."""

    def forward_heads(self, shared):
        price = self.heads["price"](shared)
        kind = self.heads["kind"](shared)
        sold = price if self.global_step >= 1 else self.heads["sold"](shared)
        return {"price": price.squeeze(-1), "kind": kind, "sold": sold.squeeze(-1)}

    def on_before_optimizer_step(self, optimizer):
        for parameter in self.heads["sold"].parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        super().on_before_optimizer_step(optimizer)


def test_a_head_left_uncalled_after_the_first_step_gives_the_weights_and_update_of_the_views(
    tmp_path,
):
    # The heads in one node would hand sold's task nothing (its head's output is unused) and
    # price's output the gradients of both tasks: the step is refused, and takes the views.
    batch = make_batch(9, seed=5)
    model = SoldReadsPricesHeadFromTheSecondStepNet(str(tmp_path), [batch])
    views = _with_views_throughout(model)
    fit_model(model, 1, NormalisedGradients(rep_grad=True), steps=2)
    fit_model(views, 1, NormalisedGradients(rep_grad=True), steps=2)
    assert model.one_node_steps == [True, False] and model._linear_heads is False
    assert len(model.records) == len(views.records) == 2
    for record, expected in zip(model.records, views.records, strict=True):
        assert_matches(record, expected)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_a_head_with_a_frozen_parameter_in_one_node_trains_the_other(tmp_path, frozen):
    # Each of the one node's parameters takes its gradient as its own requires_grad says.
    batch = make_batch(9, seed=5)
    model = LinearFactorsNet(str(tmp_path), [batch])
    reference = reference_update(model, batch, rep_grad=True)
    getattr(model.heads["price"], frozen).requires_grad_(False)
    fit_model(model, 1, FactoredGradients(rep_grad=True))
    (record,) = model.records
    assert record["one_node"] == [True]
    frozen_name = f"heads.price.{frozen}"
    assert record["grads"].pop(frozen_name) is None
    for name, grad in record["grads"].items():
        torch.testing.assert_close(grad, reference["grads"][name], msg=name)


def test_heads_under_autocast_keep_their_views(tmp_path):
    batch = _cast(make_batch(9, seed=5), torch.float32)
    model = LinearFactorsNet(str(tmp_path), [batch])
    fit_model(model, 1, NormalisedGradients(rep_grad=True), precision="bf16-mixed", steps=2)
    assert model._linear_heads and model.one_node_steps == [False]
    assert all(grad.isfinite().all() for grad in model.records[-1]["grads"].values())


def test_heads_under_autocast_give_their_factors_in_the_gradients_dtype(tmp_path, monkeypatch):
    # Under autocast the heads keep their views; a method that takes the factors there (with
    # linear_factors_from tasks or more) gets bfloat16 output gradients and float32 weights.
    calls = []
    original = gradient_weighting._factored_gramian
    monkeypatch.setattr(
        gradient_weighting, "_factored_gramian", lambda *a: calls.append(1) or original(*a)
    )
    batch = make_batch(9, seed=5)
    model = LinearFactorsNet(str(tmp_path), [_cast(batch, torch.float32)])
    reference = reference_update(model, batch, rep_grad=True)
    fit_model(model, 1, FactoredGradients(rep_grad=True), precision="bf16-mixed")
    assert calls == [1]
    weights = torch.load(tmp_path / "rank0.pt")["weights"]
    torch.testing.assert_close(weights.double(), reference["weights"], rtol=1e-2, atol=0)


@pytest.mark.ddp
@pytest.mark.parametrize("method", [FactoredGradients, NashMTL])
def test_two_ranks_with_heads_in_one_node_equal_one_process_on_the_concatenated_batch(
    tmp_path, method
):
    rank0, rank1 = make_batch(5, seed=1), make_batch(8, seed=2)
    rank1[1]["kind"][:] = -100
    (tmp_path / "ranks").mkdir()
    model = LinearFactorsNet(str(tmp_path / "ranks"), [rank0, rank1])
    one_process = copy.deepcopy(model)
    one_process.out_dir, one_process.rank_batches = str(tmp_path), [concat_batches(rank0, rank1)]
    fit_model(model, 2, method(rep_grad=True), steps=2)
    fit_model(one_process, 1, method(rep_grad=True), steps=2)
    results = [torch.load(tmp_path / "ranks" / f"rank{rank}.pt") for rank in (0, 1)]
    assert [result["one_node"] for result in results] == [[True, True], [True, True]]
    assert one_process.one_node_steps == [True, True]
    torch.testing.assert_close(results[0]["weights"], results[1]["weights"], rtol=0, atol=0)
    for result in results:
        assert_matches(result, one_process.records[-1])


class SeveralBatchesNet(LinearFactorsNet):
    def train_dataloader(self):
        return DataLoader(self.rank_batches, batch_size=None)


@pytest.mark.parametrize("method", [FactoredGradients, NashMTL])
def test_heads_in_one_node_under_gradient_accumulation_give_what_the_views_give(tmp_path, method):
    # Each micro-batch's loss is scaled by 1/2 before backward: the node's gradients carry it.
    model = SeveralBatchesNet(str(tmp_path), [make_batch(7, seed=seed) for seed in range(4)])
    views = _with_views_throughout(model)
    for fitted in (model, views):
        trainer = quiet_trainer(1, 2, callbacks=[method(rep_grad=True)], accumulate_grad_batches=2)
        trainer.fit(fitted)
    assert model.one_node_steps == [True, True, True, True]
    assert len(model.records) == len(views.records) == 2
    for record, expected in zip(model.records, views.records, strict=True):
        assert_matches(record, expected)


class NormalisedRepresentationNet(LinearFactorsNet):
    """forward_heads normalises the representation (batch norm) and drops some of it first:
    state and random numbers that the heads' layout probe must leave as they were."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = torch.nn.BatchNorm1d(8)

    def forward_heads(self, shared):
        return super().forward_heads(torch.nn.functional.dropout(self.norm(shared), 0.5))


def test_the_layout_probe_leaves_the_models_buffers_alone(tmp_path):
    batch = make_batch(9, seed=5)
    model = NormalisedRepresentationNet(str(tmp_path), [batch]).double()
    with torch.no_grad():
        representation = copy.deepcopy(model).forward_shared(batch[0])
    fit_model(model, 1, FactoredGradients(rep_grad=True))
    assert model._linear_heads is False  # the heads read the normalised representation
    # One batch-norm update (momentum 0.1 from zeros): the probe's was undone.
    assert model.norm.num_batches_tracked == 1
    torch.testing.assert_close(model.norm.running_mean, 0.1 * representation.mean(0))


def test_the_layout_probe_draws_none_of_the_fits_random_numbers(tmp_path):
    # forward_heads drops out: had the probe's dropout taken random numbers of the fit, the step
    # would drop other units than a fit without a probe (and a resumed fit, which probes at
    # another step, would not replay the uninterrupted one).
    batch = make_batch(9, seed=5)
    states = []
    for callbacks in ([], [FactoredGradients(rep_grad=True)]):
        model = NormalisedRepresentationNet(str(tmp_path), [batch]).double()
        torch.manual_seed(0)
        quiet_trainer(1, 2, "64-true", callbacks).fit(model)
        states.append(torch.random.get_rng_state())
    assert model._linear_heads is False  # probed
    assert torch.equal(*states)


class NormalisedTrunkNet(LinearFactorsNet):
    """The trunk ends in batch norm, whose buffers (in eval mode, and its saved statistics in
    train mode) the trunk's backward reads: the heads' layout probe must not write to them."""

    def __init__(self, *args, frozen_norm: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trunk.append(torch.nn.BatchNorm1d(8))
        self.frozen_norm = frozen_norm

    def on_train_batch_start(self, batch, batch_idx):
        self.trunk[-1].train(not self.frozen_norm)


@pytest.mark.parametrize("frozen_norm", [False, True])
def test_the_layout_probe_leaves_the_trunks_batch_norm_to_its_backward(tmp_path, frozen_norm):
    batch = make_batch(9, seed=5)
    model = NormalisedTrunkNet(str(tmp_path), [batch], frozen_norm=frozen_norm).double()
    views = _with_views_throughout(model)
    fit_model(model, 1, FactoredGradients(rep_grad=True), steps=2)
    fit_model(views, 1, FactoredGradients(rep_grad=True), steps=2)
    assert model._linear_heads is True
    assert model.trunk[-1].num_batches_tracked == (0 if frozen_norm else 2)
    for record, expected in zip(model.records, views.records, strict=True):
        assert_matches(record, expected)


def test_the_layout_probe_writes_no_buffer_it_left_as_it_was(tmp_path):
    """A buffer holding NaN (a statistic not yet seen) is left alone by the probe: not written
    back, which would bump the version that a backward reading it checks."""
    model = LinearFactorsNet(str(tmp_path), [make_batch(9, seed=5)]).double()
    model.register_buffer("unseen", torch.tensor([torch.nan, 1.0], dtype=torch.float64))
    fit_model(model, 1, FactoredGradients(rep_grad=True))
    assert model._linear_heads is True
    assert model.unseen._version == 0
