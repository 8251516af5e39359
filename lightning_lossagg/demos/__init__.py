"""Small datasets and models used by the configs, examples, tests and benchmarks."""

from lightning_lossagg.demos.penguins import PenguinsDataModule, PenguinsNet
from lightning_lossagg.demos.synthetic import MultiTaskMLP, SyntheticDataModule

__all__ = ["MultiTaskMLP", "PenguinsDataModule", "PenguinsNet", "SyntheticDataModule"]
