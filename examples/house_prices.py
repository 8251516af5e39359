"""The classic multi-task case: one shared trunk predicts a house's price and classifies its type.

Price (MSE on standardised price) is weighted 2:1 against the type (cross-entropy over detached,
terraced and flat). The houses are generated: size, rooms, age, distance to the centre and a garden
flag decide both the price and the type; some prices are unknown (NaN) and are masked out.

    python examples/house_prices.py
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_lossagg import MultiTaskMixin, Task
from lightning_lossagg.callbacks import LossLogger

HOUSE_TYPES = ("detached", "terraced", "flat")


def generate_houses(num_houses: int = 4000, seed: int = 0) -> TensorDataset:
    """Features ``[N, 5]``, standardised price ``[N]`` (10 % unknown) and type ``[N]``."""
    generator = torch.Generator().manual_seed(seed)
    size = 40 + 160 * torch.rand(num_houses, generator=generator)  # m²
    rooms = (size / 25 + torch.randn(num_houses, generator=generator)).clamp(min=1).round()
    age = 100 * torch.rand(num_houses, generator=generator)
    distance = 20 * torch.rand(num_houses, generator=generator)  # km to the centre
    garden = (torch.rand(num_houses, generator=generator) < 0.5).float()
    kind = torch.where(garden.bool() & (size > 110), 0, torch.where(size > 70, 1, 2))
    price = 3 * size + 15 * rooms - 0.5 * age - 8 * distance + 40 * garden
    price = price + 20 * torch.randn(num_houses, generator=generator)
    price = (price - price.mean()) / price.std()
    price[torch.rand(num_houses, generator=generator) < 0.1] = torch.nan
    features = torch.stack([size, rooms, age, distance, garden], dim=1)
    features = (features - features.mean(0)) / features.std(0)
    return TensorDataset(features, price, kind)


def as_task_batch(batch: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    features, price, kind = batch
    return features, {"price": price, "kind": kind}


def house_loader(dataset: TensorDataset, batch_size: int, shuffle: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=lambda rows: as_task_batch(torch.utils.data.default_collate(rows)),
    )


class HouseNet(MultiTaskMixin, L.LightningModule):
    """A shared trunk with a price head and a house-type head."""

    def __init__(self, hidden: int = 64, lr: float = 3e-3) -> None:
        super().__init__(tasks={"price": Task("mse", weight=2.0), "kind": Task("cross_entropy")})
        self.lr = lr
        self.trunk = nn.Sequential(
            nn.Linear(5, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleDict({"price": nn.Linear(hidden, 1), "kind": nn.Linear(hidden, 3)})

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        shared = self.trunk(features)
        return {
            "price": self.heads["price"](shared).squeeze(-1),
            "kind": self.heads["kind"](shared),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(max_epochs: int = 5, **trainer_kwargs: object) -> dict[str, float]:
    L.seed_everything(0)
    train, val = generate_houses(4000, seed=0), generate_houses(1000, seed=1)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        callbacks=[LossLogger()],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    model = HouseNet()
    batch_size = 128 // trainer.world_size  # per rank: a global batch of 128 on any number
    trainer.fit(model, house_loader(train, batch_size, True), house_loader(val, batch_size))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if trainer.is_global_zero:
        for key in ("val/loss/price", "val/loss/kind", "val/weighted/price", "val/weighted/kind"):
            print(f"{key:<22} {metrics[key]:.4f}")
    return metrics


if __name__ == "__main__":
    main()
