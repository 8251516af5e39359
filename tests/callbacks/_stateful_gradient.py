"""Shared pieces of the GradNorm, GradVac and DB-MTL tests: tiny fits, a recorder, plain-torch
helpers for the by-hand references, and ONE 2-process launch that serves all three methods.

Importable by spawned DDP ranks.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lightning_lossagg.callbacks import DBMTL, GradNorm, GradVac
from lightning_lossagg.weighting import WeightingCallback
from tests.callbacks._fits import (
    assert_nested_equal,
    concatenated_ddp_batches,
    ddp_batches,
    loader,
)
from tests.models import (
    IN_FEATURES,
    ThreeTaskNet,
    reference_task_losses,
)
from tests.process_group import CollectivesPerStep, run_on_lightning_ranks

STATIC = torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64)  # ThreeTaskNet's Task.weight
MODEL_LR = 0.1  # ThreeTaskNet's SGD

# Arguments that make every method's state move visibly within two steps (used under DDP).
METHODS: dict[str, Callable[[], WeightingCallback]] = {
    "gradnorm": lambda: GradNorm(alpha=1.5, lr=0.1, layer="last", sync="gradients"),
    "gradvac": lambda: GradVac(beta=0.5, seed=7, sync="gradients"),
    "db_mtl": lambda: DBMTL(beta=0.9, beta_sigma=0.5),
}


class Recorder(L.Callback):
    """Per training step: the recorded weights, the model's gradients, the method's state."""

    def __init__(self, method: WeightingCallback) -> None:
        self.method = method
        self.steps: list[dict[str, Any]] = []
        self._grads: dict[str, Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._grads = {name: p.grad.clone() for name, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(
            {
                "losses": pl_module.loss_record.losses.clone(),
                "weights": pl_module.loss_record.weights.clone(),
                "grads": self._grads,
                "state": copy.deepcopy(self.method.state_dict()),
                "logged": {k: v.clone() for k, v in self.method.state_to_log().items()},
            }
        )
        self._grads = {}


class DeepTrunkNet(ThreeTaskNet):
    """ThreeTaskNet with two shared layers: the last shared layer is not the whole trunk."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())


def initial_model(deep: bool = False) -> ThreeTaskNet:
    """The seeded initial model, in float64 from the start (with "64-true" Lightning converts
    the module only after restoring a checkpoint, which would round restored weights)."""
    torch.manual_seed(0)
    return (DeepTrunkNet() if deep else ThreeTaskNet()).double()


def fit(
    method: WeightingCallback,
    batches: list,
    max_epochs: int = 1,
    *,
    extra_callbacks: tuple[L.Callback, ...] = (),
    ckpt_path: str | Path | None = None,
    deep: bool = False,
    **trainer_kwargs: Any,
) -> tuple[Recorder, ThreeTaskNet]:
    """``method`` fitted on ``batches`` from the seeded initial model, one process."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "64-true",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    options.update(trainer_kwargs)
    recorder = Recorder(method)
    model = initial_model(deep)
    trainer = L.Trainer(
        max_epochs=max_epochs, callbacks=[method, recorder, *extra_callbacks], **options
    )
    trainer.fit(model, loader(batches), ckpt_path=ckpt_path)
    return recorder, model


def assert_resume_equals_uninterrupted(
    make_method: Callable[[], WeightingCallback], batches: list, checkpoint_dir: Path
) -> tuple[Recorder, Recorder, WeightingCallback]:
    """Fit 2 epochs with a checkpoint, resume to 4 with a new method, and check every step's
    weights and gradients, the method's state and the model against an uninterrupted 4-epoch
    fit. Returns the uninterrupted steps, the resumed run's steps and the uninterrupted method."""
    full_method = make_method()
    full, full_model = fit(full_method, batches, max_epochs=4)
    checkpoint = ModelCheckpoint(dirpath=checkpoint_dir, save_last=True)
    first, _ = fit(
        make_method(), batches, 2, extra_callbacks=(checkpoint,), enable_checkpointing=True
    )
    resumed_method = make_method()
    second, resumed_model = fit(
        resumed_method, batches, 4, ckpt_path=Path(checkpoint_dir) / "last.ckpt"
    )
    assert len(first.steps) == len(second.steps) == 2 * len(batches)
    for index, (resumed, uninterrupted) in enumerate(
        zip(first.steps + second.steps, full.steps, strict=True)
    ):
        assert torch.equal(resumed["weights"], uninterrupted["weights"]), f"step {index}"
        assert_nested_equal(resumed["grads"], uninterrupted["grads"], f"grads of step {index}")
    assert_nested_equal(resumed_method.state_dict(), full_method.state_dict())
    assert_nested_equal(resumed_model.state_dict(), full_model.state_dict())
    return full, second, full_method


# ----------------------------------------------------------------------------- plain torch
def forward_losses(model: ThreeTaskNet, batch: tuple) -> tuple[Tensor, Tensor]:
    """The task losses of ``batch`` (plain torch, valid labels only) and the representation."""
    inputs, targets = batch
    shared = model.forward_shared(inputs)
    predictions = model.forward_heads(shared)
    losses = reference_task_losses(lambda _: predictions, (inputs, targets))  # type: ignore[arg-type]
    return torch.stack(list(losses.values())), shared


def flat_grad(loss: Tensor, inputs: list[Tensor]) -> Tensor:
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            torch.zeros_like(x).flatten() if g is None else g.flatten()
            for g, x in zip(grads, inputs, strict=True)
        ]
    )


def sgd_step(model: ThreeTaskNet, trunk_grad: Tensor, head_objective: Tensor) -> dict[str, Tensor]:
    """One SGD step of the model: ``trunk_grad`` (flat) on the trunk, the gradient of
    ``head_objective`` on the heads. Returns the gradients, by parameter name."""
    heads = list(model.heads.parameters())
    head_grads = torch.autograd.grad(head_objective, heads, retain_graph=True)
    trunk = list(model.trunk.parameters())
    grads = {}
    for (name, parameter), grad in zip(
        model.trunk.named_parameters(),
        torch.split(trunk_grad, [p.numel() for p in trunk]),
        strict=True,
    ):
        grads[f"trunk.{name}"] = grad.view_as(parameter)
    for (name, _), grad in zip(model.heads.named_parameters(), head_grads, strict=True):
        grads[f"heads.{name}"] = grad
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter -= MODEL_LR * grads[name]
    return grads


def assert_grads_close(recorded: dict[str, Tensor], expected: dict[str, Tensor], msg: str) -> None:
    assert recorded.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(recorded[name], grad, rtol=1e-9, atol=1e-12, msg=f"{msg} {name}")


def assert_nested_close(actual: Any, expected: Any, path: str = "state") -> None:
    """Nested equality to float64 rounding (sums taken in another order)."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            assert_nested_close(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, list | tuple):
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_nested_close(a, e, f"{path}[{index}]")
    elif isinstance(expected, Tensor):
        torch.testing.assert_close(
            actual, expected, rtol=1e-10, atol=1e-12, equal_nan=True, msg=path
        )
    else:
        assert actual == expected, path


# ----------------------------------------------------------------------------- DDP
def _ddp_rank(rank: int) -> dict[str, dict[str, Any]]:
    """One rank of a 2-process run: each method fits with Lightning's DDP strategy in turn."""
    results = {}
    for name, make_method in METHODS.items():
        method, collectives = make_method(), CollectivesPerStep()
        recorder, model = fit(
            method,
            ddp_batches()[rank],
            extra_callbacks=(collectives,),
            strategy="ddp",
            devices=2,
            use_distributed_sampler=False,
        )
        results[name] = {
            "collectives_per_step": collectives.calls,
            "weights": torch.stack([step["weights"] for step in recorder.steps]),
            "state": copy.deepcopy(method.state_dict()),
            "parameters": {k: v.clone() for k, v in model.state_dict().items()},
        }
    return results


@functools.cache
def two_rank_results() -> list[dict[str, Any]]:
    """Per rank, per method: the weights of both steps, the final state and model parameters.

    Launched once per test session (a launch costs seconds; a fit inside it, a fraction).
    """
    return run_on_lightning_ranks(_ddp_rank)


def assert_two_ranks_equal_one_process(name: str) -> None:
    """Both ranks hold the same weights, and they, the method's state and the model equal a
    1-process run on the concatenated batches."""
    rank0, rank1 = (results[name] for results in two_rank_results())
    # The mixin's all-reduce of the losses and ONE of the method's gradients, per step.
    for results in (rank0, rank1):
        assert results["collectives_per_step"] == [["all_reduce"] * 2] * 2, name
    assert torch.equal(rank0["weights"], rank1["weights"])
    assert_nested_equal(rank1["state"], rank0["state"])
    method = METHODS[name]()
    recorder, model = fit(method, concatenated_ddp_batches())
    single = torch.stack([step["weights"] for step in recorder.steps])
    assert len(single) == 2
    torch.testing.assert_close(rank0["weights"], single, rtol=1e-10, atol=1e-12)
    assert_nested_close(rank0["state"], method.state_dict())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(rank0["parameters"][key], value, rtol=1e-10, atol=1e-12, msg=key)
