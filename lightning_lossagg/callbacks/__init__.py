"""Weighting methods and loggers, one Lightning callback per file."""

from lightning_lossagg.callbacks.aligned_mtl import AlignedMTL
from lightning_lossagg.callbacks.cagrad import CAGrad
from lightning_lossagg.callbacks.db_mtl import DBMTL
from lightning_lossagg.callbacks.dwa import DWA
from lightning_lossagg.callbacks.famo import FAMO
from lightning_lossagg.callbacks.gls import GLS, NonPositiveLossError
from lightning_lossagg.callbacks.gradnorm import GradNorm
from lightning_lossagg.callbacks.gradvac import GradVac
from lightning_lossagg.callbacks.imtl_g import IMTLG
from lightning_lossagg.callbacks.imtl_l import IMTLL
from lightning_lossagg.callbacks.loss_balance_monitor import LossBalanceError, LossBalanceMonitor
from lightning_lossagg.callbacks.loss_logger import LossLogger
from lightning_lossagg.callbacks.loss_scaling import LossScaling
from lightning_lossagg.callbacks.mgda import MGDA
from lightning_lossagg.callbacks.nash_mtl import NashMTL
from lightning_lossagg.callbacks.pcgrad import PCGrad
from lightning_lossagg.callbacks.rlw import RLW
from lightning_lossagg.callbacks.uncertainty_weighting import UncertaintyWeighting
from lightning_lossagg.callbacks.upgrad import UPGrad

__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "GLS",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "RLW",
    "AlignedMTL",
    "CAGrad",
    "GradNorm",
    "GradVac",
    "LossBalanceError",
    "LossBalanceMonitor",
    "LossLogger",
    "LossScaling",
    "NashMTL",
    "NonPositiveLossError",
    "PCGrad",
    "UPGrad",
    "UncertaintyWeighting",
]
