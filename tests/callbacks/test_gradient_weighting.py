"""The gradient machinery shared by every gradient-based method, on a real 2-rank DDP group,
against the hand-made references of :mod:`tests.callbacks._recording_nets`."""

import copy

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from lightning_lossagg import MaskedLoss, MultiTaskMixin, Task, callbacks, functional
from lightning_lossagg.callbacks import gradient_weighting
from lightning_lossagg.callbacks.gradient_weighting import (
    GradientWeighting,
    _combination,
    _dot_gramian,
    _on_host,
    _on_host_in_one_transfer,
    _PendingStep,
    _rows_gramian,
    _scaled,
    _scaled_on_device,
)
from tests.callbacks import _recording_nets
from tests.callbacks._fits import (
    ManualOptimization,
    concatenated_ddp_batches,
    ddp_batches,
    trainer,
)
from tests.callbacks._recording_nets import (
    SOLD_WEIGHTED_ZERO,
    STATIC,
    NormalisedGradients,
    RecordingNet,
    WholeForwardNet,
    assert_matches,
    fit_model,
    reference_update,
)
from tests.models import (
    ThreeTaskNet,
    TwoLayerTrunkNet,
    concat_batches,
    make_batch,
    one_batch_loader,
    quiet_trainer,
    reference_task_losses,
)
from tests.process_group import run_on_lightning_ranks


def gramian_sync_reference(model, rank_batches: list) -> dict:
    """``sync="gramian"`` by hand: rank r's Jacobian J_r is W times its share of the global
    gradient (the gradient of its valid per-sample losses summed, over the global count); the
    weights come from the mean of the ranks' Gramians J_r J_r^T (which misses the cross-rank
    terms), and DDP's averaging makes the trunk follow w @ mean_r J_r = w @ J."""
    model = copy.deepcopy(model).double()
    trunk = list(model.trunk.parameters())
    world = len(rank_batches)

    def valid_counts(batch) -> torch.Tensor:
        targets = batch[1]
        masks = (~targets["price"].isnan(), targets["kind"] != -100, ~targets["sold"].isnan())
        return torch.stack([mask.sum() for mask in masks]).double()

    total = sum(valid_counts(batch) for batch in rank_batches)
    jacobians = []
    for batch in rank_batches:
        local = valid_counts(batch)
        means = list(reference_task_losses(model, batch).values())
        rows = []
        for k, mean in enumerate(means):
            if local[k] == 0:
                rows.append(torch.zeros(sum(p.numel() for p in trunk), dtype=torch.float64))
                continue
            share = world * mean * local[k] / total[k]
            grads = torch.autograd.grad(share, trunk, retain_graph=True)
            rows.append(torch.cat([g.flatten() for g in grads]))
        jacobians.append(torch.stack(rows))
    gramian = sum(j @ j.T for j in jacobians) / world
    weights = gramian.diagonal().rsqrt() * STATIC
    combined = weights @ (sum(jacobians) / world)
    losses = list(reference_task_losses(model, concat_batches(*rank_batches)).values())
    head_objective = sum(s * loss for s, loss in zip(STATIC, losses, strict=True))
    head_grads = torch.autograd.grad(head_objective, list(model.heads.parameters()))
    grads = {}
    trunk_grads = torch.split(combined, [p.numel() for p in trunk])
    for (name, parameter), grad in zip(model.trunk.named_parameters(), trunk_grads, strict=True):
        grads[f"trunk.{name}"] = grad.reshape(parameter.shape)
    for (name, _), grad in zip(model.heads.named_parameters(), head_grads, strict=True):
        grads[f"heads.{name}"] = grad
    return {"weights": weights, "grads": grads}


@pytest.mark.parametrize(
    ("net", "rep_grad"), [(RecordingNet, False), (WholeForwardNet, False), (RecordingNet, True)]
)
def test_one_process_weights_and_update_follow_the_gradients(tmp_path, net, rep_grad):
    batch = make_batch(9, seed=5)
    model = net(str(tmp_path), [batch])
    reference = reference_update(model, batch, rep_grad)
    fit_model(model, 1, NormalisedGradients(rep_grad=rep_grad))
    assert_matches(torch.load(tmp_path / "rank0.pt"), reference)


@pytest.mark.ddp
@pytest.mark.parametrize(
    ("net", "rep_grad"), [(RecordingNet, False), (WholeForwardNet, False), (RecordingNet, True)]
)
def test_two_rank_weights_and_update_equal_one_process_on_the_concatenated_batch(
    tmp_path, net, rep_grad
):
    rank0, rank1 = make_batch(5, seed=1), make_batch(8, seed=2)
    rank1[1]["kind"][:] = -100
    model = net(str(tmp_path), [rank0, rank1])
    reference = reference_update(model, concat_batches(rank0, rank1), rep_grad)
    fit_model(model, 2, NormalisedGradients(rep_grad=rep_grad, sync="gradients"))
    for rank in (0, 1):
        assert_matches(torch.load(tmp_path / f"rank{rank}.pt"), reference)


def _uniform_task_losses(rows: int):
    """reference_task_losses for rank_weighting="uniform": each task's loss is the mean of the
    ranks' own means (over the ranks with a valid sample), the first ``rows`` rows rank 0's."""

    def losses(model, batch):
        inputs, targets = batch
        predictions = model(inputs)
        per_rank = []
        for part in (slice(0, rows), slice(rows, None)):
            sliced = {task: prediction[part] for task, prediction in predictions.items()}
            batch_part = (inputs[part], {task: target[part] for task, target in targets.items()})
            per_rank.append(reference_task_losses(_Fixed(sliced), batch_part))
        return {
            task: torch.stack([r[task] for r in per_rank if not r[task].isnan()]).mean()
            for task in per_rank[0]
        }

    return losses


class _Fixed:
    """A stand-in model whose call returns fixed predictions."""

    def __init__(self, predictions) -> None:
        self.predictions = predictions

    def __call__(self, inputs):
        return self.predictions


@pytest.mark.ddp
@pytest.mark.parametrize("rep_grad", [False, True], ids=["parameters", "representation"])
def test_two_ranks_with_uniform_rank_weighting_equal_the_mean_of_the_ranks_means(
    tmp_path, monkeypatch, rep_grad
):
    rank0, rank1 = make_batch(5, seed=1), make_batch(8, seed=2)
    rank1[1]["kind"][:] = -100  # kind: rank 0's mean alone
    model = RecordingNet(str(tmp_path), [rank0, rank1], rank_weighting="uniform")
    monkeypatch.setattr(_recording_nets, "reference_task_losses", _uniform_task_losses(5))
    reference = reference_update(model, concat_batches(rank0, rank1), rep_grad)
    monkeypatch.undo()
    fit_model(model, 2, NormalisedGradients(rep_grad=rep_grad, sync="gradients"))
    for rank in (0, 1):
        assert_matches(torch.load(tmp_path / f"rank{rank}.pt"), reference)


@pytest.mark.ddp
@pytest.mark.parametrize("net", [RecordingNet, WholeForwardNet])
def test_two_ranks_with_gramian_sync_weigh_the_mean_of_the_ranks_gramians(tmp_path, net):
    rank0, rank1 = make_batch(5, seed=1), make_batch(8, seed=2)
    rank1[1]["kind"][:] = -100
    model = net(str(tmp_path), [rank0, rank1])
    reference = gramian_sync_reference(model, [rank0, rank1])
    fit_model(model, 2, NormalisedGradients(sync="gramian"))
    for rank in (0, 1):
        assert_matches(torch.load(tmp_path / f"rank{rank}.pt"), reference)


class CoupledHeadsNet(RecordingNet):
    """sold's prediction reads price's head too: one backward pass cannot tell them apart."""

    def forward_heads(self, shared):
        price = self.heads["price"](shared).squeeze(-1)
        sold = self.heads["sold"](shared).squeeze(-1) + 0.5 * price
        return {"price": price, "kind": self.heads["kind"](shared), "sold": sold}


class HeadCalledTwiceNet(RecordingNet):
    """kind's head reads the representation twice."""

    def forward_heads(self, shared):
        kind = self.heads["kind"](shared) - 0.25 * self.heads["kind"](torch.tanh(shared))
        price, sold = self.heads["price"](shared), self.heads["sold"](shared)
        return {"price": price.squeeze(-1), "kind": kind, "sold": sold.squeeze(-1)}


class RepresentationOutsideHeadsNet(RecordingNet):
    """price's prediction also reads the representation outside its head."""

    def forward_heads(self, shared):
        predictions = ThreeTaskNet.forward_heads(self, shared)
        return {**predictions, "price": predictions["price"] + shared.sum(-1)}


@pytest.mark.parametrize("rep_grad", [False, True])
def test_a_head_per_task_gives_every_task_gradient_from_one_backward_pass(
    tmp_path, monkeypatch, rep_grad
):
    # No autograd pass before backward: the weights come from the gradients reaching the heads'
    # views in Lightning's backward (and, for parameter gradients, one pass through the trunk per
    # task from there).
    passes = {"one pass": 0, "per task": 0, "at heads": 0, "at parameters": 0}

    def counting(name, original):
        def counted(*args, **kwargs):
            passes[name] += 1
            return original(*args, **kwargs)

        return counted

    monkeypatch.setattr(
        gradient_weighting,
        "task_gradients",
        counting("per task", gradient_weighting.task_gradients),
    )
    for name, method in (
        ("one pass", "_gradients_in_one_pass"),
        ("at heads", "_weigh_at_heads"),
        ("at parameters", "_weigh_at_parameters"),
    ):
        original = getattr(GradientWeighting, method)
        monkeypatch.setattr(GradientWeighting, method, counting(name, original))
    batch = make_batch(9, seed=5)
    model = RecordingNet(str(tmp_path), [batch])
    reference = reference_update(model, batch, rep_grad)
    fit_model(model, 1, NormalisedGradients(rep_grad=rep_grad))
    assert_matches(torch.load(tmp_path / "rank0.pt"), reference)
    where = "at heads" if rep_grad else "at parameters"
    assert passes == {"one pass": 0, "per task": 0, "at heads": 0, "at parameters": 0, where: 1}


@pytest.mark.parametrize("rep_grad", [False, True])
def test_a_task_weighted_zero_takes_the_pass_before_backward(tmp_path, monkeypatch, rep_grad):
    # The gradients reaching the views are Task.weight times the tasks': with a weight of 0 the
    # task's own gradient is lost there, so its Gramian row comes from a pass before backward.
    in_backward = []
    for method in ("_weigh_at_heads", "_weigh_at_parameters"):
        original = getattr(GradientWeighting, method)

        def counted(*args, original=original, **kwargs):
            in_backward.append(True)
            return original(*args, **kwargs)

        monkeypatch.setattr(GradientWeighting, method, counted)
    batch = make_batch(9, seed=5)
    model = RecordingNet(str(tmp_path), [batch], sold_weight=0.0)
    reference = reference_update(model, batch, rep_grad, static=SOLD_WEIGHTED_ZERO)
    fit_model(model, 1, NormalisedGradients(rep_grad=rep_grad))
    assert_matches(torch.load(tmp_path / "rank0.pt"), reference)
    assert not in_backward


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5])
def test_dot_product_gramian_and_combination_equal_the_matrix_products(num_tasks):
    generator = torch.Generator().manual_seed(num_tasks)
    grads = tuple(torch.randn(6, 4, generator=generator) for _ in range(num_tasks))
    jacobian = torch.stack(grads).reshape(num_tasks, -1)
    torch.testing.assert_close(  # float32 products, summed in different orders
        _dot_gramian([g.reshape(-1) for g in grads]).float(),
        jacobian @ jacobian.T,
        rtol=1e-5,
        atol=1e-5,
    )
    weights = torch.randn(num_tasks, generator=generator)
    weights[0] = 0.0  # skipped, not added
    expected = (weights @ jacobian).view(6, 4)
    torch.testing.assert_close(_combination(grads, weights.tolist()), expected)
    torch.testing.assert_close(_combination(grads, [0.0] * num_tasks), torch.zeros(6, 4))


@pytest.mark.parametrize("num_tasks", [2, 5])
def test_half_precision_rows_give_the_float32_gramian_of_their_values(num_tasks):
    # bf16 views' gradients (bf16-mixed): their Gramian in float32 products, not bf16 dot
    # products (about 4e-3 off).
    generator = torch.Generator().manual_seed(num_tasks)
    rows = [torch.randn(512, generator=generator).bfloat16() for _ in range(num_tasks)]
    gramian, jacobian = _rows_gramian(rows)
    widened = torch.stack(rows).float()
    assert gramian.dtype == torch.float32 and torch.equal(jacobian, torch.stack(rows))
    torch.testing.assert_close(gramian, widened @ widened.T, rtol=1e-5, atol=1e-5)


def test_dot_product_gramian_of_float64_gradients_is_float64():
    # Heads that are not one nn.Linear give the views' gradients, whose Gramian comes from
    # K(K+1)/2 dot products: in float64 for float64 gradients, as the matrix product's.
    generator = torch.Generator().manual_seed(0)
    jacobian = torch.randn(3, 24, generator=generator, dtype=torch.float64)
    gramian = _dot_gramian(list(jacobian))
    assert gramian.dtype == torch.float64
    torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-14, atol=0)


def test_host_figures_are_the_same_in_one_transfer():
    # The branch an accelerator takes (one copy to the host) run on CPU tensors.
    gramian = torch.tensor([[4.0, -1.0, 0.0], [-1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    static, factor = torch.tensor([2.0, 0.5, 3.0]), torch.tensor(0.25)
    pending = _PendingStep(torch.tensor([True, True, False]), static, torch.zeros(3))
    for figures in (_on_host, _on_host_in_one_transfer):
        host = figures(gramian, factor, pending)
        np.testing.assert_array_equal(host.gramian, gramian.double().numpy())
        np.testing.assert_array_equal(host.static, [2.0, 0.5, 3.0])
        assert host.factor == 0.25
        assert host.valid.dtype == torch.bool and host.valid.tolist() == [True, True, False]
        assert host.reached is None
        # Under DDP: on how many ranks a task reached each shared parameter, in the same copy.
        reached = figures(gramian, factor, pending, torch.tensor([2.0, 0.0, 1.0, 0.0]))
        assert reached.reached == [True, False, True, False]
        np.testing.assert_array_equal(reached.gramian, host.gramian)


@pytest.mark.parametrize("rep_grad", [False, True])
@pytest.mark.parametrize(
    ("net", "warning"),
    [
        (CoupledHeadsNet, "task 'sold' depends on the head of task 'price'"),
        (RepresentationOutsideHeadsNet, "task 'price' depends on the representation"),
        (HeadCalledTwiceNet, None),
    ],
)
def test_heads_that_share_a_task_take_a_backward_pass_per_task(tmp_path, net, warning, rep_grad):
    batch = make_batch(9, seed=5)
    model = net(str(tmp_path), [batch])
    reference = reference_update(model, batch, rep_grad)
    if warning is None:
        fit_model(model, 1, NormalisedGradients(rep_grad=rep_grad))
    else:
        with pytest.warns(UserWarning, match=warning):
            fit_model(model, 1, NormalisedGradients(rep_grad=rep_grad))
    assert_matches(torch.load(tmp_path / "rank0.pt"), reference)


def test_a_head_reached_by_several_tasks_gets_each_ones_gradient_times_its_static_weight(
    tmp_path,
):
    # price's head serves sold too: its gradient is 2 * grad(price) + 3 * grad(sold).
    batch = make_batch(9, seed=5)
    model = CoupledHeadsNet(str(tmp_path), [batch], sold_weight=3.0)
    static = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)
    reference = reference_update(model, batch, False, static=static)
    with pytest.warns(UserWarning, match="task 'sold' depends on the head of task 'price'"):
        fit_model(model, 1, NormalisedGradients())
    assert_matches(torch.load(tmp_path / "rank0.pt"), reference)


class NormalisedNonZeroGradients(GradientWeighting):
    """w_k = 1/||g_k||, and 0 for a task whose gradient is zero."""

    def weights_from_gramian(self, gramian):
        norms = gramian.diagonal().sqrt()
        return torch.where(norms > 0, 1 / norms, 0.0)


class DetachedKindCoupledHeadsNet(RecordingNet):
    """kind's prediction is detached (a task only watched); sold's reads price's head too."""

    def forward_heads(self, shared):
        predictions = CoupledHeadsNet.forward_heads(self, shared)
        return {**predictions, "kind": predictions["kind"].detach()}

    def on_before_optimizer_step(self, optimizer):
        for parameter in self.heads["kind"].parameters():  # no gradient reaches them: zeros
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        super().on_before_optimizer_step(optimizer)


def test_a_detached_prediction_does_not_end_the_check_of_the_tasks_after_it(tmp_path):
    # kind (task 1) reaches no head; sold (task 2) still depends on price's head: one backward
    # pass per task, each task's gradient its own.
    batch = make_batch(9, seed=5)
    model = DetachedKindCoupledHeadsNet(str(tmp_path), [batch])
    reference = reference_update(model, batch, False, valid=(0, 2))
    with pytest.warns(UserWarning, match="task 'sold' depends on the head of task 'price'"):
        fit_model(model, 1, NormalisedNonZeroGradients())
    assert_matches(torch.load(tmp_path / "rank0.pt"), reference)


class HeadCalledTwiceOnTheRepresentationNet(RecordingNet):
    """kind's head reads the representation itself twice."""

    def forward_heads(self, shared):
        predictions = ThreeTaskNet.forward_heads(self, shared)
        return {**predictions, "kind": predictions["kind"] + 0.5 * self.heads["kind"](shared)}


def test_a_head_called_twice_on_the_representation_gives_its_task_both_calls_gradient(
    tmp_path,
):
    # sold weighted 0: the weights are taken before backward (as for a weight of 0 above), where
    # one pass serves every task only if each head read the representation once.
    batch = make_batch(9, seed=5)
    model = HeadCalledTwiceOnTheRepresentationNet(str(tmp_path), [batch], sold_weight=0.0)
    reference = reference_update(model, batch, False, static=SOLD_WEIGHTED_ZERO)
    fit_model(model, 1, NormalisedGradients())
    assert_matches(torch.load(tmp_path / "rank0.pt"), reference)


class TiedPriceAndSoldWeightsNet(RecordingNet):
    """price's and sold's heads share their weight (tied layers): a parameter in two heads."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.heads["sold"].weight = self.heads["price"].weight


def test_a_weight_shared_by_two_heads_gets_each_tasks_gradient_times_its_static_weight(tmp_path):
    # sold weighted 0: the weights are taken before backward, where one pass would give the tied
    # weight both tasks' gradient together; it takes a pass per task instead: 2 * grad(price).
    batch = make_batch(9, seed=5)
    model = TiedPriceAndSoldWeightsNet(str(tmp_path), [batch], sold_weight=0.0)
    reference = reference_update(model, batch, False, static=SOLD_WEIGHTED_ZERO)
    fit_model(model, 1, NormalisedGradients())
    assert_matches(torch.load(tmp_path / "rank0.pt"), reference)


class OffsetOutsideTheHeadsNet(RecordingNet):
    """price's prediction adds a learned offset kept outside ``self.heads``, and
    shared_parameters() is the trunk's: a task-specific parameter that no head holds."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.offset = torch.nn.Parameter(torch.tensor(0.5))

    def shared_parameters(self):
        return list(self.trunk.parameters())

    def forward_heads(self, shared):
        predictions = ThreeTaskNet.forward_heads(self, shared)
        return {**predictions, "price": predictions["price"] + self.offset}


def test_a_task_specific_parameter_outside_the_heads_gets_its_tasks_gradient(tmp_path):
    # sold weighted 0: the weights are taken before backward, where one pass serves the tasks
    # only if the heads hold every task-specific parameter; the offset gets 2 * grad(price).
    batch = make_batch(9, seed=5)
    model = OffsetOutsideTheHeadsNet(str(tmp_path), [batch], sold_weight=0.0)
    reference = reference_update(model, batch, True, static=SOLD_WEIGHTED_ZERO)
    before = copy.deepcopy(model).double()
    losses = reference_task_losses(before, batch)
    (offset_grad,) = torch.autograd.grad(2 * losses["price"] + losses["kind"], before.offset)
    fit_model(model, 1, NormalisedGradients(rep_grad=True))
    result = torch.load(tmp_path / "rank0.pt")
    assert_matches(result, reference)
    torch.testing.assert_close(result["grads"]["offset"], offset_grad, atol=1e-8, rtol=1e-6)


class SoldWithoutItsHeadNet(RecordingNet):
    """sold's head is not called: its prediction is a constant."""

    def forward_heads(self, shared):
        price, kind = self.heads["price"](shared), self.heads["kind"](shared)
        return {"price": price.squeeze(-1), "kind": kind, "sold": shared.new_zeros(len(shared))}


def test_a_head_that_is_not_called_leaves_every_task_its_own_gradient(tmp_path):
    # sold weighted 0: the weights are taken before backward; with a head not called the heads'
    # copies are not one per task, and the tasks take a pass each.
    batch = make_batch(9, seed=5)
    model = SoldWithoutItsHeadNet(str(tmp_path), [batch], sold_weight=0.0)
    reference = reference_update(model, batch, False, valid=(0, 1), static=SOLD_WEIGHTED_ZERO)
    fit_model(model, 1, NormalisedNonZeroGradients())
    assert_matches(torch.load(tmp_path / "rank0.pt"), reference)


def _sold_loss_reads_price(per_sample_losses):
    def coupled(predictions, targets):
        losses = per_sample_losses(predictions, targets)
        sold = losses["sold"]
        return {**losses, "sold": MaskedLoss(sold.values + 0.5 * predictions["price"], sold.mask)}

    return coupled


class SoldLossReadsPriceNet(RecordingNet):
    def per_sample_losses(self, predictions, targets):
        return _sold_loss_reads_price(super().per_sample_losses)(predictions, targets)


@pytest.mark.parametrize("rep_grad", [False, True])
def test_a_loss_override_on_the_instance_weighs_as_the_same_override_in_a_subclass(
    tmp_path, rep_grad
):
    # sold's loss reads price's prediction: one backward pass cannot tell their gradients apart.
    batch = make_batch(9, seed=5)
    torch.manual_seed(0)
    subclass = SoldLossReadsPriceNet(str(tmp_path), [batch])
    torch.manual_seed(0)
    instance = RecordingNet(str(tmp_path), [batch])
    instance.per_sample_losses = _sold_loss_reads_price(instance.per_sample_losses)
    for model in (subclass, instance):
        fit_model(model, 1, NormalisedGradients(rep_grad=rep_grad))
    assert_matches(instance.records[0], subclass.records[0])


class TrunkBiasAfterTheRepresentationNet(RecordingNet):
    """price's prediction adds the trunk's first bias: a shared parameter read again after the
    representation (a tied weight, say)."""

    def forward_heads(self, shared):
        predictions = ThreeTaskNet.forward_heads(self, shared)
        return {**predictions, "price": predictions["price"] + self.trunk[0].bias.sum()}


def test_a_shared_parameter_read_after_the_representation_gets_its_gradient_from_both_uses(
    tmp_path,
):
    batch = make_batch(9, seed=5)
    model = TrunkBiasAfterTheRepresentationNet(str(tmp_path), [batch])
    reference = reference_update(model, batch, rep_grad=False)
    with pytest.warns(UserWarning, match="task 'price' depends on the representation or a shared"):
        fit_model(model, 1, NormalisedGradients())
    assert_matches(torch.load(tmp_path / "rank0.pt"), reference)


@pytest.mark.parametrize(
    "method",
    [
        callbacks.AlignedMTL,
        callbacks.CAGrad,
        callbacks.DBMTL,
        callbacks.GradNorm,
        callbacks.GradVac,
        callbacks.IMTLG,
        callbacks.MGDA,
        callbacks.NashMTL,
        callbacks.PCGrad,
        callbacks.UPGrad,
    ],
)
@pytest.mark.parametrize("rep_grad", ["yes", 1, None])
def test_every_gradient_method_takes_rep_grad_as_a_bool_only(method, rep_grad):
    assert issubclass(method, GradientWeighting)
    with pytest.raises(
        ValueError, match=rf"{method.__name__}: `rep_grad` must be True .* or False"
    ):
        method(rep_grad=rep_grad)


def test_bad_arguments_and_a_model_without_a_split_forward_are_refused():
    with pytest.raises(ValueError, match="'gradients' or 'gramian'"):
        NormalisedGradients(sync="params")

    class NoHeads(ThreeTaskNet):
        def shared_parameters(self):
            return []

    batch = make_batch(4, seed=0)
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_progress_bar=False, callbacks=[NormalisedGradients()]
    )
    with pytest.raises(ValueError, match="no shared parameters"):
        trainer.fit(NoHeads(), train_dataloaders=one_batch_loader(batch))


class NoSplitNet(ThreeTaskNet):
    forward_shared = forward_heads = None

    def forward(self, inputs):
        return ThreeTaskNet.forward_heads(self, ThreeTaskNet.forward_shared(self, inputs))


class SharedOnlyNet(NoSplitNet):
    forward_shared = ThreeTaskNet.forward_shared


@pytest.mark.parametrize(
    ("net", "missing"),
    [(NoSplitNet, "forward_shared and forward_heads"), (SharedOnlyNet, "forward_heads")],
)
def test_rep_grad_without_a_split_forward_is_refused_naming_what_is_missing(net, missing):
    trainer = quiet_trainer(1, callbacks=[NormalisedGradients(rep_grad=True)])
    with pytest.raises(TypeError, match=rf"\(rep_grad=True\) needs .* define {missing} \("):
        trainer.fit(net(), one_batch_loader(make_batch(4, seed=0)))


def test_the_logged_gradient_norms_are_the_tasks_and_nan_for_a_task_without_a_label():
    batch = make_batch(9, seed=5)
    batch[1]["kind"][:] = -100
    model = ThreeTaskNet().double()
    before = copy.deepcopy(model)
    callback = NormalisedGradients()
    quiet_trainer(1, callbacks=[callback]).fit(model, one_batch_loader(batch))
    losses = reference_task_losses(before, batch)
    trunk = list(before.trunk.parameters())
    grads = {}
    for task in ("price", "sold"):
        task_grads = torch.autograd.grad(losses[task], trunk, retain_graph=True)
        grads[task] = torch.cat([g.flatten() for g in task_grads])
    norms = callback.state_to_log()["grad_norm"]
    assert norms.isnan().tolist() == [False, True, False]
    torch.testing.assert_close(norms[[0, 2]], torch.stack([g.norm() for g in grads.values()]))
    cosine = callback.pairwise_state_to_log()["grad_cos"]
    expected = grads["price"] @ grads["sold"] / (grads["price"].norm() * grads["sold"].norm())
    torch.testing.assert_close(cosine[0, 2], expected)
    assert cosine[1].isnan().all() and cosine[:, 1].isnan().all()


def test_parallel_gradients_log_a_cosine_of_one_not_above():
    # Two tasks with the gradient (1, 1, 1): 3 / (sqrt(3) * sqrt(3)) rounds to 1 + 2**-52.
    jacobian = torch.ones(2, 3, dtype=torch.float64)
    static = torch.ones(2, dtype=torch.float64)
    pending = _PendingStep(torch.tensor([True, True]), static, torch.zeros(2, dtype=torch.float64))
    callback = NormalisedGradients()
    host = _on_host(jacobian @ jacobian.T, torch.tensor(1.0), pending)
    callback._weights_of_scaled_gramian(host, 1.0, pending)
    assert callback.pairwise_state_to_log()["grad_cos"].tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("rep_grad", [False, True])
def test_drop_task_leaves_a_non_finite_task_out_of_the_gradients(tmp_path, rep_grad):
    batch = make_batch(9, seed=5)
    batch[1]["price"][1] = torch.inf  # a labelled sample: price's loss is infinite
    model = RecordingNet(str(tmp_path), [batch])
    model.nonfinite = "drop_task"
    clean = copy.deepcopy(batch)
    clean[1]["price"][:] = torch.nan  # what dropping price must equal: no price label at all
    reference = reference_update(model, clean, rep_grad, valid=(1, 2))
    with pytest.warns(UserWarning, match="taken without the task"):
        fit_model(model, 1, NormalisedGradients(rep_grad=rep_grad))
    assert_matches(torch.load(tmp_path / "rank0.pt"), reference)


@pytest.mark.parametrize("incoming", [1.0, 0.25])
@pytest.mark.parametrize("static", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_injected_gradients_are_scaled_alike_on_the_host_and_on_a_device(incoming, static):
    # The surrogate's backward reads the factors on the host on the CPU and skips factors of 1;
    # the branch an accelerator takes (no host read) is run here on CPU tensors: both must give
    # grads[i] * incoming * static[tasks[i]].
    generator = torch.Generator().manual_seed(0)
    grads = tuple(torch.randn(3, 2, generator=generator) for _ in range(4))
    tasks = (None, 0, 2, 1)
    scales = torch.tensor(static)
    grad_output = torch.tensor(incoming)
    expected = [
        grad * incoming * (1.0 if task is None else static[task])
        for grad, task in zip(grads, tasks, strict=True)
    ]
    for scaled in (
        _scaled(grads, tasks, scales, grad_output),
        _scaled_on_device(grads, tasks, scales, grad_output),
    ):
        for result, reference in zip(scaled, expected, strict=True):
            torch.testing.assert_close(result, reference)
    host = _scaled(grads, tasks, scales, grad_output)
    unit = [incoming == 1.0 and (task is None or static[task] == 1.0) for task in tasks]
    assert [result is grad for result, grad in zip(host, grads, strict=True)] == unit


class LastLayerSharedNet(TwoLayerTrunkNet):
    """A two-layer trunk whose first layer is left out of shared_parameters(): the methods weigh
    the last layer's task gradients; the first gets the static-weight objective's gradient, as a
    head's parameters would."""

    def shared_parameters(self):
        return list(self.trunk[2].parameters())


class FirstLayerGradient(L.Callback):
    def on_after_backward(self, trainer, pl_module) -> None:
        self.grad = pl_module.trunk[0].weight.grad.clone()


@pytest.mark.parametrize("override", ["in a subclass", "on the instance"])
@pytest.mark.parametrize("method", [callbacks.MGDA, callbacks.UPGrad])
def test_a_trunk_parameter_left_out_of_the_shared_ones_still_gets_its_gradient(method, override):
    torch.manual_seed(0)
    if override == "in a subclass":
        model = LastLayerSharedNet().double()
    else:
        model = TwoLayerTrunkNet().double()
        model.shared_parameters = lambda: list(model.trunk[2].parameters())
    before = copy.deepcopy(model)
    batch = make_batch(7, seed=0)
    recorder = FirstLayerGradient()
    quiet_trainer(1, callbacks=[method(), recorder]).fit(model, one_batch_loader(batch))
    losses = reference_task_losses(before, batch)
    objective = 2 * losses["price"] + losses["kind"] + losses["sold"]  # Task.weight: 2, 1, 1
    (expected,) = torch.autograd.grad(objective, before.trunk[0].weight)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(recorder.grad, expected)


class PairRepresentationNet(ThreeTaskNet):
    """forward_shared returns two tensors; the heads read the first."""

    def forward_shared(self, inputs):
        representation = self.trunk(inputs)
        return representation, representation.sum(-1)

    def forward_heads(self, shared):
        return super().forward_heads(shared[0])


def test_a_representation_of_several_tensors_takes_parameter_gradients_from_the_whole_graph():
    batch = make_batch(7, seed=0)
    weights = []
    for net in (ThreeTaskNet, PairRepresentationNet):
        torch.manual_seed(0)
        model = net().double()
        quiet_trainer(1, callbacks=[callbacks.MGDA()]).fit(model, one_batch_loader(batch))
        weights.append(model.loss_record.weights)
    torch.testing.assert_close(weights[1], weights[0])
    with pytest.raises(TypeError, match=r"MGDA\(rep_grad=True\) .* returned a tuple"):
        model = PairRepresentationNet().double()
        trainer = quiet_trainer(1, callbacks=[callbacks.MGDA(rep_grad=True)])
        trainer.fit(model, one_batch_loader(batch))


class BypassesPredictTasksNet(ThreeTaskNet):
    """Predicts with its own forward: no representation is kept for the heads."""

    def task_losses(self, batch):
        inputs, targets = batch
        return self.per_sample_losses(self(inputs), targets)


def test_rep_grad_without_a_representation_kept_is_refused_not_weighed_statically():
    trainer = quiet_trainer(1, callbacks=[callbacks.MGDA(rep_grad=True)])
    with pytest.raises(RuntimeError, match=r"MGDA\(rep_grad=True\) found no shared representation"):
        trainer.fit(BypassesPredictTasksNet().double(), one_batch_loader(make_batch(7, seed=0)))


class FreezeTrunk(L.Callback):
    """Freezes the trunk at setup, before the method's (as BackboneFinetuning does)."""

    def setup(self, trainer, pl_module, stage) -> None:
        pl_module.trunk.requires_grad_(False)


@pytest.mark.parametrize(
    "method",
    [
        lambda: callbacks.MGDA(),
        lambda: callbacks.MGDA(rep_grad=True),
        lambda: callbacks.UPGrad(rep_grad=True),
        lambda: callbacks.NashMTL(update_weights_every=2),
    ],
    ids=["MGDA", "MGDA rep", "UPGrad rep", "NashMTL"],
)
def test_a_frozen_trunk_leaves_nothing_to_weigh_and_the_heads_train_with_task_weights(method):
    batches = [make_batch(7, seed=seed) for seed in range(2)]
    model = ThreeTaskNet().double()
    trunk_before = copy.deepcopy(model.trunk.state_dict())
    heads_before = copy.deepcopy(model.heads.state_dict())
    callback = method()
    trainer = quiet_trainer(1, steps=2, callbacks=[FreezeTrunk(), callback])
    trainer.fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    assert model.loss_record.weights.tolist() == [2.0, 1.0, 1.0]  # Task.weight alone
    assert callback.state_to_log() == {}  # no Gramian to log
    for name, value in model.trunk.state_dict().items():
        assert torch.equal(value, trunk_before[name]), name
    assert any(not torch.equal(v, heads_before[n]) for n, v in model.heads.state_dict().items())


class FreezeTrunkAfterTheFirstStep(L.Callback):
    """Freezes the trunk after step 0, keeping what the method logged there."""

    def __init__(self, method: GradientWeighting) -> None:
        self.method, self.logged_at_first_step = method, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.logged_at_first_step = self.method.state_to_log()
            pl_module.trunk.requires_grad_(False)


@pytest.mark.parametrize("rep_grad", [False, True])
def test_a_trunk_frozen_amid_the_fit_logs_no_gramian_of_the_step_before(rep_grad):
    batches = [make_batch(7, seed=seed) for seed in range(2)]
    method = callbacks.MGDA(rep_grad=rep_grad)
    freeze = FreezeTrunkAfterTheFirstStep(method)
    trainer = quiet_trainer(1, steps=2, callbacks=[method, freeze])
    trainer.fit(ThreeTaskNet().double(), torch.utils.data.DataLoader(batches, batch_size=None))
    assert set(freeze.logged_at_first_step) == {"grad_norm"}
    assert method.state_to_log() == {}
    assert method.pairwise_state_to_log() == {}


def test_nash_mtl_logs_no_gramian_on_a_step_that_does_not_solve():
    # update_weights_every=2: step 1 reuses step 0's weights; its Gramian was never taken.
    batches = [make_batch(7, seed=seed) for seed in range(2)]
    callback = callbacks.NashMTL(update_weights_every=2)
    trainer = quiet_trainer(1, steps=1, callbacks=[callback])
    trainer.fit(ThreeTaskNet().double(), torch.utils.data.DataLoader(batches, batch_size=None))
    assert set(callback.state_to_log()) == {"grad_norm"}
    trainer = quiet_trainer(1, steps=2, callbacks=[callback])
    trainer.fit(ThreeTaskNet().double(), torch.utils.data.DataLoader(batches, batch_size=None))
    assert callback.state_to_log() == {}


def test_gradnorm_still_learns_its_weights_at_the_representation_of_a_frozen_trunk():
    # GradNorm's weights scale the task losses for the heads too: the representation's task
    # gradients (the heads' side) still exist when the trunk is frozen.
    batches = [make_batch(7, seed=seed) for seed in range(3)]
    callback = callbacks.GradNorm(rep_grad=True, lr=0.1)
    trainer = quiet_trainer(1, steps=3, callbacks=[FreezeTrunk(), callback])
    trainer.fit(ThreeTaskNet().double(), torch.utils.data.DataLoader(batches, batch_size=None))
    assert not torch.equal(callback.state_to_log()["learned_weight"], torch.ones(3))


class WeightsAtEachStep(L.Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append(pl_module.loss_record.weights.clone())


def _bf16_weights(method: L.Callback, model_class: type) -> torch.Tensor:
    recorder = WeightsAtEachStep()
    torch.manual_seed(0)
    batches = [make_batch(6, seed=seed, dtype=torch.float32) for seed in range(4)]
    quiet_trainer(1, steps=4, precision="bf16-mixed", callbacks=[method, recorder]).fit(
        model_class(), DataLoader(batches, batch_size=None)
    )
    return torch.stack(recorder.weights)


@pytest.mark.parametrize(
    "make_method",
    [lambda: callbacks.MGDA(rep_grad=True), callbacks.MGDA, callbacks.UPGrad],
    ids=["MGDA rep_grad", "MGDA", "UPGrad"],
)
def test_manual_optimization_under_autocast_weighs_as_automatic_optimization(make_method):
    # Its backward runs inside the training step's autocast: the weights computed there (the
    # Gramian's products) must not take its bfloat16 (or overflow in float16).
    automatic = _bf16_weights(make_method(), ThreeTaskNet)
    torch.testing.assert_close(
        _bf16_weights(make_method(), ManualOptimization), automatic, rtol=0, atol=0
    )


class UnusedSharedLayerNet(ThreeTaskNet):
    """A shared layer no task reaches (a backbone's classifier left in place), under AdamW with
    weight decay: a plain backward leaves it without a gradient, and AdamW leaves it alone."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Linear(8, 8)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, weight_decay=0.1)


class UnusedSharedLayerNoSplitNet(UnusedSharedLayerNet):
    forward_shared = forward_heads = None  # the per-task passes before backward

    def forward(self, inputs):
        return ThreeTaskNet.forward_heads(self, ThreeTaskNet.forward_shared(self, inputs))


@pytest.mark.parametrize("method", [callbacks.MGDA, callbacks.UPGrad])
@pytest.mark.parametrize("net", [UnusedSharedLayerNet, UnusedSharedLayerNoSplitNet])
def test_a_shared_parameter_no_task_reaches_gets_no_gradient_and_stays(method, net):
    torch.manual_seed(0)
    model = net()
    before, trunk = model.unused.weight.detach().clone(), model.trunk[0].weight.detach().clone()
    batches = [make_batch(6, seed=seed) for seed in range(2)]
    quiet_trainer(1, steps=2, callbacks=[method()]).fit(
        model.double(), DataLoader(batches, batch_size=None)
    )
    assert model.unused.weight.grad is None
    torch.testing.assert_close(model.unused.weight.detach(), before.double(), rtol=0, atol=0)
    assert not torch.equal(model.trunk[0].weight.detach(), trunk.double())  # the rest trains


def _fit_with_an_unused_layer(rank: int | None, net: type) -> dict:
    """Two MGDA steps of ``net``: without DDP (``rank`` None) or as the rank of a DDP job."""
    torch.manual_seed(0)
    model = net().double()
    batches = [make_batch(6, seed=seed) for seed in range(2)]
    ddp = {} if rank is None else {"strategy": "ddp"}
    trainer([callbacks.MGDA()], 1, use_distributed_sampler=False, **ddp).fit(
        model, DataLoader(batches, batch_size=None)
    )
    return {"grad": model.unused.weight.grad, "state": model.state_dict()}


@pytest.mark.ddp
@pytest.mark.parametrize("net", [UnusedSharedLayerNet, UnusedSharedLayerNoSplitNet])
def test_ddp_on_one_rank_leaves_a_shared_parameter_no_task_reaches_as_one_process_does(net):
    # DDP wraps the model on one rank too (devices=1, torchrun --nproc_per_node=1) and waits for
    # a gradient of every parameter, where nothing is synced: the parameter with no gradient
    # failed the next step ("parameters that were not used"), or, with the views, got a 0 that
    # AdamW's decay moved.
    (on_ddp,) = run_on_lightning_ranks(_fit_with_an_unused_layer, net, world_size=1)
    plain = _fit_with_an_unused_layer(None, net)
    assert plain["grad"] is None and on_ddp["grad"] is None
    for key, value in plain["state"].items():
        torch.testing.assert_close(on_ddp["state"][key], value, rtol=0, atol=0, msg=key)


class PartlyReachedSharedLayersNet(UnusedSharedLayerNet):
    """:class:`UnusedSharedLayerNet` with more shared layers: ``rare``, that only rows whose
    first input is above 1 reach (none of rank 0's rows in :func:`ddp_batches`, some of rank 1's
    at every step); ``once``, above 1.5 (only rank 1's second batch: reached at every other
    step, by no rank at the steps between); ``zero``, reached as ``rare`` but times 0 (a
    gradient of exactly 0, on one rank); and ``aux``, that no task reaches but a term of the
    model's own added to the objective does, in its first row only (a gradient 0 elsewhere).
    The concatenated batches reach ``rare`` and ``zero`` at every step and ``once`` at every
    other."""

    def __init__(self) -> None:
        super().__init__()
        self.rare, self.once, self.zero, self.aux = (torch.nn.Linear(8, 8) for _ in range(4))

    def forward_shared(self, inputs):
        shared = self.trunk(inputs)
        for layer, above, factor in (
            (self.rare, 1.0, 1.0),
            (self.once, 1.5, 1.0),
            (self.zero, 1.0, 0.0),
        ):
            rows = inputs[:, :1] > above
            if rows.any():  # else the layer is not in the graph at all
                shared = torch.where(rows, shared + factor * layer(shared), shared)
        return shared

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 0.5 * self.aux.weight[0].pow(2).sum()


class PartlyReachedSharedLayersNoSplitNet(PartlyReachedSharedLayersNet):
    def forward(self, inputs):
        return ThreeTaskNet.forward_heads(
            self, PartlyReachedSharedLayersNet.forward_shared(self, inputs)
        )


PartlyReachedSharedLayersNoSplitNet.forward_shared = None  # the per-task passes before backward
PartlyReachedSharedLayersNoSplitNet.forward_heads = None

PARTLY_REACHED_NETS = {
    "views": PartlyReachedSharedLayersNet,
    "passes": PartlyReachedSharedLayersNoSplitNet,
}


def _fit_partly_reached(rank: int | None, cases: list[tuple[str, str]]) -> dict:
    """Each case (net, sync) fitted with MGDA's parameter gradients for two epochs of
    :func:`ddp_batches`: one process on the concatenated batches (``rank=None``) or one rank of
    a 2-process DDP run."""
    results = {}
    for net, sync in cases:
        torch.manual_seed(0)
        model = PARTLY_REACHED_NETS[net]().double()
        ddp = {} if rank is None else {"strategy": "ddp", "devices": 2}
        batches = concatenated_ddp_batches() if rank is None else ddp_batches()[rank]
        run = trainer([callbacks.MGDA(sync=sync)], 2, use_distributed_sampler=False, **ddp)
        run.fit(model, DataLoader(batches, batch_size=None))
        results[(net, sync)] = {
            "unused grad": model.unused.weight.grad,
            "rare grad": model.rare.weight.grad,
            "zero grad": model.zero.weight.grad,
            "aux grad": model.aux.weight.grad,
            "parameters": {k: v.clone() for k, v in model.state_dict().items()},
        }
    return results


@pytest.mark.ddp
def test_two_ranks_give_no_gradient_to_a_shared_parameter_no_rank_reaches():
    # As DDP itself does (find_unused_parameters=True leaves a parameter that no rank used
    # without a gradient), and as one process on the concatenated batch: AdamW leaves it alone
    # (and "once" alone at the steps no rank reaches it, whatever gradient the step before
    # left); a parameter the model's own term reaches keeps that gradient.
    cases = [(net, sync) for net in PARTLY_REACHED_NETS for sync in ("gradients", "gramian")]
    ranks = run_on_lightning_ranks(_fit_partly_reached, cases)
    single = _fit_partly_reached(None, cases)
    for case in cases:
        assert single[case]["unused grad"] is None and single[case]["rare grad"] is not None
        assert not single[case]["zero grad"].any()  # reached: a gradient of 0, which AdamW takes
        for on_rank in ranks:
            assert on_rank[case]["unused grad"] is None, case
            assert on_rank[case]["rare grad"] is not None, case  # rank 0's own 0, averaged
            assert on_rank[case]["zero grad"] is not None, case  # reached on rank 1 only
            torch.testing.assert_close(on_rank[case]["aux grad"], single[case]["aux grad"])
        initial = PARTLY_REACHED_NETS[case[0]]
        torch.manual_seed(0)
        unused = initial().unused.weight.double()
        for on_rank in ranks:
            parameters = on_rank[case]["parameters"]
            torch.testing.assert_close(parameters["unused.weight"], unused, rtol=0, atol=0)
            if case[1] == "gradients":  # exact: the concatenated batch's update
                for key, value in single[case]["parameters"].items():
                    torch.testing.assert_close(
                        parameters[key], value, rtol=1e-8, atol=1e-11, msg=f"{case} {key}"
                    )


class ZeroAtOddStepsNet(UnusedSharedLayerNet):
    """``alt``: reached times 0 (a gradient of exactly 0) by rows whose first input is above 1.5:
    in :func:`ddp_batches` only rank 1's second batch (global steps 1 and 3); no rank at steps
    0 and 2."""

    def __init__(self) -> None:
        super().__init__()
        self.alt = torch.nn.Linear(8, 8)

    def forward_shared(self, inputs):
        shared = self.trunk(inputs)
        rows = inputs[:, :1] > 1.5
        if rows.any():
            shared = torch.where(rows, shared + 0.0 * self.alt(shared), shared)
        return shared


def _fit_zero_at_odd_steps(rank: int | None) -> dict:
    torch.manual_seed(0)
    model = ZeroAtOddStepsNet().double()
    # The steps between Nash-MTL's solves are plain backwards: alt is off rank 0's graph there.
    ddp = {"strategy": DDPStrategy(find_unused_parameters=True), "devices": 2}
    ddp = {} if rank is None else ddp
    batches = concatenated_ddp_batches() if rank is None else ddp_batches()[rank]
    method = callbacks.NashMTL(update_weights_every=2)
    trainer([method], 2, use_distributed_sampler=False, **ddp).fit(
        model, DataLoader(batches, batch_size=None)
    )
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.ddp
def test_a_solving_steps_unreached_parameters_are_its_own_not_the_next_steps():
    # Nash-MTL solves at steps 0 and 2, where no rank reaches alt (its gradient is taken off);
    # at steps 1 and 3 a task reaches it with a gradient of exactly 0, which it keeps, as one
    # process on the concatenated batches does: AdamW decays it.
    ranks = run_on_lightning_ranks(_fit_zero_at_odd_steps)
    single = _fit_zero_at_odd_steps(None)
    torch.manual_seed(0)
    assert not torch.equal(single["alt.weight"], ZeroAtOddStepsNet().double().alt.weight)
    for on_rank in ranks:
        for key, value in single.items():
            torch.testing.assert_close(on_rank[key], value, rtol=1e-8, atol=1e-11, msg=key)


class TiedHeadNet(MultiTaskMixin, L.LightningModule):
    """One task whose head's weight is the trunk's second layer's (tied, as a language model's
    output layer and its embedding): a head parameter with a trunk side too."""

    def __init__(self, tasks: dict[str, Task] | None = None) -> None:
        super().__init__(tasks=tasks or {"price": Task("mse")})
        self.first, self.mix = torch.nn.Linear(5, 8), torch.nn.Linear(8, 8)
        self.heads = torch.nn.ModuleDict({"price": torch.nn.Linear(8, 8)})
        self.heads["price"].weight = self.mix.weight

    def forward_shared(self, inputs):
        return torch.tanh(self.mix(torch.tanh(self.first(inputs))))

    def forward_heads(self, shared):
        return {"price": self.heads["price"](shared).sum(-1)}

    def forward(self, inputs):
        return self.forward_heads(self.forward_shared(inputs))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("method", [callbacks.MGDA, callbacks.UPGrad])
def test_a_head_weight_tied_to_the_trunk_takes_both_sides_gradients(method):
    # One task: the method's weight is 1 and the step must be the plain step; the tied weight's
    # trunk side went unweighed (and lost) with parameter gradients from the representation.
    inputs, targets = make_batch(8, seed=1)
    batch = (inputs, {"price": targets["price"]})

    def step(callbacks_: list) -> dict:
        torch.manual_seed(0)
        model = TiedHeadNet().double()
        quiet_trainer(1, steps=1, callbacks=callbacks_).fit(model, one_batch_loader(batch))
        return {name: value.clone() for name, value in model.state_dict().items()}

    plain, weighted = step([]), step([method()])
    for name, value in plain.items():
        torch.testing.assert_close(weighted[name], value, rtol=1e-12, atol=1e-14, msg=name)


class TiedHeadTwoTaskNet(TiedHeadNet):
    """:class:`TiedHeadNet` with a second, plain head, and static weights 2 and 0.5."""

    def __init__(self) -> None:
        super().__init__({"price": Task("mse", weight=2.0), "sold": Task("mse", weight=0.5)})
        self.heads["sold"] = torch.nn.Linear(8, 1)

    def forward_heads(self, shared):
        return {**super().forward_heads(shared), "sold": self.heads["sold"](shared).squeeze(-1)}


@pytest.mark.parametrize("method", [callbacks.MGDA, callbacks.UPGrad])
def test_with_rep_grad_a_tied_head_weight_takes_its_head_use_and_the_trunks_share_of_d(method):
    # The README's promise, worked by hand: heads get their own task's gradient times its
    # Task.weight; the trunk gets d = sum_k w_k s_k r_k at the representation, w from the
    # Gramian of the r_k; the tied weight, in both, gets the two sums.
    inputs, targets = make_batch(8, seed=1)
    batch = (inputs, {"price": targets["price"], "sold": targets["sold"]})
    torch.manual_seed(0)
    model = TiedHeadTwoTaskNet().double()
    before = copy.deepcopy(model)
    quiet_trainer(1, steps=1, callbacks=[method(rep_grad=True)]).fit(model, one_batch_loader(batch))

    shared = before.forward_shared(inputs)
    view = shared.detach().requires_grad_()
    predictions = before.forward_heads(view)
    labelled = ~torch.isnan(batch[1]["price"])
    losses = {
        "price": torch.nn.functional.mse_loss(
            predictions["price"][labelled], batch[1]["price"][labelled]
        ),
        "sold": torch.nn.functional.mse_loss(predictions["sold"], batch[1]["sold"]),
    }
    static = {"price": 2.0, "sold": 0.5}
    rows = torch.stack([torch.autograd.grad(losses[k], view, retain_graph=True)[0] for k in static])
    flat = rows.flatten(1)
    weights = getattr(functional, method.__name__.lower())(flat @ flat.T)
    direction = sum(w * s * row for w, s, row in zip(weights, static.values(), rows, strict=True))
    parameters = dict(before.named_parameters())

    def gradients(output, grad_output=None) -> dict:
        values = torch.autograd.grad(
            output, list(parameters.values()), grad_output, retain_graph=True, allow_unused=True
        )
        return dict(zip(parameters, values, strict=True))

    head_use = gradients(sum(static[k] * losses[k] for k in static))
    trunk = gradients(shared, direction)
    after = dict(model.named_parameters())
    for name, parameter in parameters.items():
        grad = sum(g for g in (head_use[name], trunk[name]) if g is not None)
        torch.testing.assert_close(
            after[name], parameter.detach() - 0.1 * grad, rtol=1e-12, atol=1e-14, msg=name
        )


def test_a_jacobian_of_mixed_dtypes_keeps_the_widest_exactly():
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.zeros(3, dtype=torch.float32), torch.zeros(2, 2, dtype=torch.float64)]
    rows = [
        tuple(torch.randn(x.shape, generator=generator, dtype=x.dtype) / 3 for x in inputs)
        for _ in range(2)
    ]
    jacobian = gradient_weighting._jacobian(rows, inputs)
    expected = torch.stack([torch.cat([a.double(), b.reshape(-1)]) for a, b in rows])
    assert jacobian.dtype == torch.float64
    assert torch.equal(jacobian, expected)


def test_a_gramian_diagonal_rounded_below_zero_logs_a_zero_norm_not_nan():
    # A Gramian summed from parts (the linear heads' factors, the ranks' Gramians) can round a
    # zero gradient's G[k, k] just below 0.
    method = callbacks.MGDA()
    gramian = torch.tensor([[-1e-20, 0.0], [0.0, 4.0]], dtype=torch.float64)
    method._gramian, method._gramian_valid = gramian, torch.tensor([True, True])
    assert method.state_to_log()["grad_norm"].tolist() == [0.0, 2.0]
