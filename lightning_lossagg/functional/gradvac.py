"""GradVac: pull the cosine similarity of every pair of task gradients up to an adaptive target."""

import torch
from torch import Tensor

from lightning_lossagg.functional._qp import validated_gramian

# Floor of sqrt(1 - target^2): a target of +-1 asks for an infinite correction.
_MIN_SINE = 1e-8


def gradvac(
    gramian: Tensor,
    targets: Tensor | None = None,
    beta: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Weights of GradVac (whole-model variant) and the updated EMA of cosine targets.

    For each task :math:`i`, and each other task :math:`j` in random order, with
    :math:`\phi_{ij}` the cosine between the (already corrected) :math:`g_i^{PC}` and the
    original :math:`g_j`, and :math:`\hat\phi_{ij}` the target:

    .. math::

        \text{if } \phi_{ij} < \hat\phi_{ij}:\quad
        g_i^{PC} \mathrel{+}= \frac{\lVert g_i^{PC}\rVert
            \big(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2} - \phi_{ij}\sqrt{1-\hat\phi_{ij}^2}\big)}
            {\lVert g_j\rVert \sqrt{1-\hat\phi_{ij}^2}}\, g_j, \qquad
        \hat\phi_{ij} \leftarrow (1-\beta)\hat\phi_{ij} + \beta\phi_{ij},

    and :math:`d = \sum_i g_i^{PC}`. Each :math:`g_i^{PC}` is tracked as coefficients on the
    original gradients, so everything comes from the Gramian (as torchjd's ``GradVacWeighting``).

    Scale: LibMTL's and torchjd's (the sum of the corrected gradients: weights of 1 when nothing is
    corrected). They add ``1e-8`` to the denominators; here only zero gradients are special, so the
    weights do not change when all gradients are scaled by the same factor. The order of the tasks
    ``j`` is drawn with ``torch.randperm(K - 1, generator=generator)`` per task ``i``, as torchjd
    does: with ``generator=None`` and the same global seed both give the same result. The targets
    are updated at every visit, as in the paper and torchjd; LibMTL updates them only when it
    corrects. Only LibMTL's whole-model grouping (``GradVac_group_type=0``) is provided: one target
    per task pair.

    Degenerate input: a gradient whose squared norm is below ``K * 2.2e-16`` times the largest one
    counts as zero: it is neither corrected nor added, and its cosines count as 0 in the EMA (as
    with LibMTL's and torchjd's ``1e-8``). A zero Gramian and ``K = 1`` give weights of 1. A target
    of :math:`\pm 1` asks for an infinite correction; :math:`\sqrt{1 - \hat\phi^2}` is floored
    at ``1e-8``.

    Paper: Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models", ICLR 2021, https://arxiv.org/abs/2010.05874.

    Args:
        gramian: the [K, K] Gramian :math:`G_{ij} = \langle g_i, g_j \rangle` of the task gradients.
        targets: the [K, K] EMA :math:`\hat\phi` of cosine similarities returned by the previous
            call (the state to keep), or ``None`` for zeros at the first step.
        beta: EMA rate in [0, 1] (LibMTL's ``GradVac_beta``, default 0.5).
        generator: random generator for the task order; ``None`` uses the global one.

    Returns:
        The weights of shape [K] and the new targets of shape [K, K], both detached, with the
        Gramian's dtype and device.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.gradvac import gradvac
        >>> jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> weights, targets = gradvac(jacobian @ jacobian.T)
        >>> weights
        tensor([2.0000, 1.5000])
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (LibMTL's default is 0.5), got {beta}.")
    matrix = validated_gramian(gramian)
    num_tasks = matrix.shape[0]
    if targets is None:
        ema = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    else:
        ema = targets.detach().to(device="cpu", dtype=torch.float64).clone()
        if ema.shape != (num_tasks, num_tasks) or not (ema.abs() <= 1.0 + 1e-6).all():
            raise ValueError(
                f"targets must be the [{num_tasks}, {num_tasks}] matrix of cosines in [-1, 1] "
                "returned by the previous call of gradvac; pass None at the first step."
            )
        ema = ema.clamp(-1.0, 1.0)
    squared_norms = matrix.diagonal()
    nonzero = squared_norms > num_tasks * torch.finfo(torch.float64).eps * squared_norms.max()
    norms = squared_norms.clamp(min=0.0).sqrt()
    coefficients = torch.eye(num_tasks, dtype=torch.float64)
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        for index in torch.randperm(num_tasks - 1, generator=generator).tolist():
            j = others[index]
            dots = coefficients[i] @ matrix  # <g_i^PC, g_k> for every task k
            norm_i = (dots @ coefficients[i]).clamp(min=0.0).sqrt()
            cosine = torch.zeros((), dtype=torch.float64)
            if nonzero[i] and nonzero[j]:
                cosine = (dots[j] / (norm_i * norms[j])).clamp(-1.0, 1.0)
            target = ema[i, j]
            if nonzero[i] and nonzero[j] and cosine < target:
                target_sine = (1 - target**2).sqrt().clamp(min=_MIN_SINE)
                numerator = target * (1 - cosine**2).sqrt() - cosine * target_sine
                coefficients[i, j] += norm_i * numerator / (norms[j] * target_sine)
            ema[i, j] = (1 - beta) * target + beta * cosine
    weights = coefficients.sum(dim=0)
    options = {"dtype": gramian.dtype, "device": gramian.device}
    return weights.to(**options), ema.to(**options)
