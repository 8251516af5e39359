"""Each method's small problems in Python floats against the same method in NumPy.

Up to ``PYTHON_TASKS_UP_TO`` tasks the solvers run in Python floats (``functional._small``),
beyond it in NumPy. Moving the bound in a method's module switches one path for the other on the
same Gramian: both must give the same weights, on random and degenerate gradients alike.
"""

import sys

import numpy as np
import pytest
import torch
from torch import Tensor

from lightning_lossagg import functional
from lightning_lossagg.functional.cagrad import cagrad_weights
from tests.functional._jacobians import as_params, degenerate_jacobians, random_jacobians

# The modules that read the bound (the package re-exports functions of the same names).
MODULES = ["_qp", "mgda", "pcgrad", "imtl_g", "aligned_mtl", "cagrad"]
CASES = as_params(
    random_jacobians(num_tasks=[3, 5, 8, 11])
    + [case for case in degenerate_jacobians() if case[1].shape[0] >= 3]
)


def _weights_both_ways(
    monkeypatch: pytest.MonkeyPatch, method: str, gramian: Tensor
) -> tuple[np.ndarray, np.ndarray]:
    results = []
    for bound in (0, 100):  # NumPy for every K, then Python floats for every K
        for name in MODULES:
            module = sys.modules[f"lightning_lossagg.functional.{name}"]
            monkeypatch.setattr(module, "PYTHON_TASKS_UP_TO", bound)
        if method == "pcgrad":
            weights = functional.pcgrad(gramian, torch.Generator().manual_seed(0))
        elif method == "cagrad":  # from the support a training step would guess
            matrix = gramian.numpy()
            _, support = cagrad_weights(matrix, 0.5)
            weights = torch.from_numpy(cagrad_weights(matrix, 0.5, support=support)[0])
        else:
            weights = getattr(functional, method)(gramian)
        results.append(weights.numpy())
    return results[0], results[1]


@pytest.mark.parametrize("method", ["mgda", "upgrad", "pcgrad", "imtl_g", "aligned_mtl", "cagrad"])
@pytest.mark.parametrize("jacobian", CASES)
def test_python_floats_give_numpys_weights(
    monkeypatch: pytest.MonkeyPatch, method: str, jacobian: Tensor
) -> None:
    in_numpy, in_floats = _weights_both_ways(monkeypatch, method, jacobian @ jacobian.T)
    scale = np.abs(in_numpy).max()
    np.testing.assert_allclose(in_floats, in_numpy, rtol=1e-7, atol=1e-9 * scale)
