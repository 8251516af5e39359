"""Weighting methods and loggers, one Lightning callback per file."""

from lightning_lossagg.callbacks.loss_logger import LossLogger

__all__ = ["LossLogger"]
