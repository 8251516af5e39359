"""Uncertainty weighting learns each task's noise variance.

Three linear regression tasks share their inputs; task ``k`` is ``y_k = x . b_k + sigma_k e`` with
noise standard deviations 0.1, 0.5 and 2 (variances 0.01, 0.25 and 4). A model that can reach
each task's noise floor, trained with :class:`~lightning_lossagg.callbacks.UncertaintyWeighting`,
ends with learned variances ``e^{s_k}`` close to ``sigma_k^2``: at the optimum of
``1/2 e^{-s} L + s/2`` the variance equals the task's loss, and the best achievable loss (mean
squared error) of a task is its noise variance.

    python examples/uncertainty_noise.py [--epochs 40]
"""

from __future__ import annotations

import argparse
import warnings

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_lossagg import MultiTaskMixin, Task
from lightning_lossagg.callbacks import UncertaintyWeighting
from lightning_lossagg.demos.penguins import TaskDataset

NOISE_STD = (0.1, 0.5, 2.0)


def linear_tasks(num_samples: int, in_features: int, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Inputs and ``{task_k: x . b_k + NOISE_STD[k] * e}``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, in_features, generator=generator)
    coefficients = torch.randn(in_features, len(NOISE_STD), generator=generator)
    noise = torch.tensor(NOISE_STD) * torch.randn(num_samples, len(NOISE_STD), generator=generator)
    targets = inputs @ coefficients + noise
    return inputs, {f"task_{k}": targets[:, k] for k in range(len(NOISE_STD))}


class LinearTasks(MultiTaskMixin, L.LightningModule):
    """A shared linear layer and a linear head per task (MSE each)."""

    def __init__(self, in_features: int = 8, hidden: int = 16, lr: float = 3e-3) -> None:
        super().__init__(tasks={f"task_{k}": Task("mse") for k in range(len(NOISE_STD))})
        self.lr = lr
        self.shared = nn.Linear(in_features, hidden)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, 1) for name in self.task_names})

    def forward(self, inputs: Tensor) -> dict[str, Tensor]:
        shared = self.shared(inputs)
        return {name: head(shared).squeeze(-1) for name, head in self.heads.items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=0.05, help="the log-variances' Adam lr")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # a tiny model: one thread is the fastest
    L.seed_everything(0, verbose=False)

    inputs, targets = linear_tasks(args.samples, in_features=8, seed=0)
    loader = DataLoader(TaskDataset(inputs, targets), batch_size=256, shuffle=True)
    model, weighting = LinearTasks(), UncertaintyWeighting(lr=args.lr)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        callbacks=[weighting],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)

    learned = weighting.state_to_log()["log_var"].exp()
    with torch.no_grad():
        predictions = model(inputs)
    print(f"{'task':>7} {'true variance':>14} {'final MSE':>10} {'learned e^s':>12} {'ratio':>6}")
    for index, (name, target) in enumerate(targets.items()):
        true_variance = NOISE_STD[index] ** 2
        mse = float((predictions[name] - target).square().mean())
        variance = float(learned[index])
        print(
            f"{name:>7} {true_variance:>14.4f} {mse:>10.4f} {variance:>12.4f} "
            f"{variance / true_variance:>6.3f}"
        )


if __name__ == "__main__":
    main()
