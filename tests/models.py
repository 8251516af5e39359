"""Small multi-task models and batches shared by the tests (importable by spawned DDP ranks)."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_lossagg import MultiTaskMixin, Task

IN_FEATURES = 5


class ThreeTaskNet(MultiTaskMixin, L.LightningModule):
    """price (MSE, weight 2), kind (3-class cross-entropy), sold (BCE with logits; with
    ``sold_loss="mse"`` stacked with price); ``task_order`` orders them (or leaves some out)."""

    def __init__(
        self,
        rank_weighting: str = "samples",
        lr: float = 0.1,
        sold_weight: float = 1.0,
        sold_loss: str = "bce_with_logits",
        task_order: tuple[str, ...] = ("price", "kind", "sold"),
    ) -> None:
        tasks = {
            "price": Task("mse", weight=2.0),
            "kind": Task("cross_entropy"),
            "sold": Task(sold_loss, weight=sold_weight),
        }
        super().__init__(
            tasks={name: tasks[name] for name in task_order}, rank_weighting=rank_weighting
        )
        self.lr = lr
        self.trunk = nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.Tanh())
        self.heads = nn.ModuleDict(
            {"price": nn.Linear(8, 1), "kind": nn.Linear(8, 3), "sold": nn.Linear(8, 1)}
        )

    def forward(self, inputs: Tensor) -> dict[str, Tensor]:
        return self.forward_heads(self.forward_shared(inputs))

    def forward_shared(self, inputs: Tensor) -> Tensor:
        return self.trunk(inputs)

    def forward_heads(self, shared: Tensor) -> dict[str, Tensor]:
        return {
            "price": self.heads["price"](shared).squeeze(-1),
            "kind": self.heads["kind"](shared),
            "sold": self.heads["sold"](shared).squeeze(-1),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class PriceKindNet(ThreeTaskNet):
    """:class:`ThreeTaskNet` without its sold task (its head kept: the same initial model); its
    batches carry no "sold" target (:func:`without_sold`)."""

    def __init__(self) -> None:
        super().__init__(task_order=("price", "kind"))

    def forward_heads(self, shared: Tensor) -> dict[str, Tensor]:
        predictions = super().forward_heads(shared)
        return {name: predictions[name] for name in self.task_names}


def without_sold(batches: list) -> list:
    """``batches`` without their "sold" targets, for :class:`PriceKindNet`."""
    return [
        (inputs, {name: target for name, target in targets.items() if name != "sold"})
        for inputs, targets in batches
    ]


class TwoLayerTrunkNet(ThreeTaskNet):
    """:class:`ThreeTaskNet` with a trunk of two layers (a parameter that can be left out of
    ``shared_parameters()`` or frozen)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(IN_FEATURES, 6), nn.Tanh(), nn.Linear(6, 8), nn.Tanh())


def make_batch(
    num_samples: int, seed: int, missing_every: int = 3, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, dict[str, Tensor]]:
    """Inputs and targets with some labels missing (NaN / ignore_index)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, IN_FEATURES, generator=generator, dtype=dtype)
    price = torch.randn(num_samples, generator=generator, dtype=dtype)
    kind = torch.randint(0, 3, (num_samples,), generator=generator)
    sold = torch.randint(0, 2, (num_samples,), generator=generator).to(dtype)
    rows = torch.arange(num_samples)
    price[rows % missing_every == 0] = torch.nan
    kind[rows % missing_every == 1] = -100
    return inputs, {"price": price, "kind": kind, "sold": sold}


def concat_batches(*batches: tuple[Tensor, dict[str, Tensor]]) -> tuple[Tensor, dict[str, Tensor]]:
    inputs = torch.cat([b[0] for b in batches])
    targets = {k: torch.cat([b[1][k] for b in batches]) for k in batches[0][1]}
    return inputs, targets


def reference_task_losses(model: nn.Module, batch: tuple[Tensor, dict[str, Tensor]]) -> dict:
    """Task losses by plain torch on the valid labels only (independent of the library)."""
    inputs, targets = batch
    predictions = model(inputs)
    price_ok = ~torch.isnan(targets["price"])
    kind_ok = targets["kind"] != -100
    sold_ok = ~torch.isnan(targets["sold"])
    return {
        "price": nn.functional.mse_loss(predictions["price"][price_ok], targets["price"][price_ok]),
        "kind": nn.functional.cross_entropy(predictions["kind"][kind_ok], targets["kind"][kind_ok]),
        "sold": nn.functional.binary_cross_entropy_with_logits(
            predictions["sold"][sold_ok], targets["sold"][sold_ok]
        ),
    }


def one_batch_loader(batch: tuple[Tensor, dict[str, Tensor]]) -> DataLoader:
    """A loader that yields exactly ``batch`` once."""
    return DataLoader([batch], batch_size=None)


def quiet_trainer(
    devices: int,
    steps: int = 1,
    precision: str = "64-true",
    callbacks: list[L.Callback] | None = None,
    **settings: object,
) -> L.Trainer:
    """A CPU trainer for ``steps`` optimizer steps without logger, checkpoints or progress bar:
    one process, or ``devices`` processes of a real gloo group (``ddp_spawn``) that each read
    their own batches (no distributed sampler); ``settings``: more Trainer arguments."""
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=steps,
        precision=precision,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **settings,  # type: ignore[arg-type]
    )
