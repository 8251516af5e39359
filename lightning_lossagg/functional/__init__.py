"""Weighting methods without Lightning, one file per method.

Loss-based methods are torch functions of the task losses (and the method's state). Gradient-based
methods are functions ``gramian -> weights`` with ``gramian[i, j] = <g_i, g_j>``, solved on the
host in float64 with NumPy (SciPy for CAGrad) or in Python floats (DB-MTL's in torch); the shared
update is ``d = sum_i w_i g_i`` at the scale of LibMTL's default implementation (UPGrad:
torchjd's).
"""

from lightning_lossagg.functional.aligned_mtl import aligned_mtl
from lightning_lossagg.functional.cagrad import cagrad
from lightning_lossagg.functional.db_mtl import db_mtl, db_mtl_weights
from lightning_lossagg.functional.dwa import dwa
from lightning_lossagg.functional.famo import famo_logit_gradient, famo_weights
from lightning_lossagg.functional.gls import gls, gls_weights
from lightning_lossagg.functional.gradvac import gradvac
from lightning_lossagg.functional.imtl_g import imtl_g
from lightning_lossagg.functional.imtl_l import imtl_l_objective, imtl_l_weights
from lightning_lossagg.functional.loss_scaling import loss_scaling_weights, update_loss_levels
from lightning_lossagg.functional.mgda import mgda
from lightning_lossagg.functional.nash_mtl import nash_mtl
from lightning_lossagg.functional.pcgrad import pcgrad
from lightning_lossagg.functional.rlw import rlw
from lightning_lossagg.functional.uncertainty import uncertainty_objective, uncertainty_weights
from lightning_lossagg.functional.upgrad import upgrad

__all__ = [
    "aligned_mtl",
    "cagrad",
    "db_mtl",
    "db_mtl_weights",
    "dwa",
    "famo_logit_gradient",
    "famo_weights",
    "gls",
    "gls_weights",
    "gradvac",
    "imtl_g",
    "imtl_l_objective",
    "imtl_l_weights",
    "loss_scaling_weights",
    "mgda",
    "nash_mtl",
    "pcgrad",
    "rlw",
    "uncertainty_objective",
    "uncertainty_weights",
    "update_loss_levels",
    "upgrad",
]
