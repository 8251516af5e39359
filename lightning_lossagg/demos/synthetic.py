"""Generated multi-task regression data and an MLP with a shared trunk: K tasks of known noise.

Used by the examples, tests and benchmarks. Task ``k`` is ``y_k = f_k(x) + noise_std[k] * e`` with
``f_k`` a fixed random two-layer network, so the best achievable MSE of task ``k`` is
``noise_std[k] ** 2``.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_lossagg.aggregation import RankWeighting
from lightning_lossagg.demos.penguins import TaskDataset
from lightning_lossagg.mixin import MultiTaskMixin
from lightning_lossagg.tasks import Task


def task_names(num_tasks: int) -> list[str]:
    """``task_0`` … ``task_{K-1}``."""
    return [f"task_{k}" for k in range(num_tasks)]


def make_regression_tasks(
    num_samples: int,
    num_tasks: int,
    in_features: int = 64,
    noise_std: list[float] | None = None,
    seed: int = 0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Inputs ``[N, in_features]`` and ``{task_k: y_k [N]}`` (see the module's docstring)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.tensor(noise_std if noise_std is not None else [0.1] * num_tasks)
    if len(noise) != num_tasks:
        raise ValueError(f"noise_std has {len(noise)} values for {num_tasks} tasks.")
    inputs = torch.randn(num_samples, in_features, generator=generator)
    projection = torch.randn(in_features, 32, generator=generator) / in_features**0.5
    hidden = torch.tanh(inputs @ projection)
    clean = hidden @ torch.randn(32, num_tasks, generator=generator)
    targets = clean + noise * torch.randn(num_samples, num_tasks, generator=generator)
    return inputs, {name: targets[:, k] for k, name in enumerate(task_names(num_tasks))}


class SyntheticDataModule(L.LightningDataModule):
    """Generated regression tasks (train and validation sets drawn from one distribution).

    Args:
        num_tasks: K.
        num_samples: training samples (validation: a quarter as many).
        in_features: input width.
        noise_std: per-task noise standard deviations (default 0.1 each).
        batch_size: samples per batch.
        seed: the data's seed.
    """

    def __init__(
        self,
        num_tasks: int = 3,
        num_samples: int = 2048,
        in_features: int = 64,
        noise_std: list[float] | None = None,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_tasks, self.num_samples, self.in_features = num_tasks, num_samples, in_features
        self.noise_std, self.batch_size, self.seed = noise_std, batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        total = self.num_samples + self.num_samples // 4
        inputs, targets = make_regression_tasks(
            total, self.num_tasks, self.in_features, self.noise_std, self.seed
        )
        n = self.num_samples
        self.train_set = TaskDataset(inputs[:n], {k: t[:n] for k, t in targets.items()})
        self.val_set = TaskDataset(inputs[n:], {k: t[n:] for k, t in targets.items()})

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size)


class MultiTaskMLP(MultiTaskMixin, L.LightningModule):
    """A shared MLP trunk ``in_features → hidden → hidden`` and one linear head per task.

    Args:
        num_tasks: K regression tasks named ``task_0`` … (MSE each).
        in_features: input width.
        hidden: trunk width.
        lr: SGD-with-momentum learning rate.
        rank_weighting: see :class:`~lightning_lossagg.MultiTaskMixin`.
    """

    def __init__(
        self,
        num_tasks: int = 3,
        in_features: int = 64,
        hidden: int = 256,
        lr: float = 0.01,
        rank_weighting: RankWeighting = "samples",
    ) -> None:
        names = task_names(num_tasks)
        super().__init__(
            tasks={name: Task("mse") for name in names},
            rank_weighting=rank_weighting,
        )
        self.save_hyperparameters()
        self.lr = lr
        self.trunk = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, 1) for name in names})

    def forward_shared(self, inputs: Tensor) -> Tensor:
        return self.trunk(inputs)

    def forward_heads(self, shared: Tensor) -> dict[str, Tensor]:
        return {name: head(shared).squeeze(-1) for name, head in self.heads.items()}

    def forward(self, inputs: Tensor) -> dict[str, Tensor]:
        return self.forward_heads(self.forward_shared(inputs))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
