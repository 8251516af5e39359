"""Promise 1 and 3 through Lightning: a real 2-rank DDP fit equals one process on the
concatenated batch, with exactly one library collective per step (none on one process)."""

import copy
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.models import (
    ThreeTaskNet,
    concat_batches,
    make_batch,
    one_batch_loader,
    quiet_trainer,
    reference_task_losses,
)
from tests.process_group import CollectiveCounter, rank_trainer, run_on_lightning_ranks


class RecordingNet(ThreeTaskNet):
    """Trains on this rank's own batch and saves what the step produced."""

    def __init__(self, out_dir: str, rank_batches: list, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir, self.rank_batches = out_dir, rank_batches

    def train_dataloader(self):
        return one_batch_loader(self.rank_batches[self.trainer.global_rank])

    def training_step(self, batch, batch_idx):
        with CollectiveCounter() as counter:
            objective = super().training_step(batch, batch_idx)
        self.collectives = counter.calls
        return objective

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        record = self.loss_record
        saved = {
            "losses": record.losses,
            "weights": record.weights,
            "objective": record.objective,
            "grads": {n: p.grad.clone() for n, p in self.named_parameters()},
            "collectives": self.collectives,
        }
        # The same batch evaluated (the parameters have not moved): the global objective.
        with torch.no_grad():
            batch = self.rank_batches[self.global_rank]
            saved["validation_step"] = self.validation_step(batch, 0)
        torch.save(saved, Path(self.out_dir) / f"rank{self.global_rank}.pt")


def _reference(model: torch.nn.Module, batch) -> dict:
    model = copy.deepcopy(model).double()
    losses = reference_task_losses(model, batch)
    objective = 2.0 * losses["price"] + losses["kind"] + losses["sold"]
    objective.backward()
    return {
        "losses": torch.stack([losses[n] for n in ("price", "kind", "sold")]).detach(),
        "objective": objective.detach(),
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }


def _assert_matches_reference(result: dict, reference: dict) -> None:
    torch.testing.assert_close(result["losses"], reference["losses"], atol=1e-6, rtol=0)
    torch.testing.assert_close(result["objective"], reference["objective"], atol=1e-6, rtol=0)
    torch.testing.assert_close(result["validation_step"], reference["objective"], atol=1e-6, rtol=0)
    torch.testing.assert_close(
        result["weights"], torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)
    )
    for name, grad in reference["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, atol=1e-6, rtol=0, msg=name)


@pytest.mark.ddp
def test_two_rank_ddp_equals_one_process_on_the_concatenated_batch(tmp_path):
    # Uneven batches (5 and 8 samples), missing labels on both ranks, and rank 1 without a single
    # valid "kind" label: the hard cases for exact aggregation.
    rank0, rank1 = make_batch(5, seed=1), make_batch(8, seed=2)
    rank1[1]["kind"][:] = -100
    model = RecordingNet(str(tmp_path), [rank0, rank1])
    reference = _reference(model, concat_batches(rank0, rank1))

    quiet_trainer(devices=2).fit(model)

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for result in results:
        _assert_matches_reference(result, reference)
        assert result["collectives"] == ["all_reduce"]


def test_one_process_matches_the_reference_and_issues_no_collective(tmp_path):
    batch = make_batch(9, seed=3)
    model = RecordingNet(str(tmp_path), [batch])
    reference = _reference(model, batch)
    quiet_trainer(devices=1).fit(model)
    result = torch.load(tmp_path / "rank0.pt")
    _assert_matches_reference(result, reference)
    assert result["collectives"] == []


class StackedRecordingNet(RecordingNet):
    """price and sold both MSE on predictions of one shape: the mixin stacks them (one summed
    group per step), the path exact aggregation must hold for as much as the per-task one."""

    def __init__(self, out_dir: str, rank_batches: list) -> None:
        super().__init__(out_dir, rank_batches, sold_loss="mse")

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        path = Path(self.out_dir) / f"rank{self.global_rank}.pt"
        result = torch.load(path)
        result["counts"] = self.loss_record.counts
        result["stacked"] = any(plan is not None for plan in self._stacking_plans.values())
        torch.save(result, path)


@pytest.mark.ddp
def test_two_rank_ddp_with_stacked_tasks_equals_one_process_on_the_concatenated_batch(tmp_path):
    rank0, rank1 = make_batch(5, seed=1), make_batch(8, seed=2)
    rank0[1]["sold"][[0, 3]] = torch.nan  # sold's labels missing elsewhere than price's
    rank1[1]["sold"][:] = torch.nan  # and none on rank 1
    model = StackedRecordingNet(str(tmp_path), [rank0, rank1])
    batch = concat_batches(rank0, rank1)
    reference_model = copy.deepcopy(model).double()
    inputs, targets = batch
    predictions = reference_model(inputs)
    losses = {}
    for name in ("price", "sold"):
        valid = ~torch.isnan(targets[name])
        losses[name] = torch.nn.functional.mse_loss(predictions[name][valid], targets[name][valid])
    valid_kind = targets["kind"] != -100
    losses["kind"] = torch.nn.functional.cross_entropy(
        predictions["kind"][valid_kind], targets["kind"][valid_kind]
    )
    objective = 2.0 * losses["price"] + losses["kind"] + losses["sold"]
    objective.backward()
    reference = {
        "losses": torch.stack([losses[n] for n in ("price", "kind", "sold")]).detach(),
        "objective": objective.detach(),
        "grads": {n: p.grad for n, p in reference_model.named_parameters()},
    }
    counts = [(~torch.isnan(targets[n])).sum() for n in ("price", "sold")]
    counts.insert(1, valid_kind.sum())

    quiet_trainer(devices=2).fit(model)

    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["stacked"]
        _assert_matches_reference(result, reference)
        assert result["counts"].tolist() == [int(c) for c in counts]
        assert result["collectives"] == ["all_reduce"]


def _evaluate_unequal_batches(rank: int) -> dict[str, str]:
    """One rank of a 2-process job: validate and test with 2 batches on rank 0, 1 on rank 1."""
    batches = [make_batch(4, seed=seed) for seed in range(2 - rank)]
    messages = {}
    for stage in ("validate", "test"):
        trainer = rank_trainer(use_distributed_sampler=False)
        try:
            loader = DataLoader(batches, batch_size=None)
            getattr(trainer, stage)(ThreeTaskNet().double(), loader, verbose=False)
        except RuntimeError as error:
            messages[stage] = str(error)
    return messages


@pytest.mark.ddp
def test_an_evaluation_epoch_with_more_batches_on_one_rank_is_refused_on_every_rank():
    # Each evaluation batch's losses take one all-reduce: rank 0's second batch would wait for
    # ever (a sampler that does not pad).
    for messages in run_on_lightning_ranks(_evaluate_unequal_batches):
        for stage in ("validate", "test"):
            assert re.search(r"1 batches on one rank and 2 on another", messages.get(stage, ""))
