"""What the callback tests share: fixed batches, a quiet float64 trainer, the model in float64
from a given state, the 2-rank DDP batches, a nested equality check for method state, a model
whose loss turns negative at a chosen step, and one under manual optimization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_lossagg import MaskedLoss
from lightning_lossagg.cli import build_cli
from tests.models import ThreeTaskNet, concat_batches, make_batch

CONFIGS = Path(__file__).parents[2] / "configs"


def training_batches(num_batches: int = 2, seed: int = 0) -> list:
    """Uneven batches with missing labels; the second has no valid "kind" label at all."""
    batches = [make_batch(6 + 3 * index, seed=seed + index) for index in range(num_batches)]
    if num_batches > 1:
        batches[1][1]["kind"][:] = -100
    return batches


def loader(batches: list) -> DataLoader:
    return DataLoader(batches, batch_size=None)  # fixed order: no shuffle


def trainer(callbacks: list, max_epochs: int, **kwargs: Any) -> L.Trainer:
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
    options.update(kwargs)
    return L.Trainer(max_epochs=max_epochs, callbacks=callbacks, **options)


def initial_model_state() -> dict[str, Tensor]:
    torch.manual_seed(0)
    return ThreeTaskNet().state_dict()


def model_from(state: dict[str, Tensor]) -> ThreeTaskNet:
    """The model in float64 from the start (with "64-true" Lightning would convert it only after
    restoring a checkpoint, rounding the restored weights to float32), ``state`` loaded exactly."""
    model = ThreeTaskNet().double()
    model.load_state_dict(state)
    return model


def assert_nested_equal(actual: Any, expected: Any, path: str = "state") -> None:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            assert_nested_equal(actual[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_nested_equal(a, e, f"{path}[{index}]")
    elif isinstance(expected, Tensor):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=path)
    else:
        assert actual == expected, path


def ddp_batches() -> list[list]:
    """Per rank, two uneven batches per epoch; rank 1 has no valid "kind" label in its second."""
    rank0 = [make_batch(5, seed=10), make_batch(7, seed=11)]
    rank1 = [make_batch(8, seed=20), make_batch(4, seed=21)]
    rank1[1][1]["kind"][:] = -100
    return [rank0, rank1]


def concatenated_ddp_batches() -> list:
    rank0, rank1 = ddp_batches()
    return [concat_batches(a, b) for a, b in zip(rank0, rank1, strict=True)]


def fit_config(method: str, *extra_args: str) -> LightningCLI:
    """``lossagg fit --config configs/penguins_<method>.yaml`` for one epoch, without a logger or
    progress bar, through the real LightningCLI (set ``sys.argv`` to ``["lossagg"]`` first)."""
    return build_cli(
        [
            "fit",
            f"--config={CONFIGS / f'penguins_{method}.yaml'}",
            "--trainer.max_epochs=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            *extra_args,
        ]
    )


class SignedPriceNet(ThreeTaskNet):
    """The "price" loss of a sample is its target, so that a test sets each step's loss."""

    def per_sample_losses(self, predictions, targets):
        losses = super().per_sample_losses(predictions, targets)
        mask = losses["price"].mask  # 0 at a missing label, not its NaN: see MaskedLoss
        price = torch.where(mask, targets["price"], 0.0) + 0 * predictions["price"]
        losses["price"] = MaskedLoss(price, mask)
        return losses


class OwnOptimizerStep(ThreeTaskNet):
    """:class:`ThreeTaskNet` whose ``optimizer_step`` steps the optimizer without ``super()``."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        optimizer.step(closure=optimizer_closure)  # as Lightning's docs show, for a warm-up


class ManualOptimization(ThreeTaskNet):
    """:class:`ThreeTaskNet` stepping its optimizer itself, once per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        objective = super().training_step(batch, batch_idx)
        optimizer.zero_grad()
        self.manual_backward(objective)
        optimizer.step()
        return objective


class ParametersAfterEachStep(L.Callback):
    def __init__(self) -> None:
        self.parameters: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.parameters.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def signed_price_batches(num_batches: int, negative_at: int) -> list:
    """Batches for :class:`SignedPriceNet` whose "price" loss is > 0, except at step
    ``negative_at``, where it is < 0."""
    batches = [make_batch(6, seed=seed) for seed in range(num_batches)]
    for index, batch in enumerate(batches):
        sign = -1.0 if index == negative_at else 1.0
        batch[1]["price"] = sign * (batch[1]["price"].abs() + 0.5)
    return batches
