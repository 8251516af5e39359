"""The Palmer penguins (344 real birds) as a three-task problem, and a small multi-task MLP.

Tasks: ``species`` (3 classes, cross-entropy), ``sex`` (binary, BCE with logits; 9 of the 342
birds kept have no recorded sex: their target is NaN and they are masked) and ``body_mass`` (MSE on
standardised grams). Features: bill length and depth, flipper length, island (one-hot). Features
and body mass are standardised with the training split's statistics only.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_lossagg.aggregation import RankWeighting
from lightning_lossagg.mixin import MultiTaskMixin
from lightning_lossagg.padding import PaddedForRanks
from lightning_lossagg.tasks import Task

SPECIES = ("Adelie", "Chinstrap", "Gentoo")
ISLANDS = ("Biscoe", "Dream", "Torgersen")
MEASUREMENTS = ("bill_length_mm", "bill_depth_mm", "flipper_length_mm")
NUM_FEATURES = len(MEASUREMENTS) + len(ISLANDS)


class TaskDataset(Dataset):
    """``(features[i], {task: targets[task][i]})`` pairs from whole tensors."""

    def __init__(self, features: Tensor, targets: dict[str, Tensor]) -> None:
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        return self.features[index], {name: t[index] for name, t in self.targets.items()}


def load_penguins_tensors() -> tuple[Tensor, dict[str, Tensor]]:
    """Raw features and targets of every penguin with measurements (342 of 344)."""
    from palmerpenguins import load_penguins

    frame = load_penguins().dropna(subset=[*MEASUREMENTS, "body_mass_g"]).reset_index(drop=True)
    measurements = torch.tensor(frame[list(MEASUREMENTS)].to_numpy(), dtype=torch.float32)
    island = torch.tensor(frame["island"].map(ISLANDS.index).to_numpy())
    features = torch.cat([measurements, nn.functional.one_hot(island, len(ISLANDS)).float()], 1)
    sex = frame["sex"].map({"female": 0.0, "male": 1.0}).astype(float).to_numpy()
    targets = {
        "species": torch.tensor(frame["species"].map(SPECIES.index).to_numpy()),
        "sex": torch.tensor(sex, dtype=torch.float32),
        "body_mass": torch.tensor(frame["body_mass_g"].to_numpy(), dtype=torch.float32),
    }
    return features, targets


class PenguinsDataModule(L.LightningDataModule):
    """Penguins split 70/15/15 with a fixed seed; standardised with training statistics. Under
    DDP the validation and test sets are padded with samples that count for nothing
    (:class:`~lightning_lossagg.PaddedForRanks`): their figures are exact.

    Args:
        batch_size: samples per batch.
        seed: the split's seed.
        num_workers: data loader workers.
    """

    def __init__(self, batch_size: int = 32, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.splits: dict[str, TaskDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        features, targets = load_penguins_tensors()
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(self.seed))
        n_train, n_val = int(0.7 * len(order)), int(0.15 * len(order))
        parts = {
            "train": order[:n_train],
            "val": order[n_train : n_train + n_val],
            "test": order[n_train + n_val :],
        }
        train = parts["train"]
        mean, std = features[train, :3].mean(0), features[train, :3].std(0)
        features = torch.cat([(features[:, :3] - mean) / std, features[:, 3:]], 1)
        mass = targets["body_mass"]
        targets["body_mass"] = (mass - mass[train].mean()) / mass[train].std()
        self.splits = {
            split: TaskDataset(features[rows], {k: t[rows] for k, t in targets.items()})
            for split, rows in parts.items()
        }

    def _loader(self, split: str, shuffle: bool = False, evaluate: bool = False) -> DataLoader:
        data: Dataset = self.splits[split]
        num_ranks = self.trainer.world_size if self.trainer is not None else 1
        if evaluate and num_ranks > 1:
            # Under DDP the sampler would repeat a few penguins: exact figures instead.
            data = PaddedForRanks(data, num_ranks)
        return DataLoader(  # keywords: Lightning rebuilds the predict loader with them
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", evaluate=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", evaluate=True)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


class PenguinsNet(MultiTaskMixin, L.LightningModule):
    """A shared trunk and one linear head per penguin task.

    Args:
        hidden: width of the shared trunk.
        lr: Adam's learning rate.
        weights: static task weights (``Task.weight``), e.g. ``{"body_mass": 2.0}``.
        rank_weighting: see :class:`~lightning_lossagg.MultiTaskMixin`.
    """

    def __init__(
        self,
        hidden: int = 64,
        lr: float = 1e-2,
        weights: dict[str, float] | None = None,
        rank_weighting: RankWeighting = "samples",
    ) -> None:
        weights = weights or {}
        losses = {"species": "cross_entropy", "sex": "bce_with_logits", "body_mass": "mse"}
        unknown = sorted(set(weights) - set(losses))
        if unknown:
            raise ValueError(f"Unknown task(s) {unknown} in weights; tasks are {list(losses)}.")
        tasks = {}
        for name, loss in losses.items():
            try:
                tasks[name] = Task(loss, weight=weights.get(name, 1.0))
            except (TypeError, ValueError) as error:
                raise type(error)(f"weights[{name!r}]: {error}") from None
        super().__init__(tasks=tasks, rank_weighting=rank_weighting)
        self.save_hyperparameters()
        self.lr = lr
        self.trunk = nn.Sequential(
            nn.Linear(NUM_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        outputs = {"species": 3, "sex": 1, "body_mass": 1}
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in outputs.items()})

    def forward_shared(self, features: Tensor) -> Tensor:
        return self.trunk(features)

    def forward_heads(self, shared: Tensor) -> dict[str, Tensor]:
        return {
            "species": self.heads["species"](shared),
            "sex": self.heads["sex"](shared).squeeze(-1),
            "body_mass": self.heads["body_mass"](shared).squeeze(-1),
        }

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        return self.forward_heads(self.forward_shared(features))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
