"""DB-MTL: log-loss gradients, smoothed by an EMA buffer and balanced to the largest norm."""

import numbers

import torch
from torch import Tensor

from lightning_lossagg.functional._qp import validated_gramian

# LibMTL differentiates log(L + 1e-8).
LOG_EPS = 1e-8


def _balancing_weights(norms: Tensor, eps: float) -> Tensor:
    """``max_j ||b_j|| / ||b_k||``, and 0 for a norm at the rounding noise ``eps`` (of the
    buffer's dtype) of the largest."""
    largest = norms.max()
    nonzero = norms > eps * largest
    return torch.where(nonzero, largest / torch.where(nonzero, norms, 1.0), 0.0)


def db_mtl_weights(buffer_gramian: Tensor) -> Tensor:
    r"""Weights of DB-MTL on the *buffered* gradients, from their Gramian.

    .. math:: \alpha_k = \frac{\max_j \lVert b_j \rVert}{\lVert b_k \rVert}, \qquad
        \lVert b_k \rVert = \sqrt{B_{kk}},

    so that :math:`d = \sum_k \alpha_k b_k` (see :func:`db_mtl`). A buffered gradient whose norm is
    below the dtype's machine epsilon times the largest gets weight 0 (LibMTL divides by
    :math:`\lVert b_k\rVert + 10^{-8}` instead); a zero Gramian gives zeros.

    Args:
        buffer_gramian: the [K, K] Gramian :math:`B_{ij} = \langle b_i, b_j \rangle` of the buffer.

    Returns:
        Weights of shape [K] (detached) with the Gramian's dtype and device.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.db_mtl import db_mtl_weights
        >>> db_mtl_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))
        tensor([1., 2.])
    """
    norms = validated_gramian(buffer_gramian).diagonal().clamp(min=0.0).sqrt()
    weights = _balancing_weights(norms, torch.finfo(buffer_gramian.dtype).eps)
    return weights.to(dtype=buffer_gramian.dtype, device=buffer_gramian.device)


def db_mtl_buffer_weights(buffer: Tensor) -> Tensor:
    """:func:`db_mtl_weights` from the [K, P] buffer itself, by the norms of its rows (K·P
    operations, where the Gramian takes K²·P), unchecked, on the buffer's device and in its dtype.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.db_mtl import db_mtl_buffer_weights
        >>> db_mtl_buffer_weights(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        tensor([1., 2.])
    """
    norms = torch.linalg.vector_norm(buffer.detach(), dim=1)
    return _balancing_weights(norms, torch.finfo(buffer.dtype).eps)


def db_mtl(
    grads: Tensor,
    buffer: Tensor | None,
    step: int,
    beta: float = 0.9,
    beta_sigma: float = 0.0,
    losses: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""The DB-MTL update and the new gradient buffer.

    With :math:`\hat g_k = \nabla \log L_k = g_k / L_k` the gradients of the log-losses and
    :math:`t` = ``step``:

    .. math::

        b_k \leftarrow \hat g_k + \frac{\beta}{t^{\sigma}} (b_k - \hat g_k), \qquad
        d = \sum_k \frac{\max_j \lVert b_j \rVert}{\lVert b_k \rVert}\, b_k.

    The update combines the *buffered* gradients, not the current ones, so it is not a weighting
    of this step's task gradients: apply ``d`` to the shared parameters directly (the weights on
    the buffer are :func:`db_mtl_weights` of ``new_buffer @ new_buffer.T``). In LibMTL the task
    heads are trained on the log-losses.

    Scale: LibMTL's (``DB_beta=0.9``, ``DB_beta_sigma=0``; the buffer starts at zero, without bias
    correction, so :math:`b = (1 - \beta)\hat g` after the first step): every buffered gradient is
    scaled to the largest norm. Computed in the dtype and on the device of ``grads``; only the
    check of ``losses`` synchronises with the host (``grads`` are not checked). A zero buffered
    gradient contributes nothing (see :func:`db_mtl_weights`); all-zero gradients give a zero
    update.

    Paper: Lin et al., "Dual-Balancing for Multi-Task Learning", 2023,
    https://arxiv.org/abs/2308.12029.

    Args:
        grads: [K, P] gradients of the log-losses :math:`\log L_k` on the shared parameters; or the
            gradients of the losses themselves if ``losses`` is given.
        buffer: the [K, P] buffer returned by the previous call (the state to keep), or ``None``
            at the first step (zeros).
        step: the number of this call, 1 at the first step (LibMTL's counter).
        beta: EMA rate of the buffer, in [0, 1).
        beta_sigma: decay exponent of the EMA rate, >= 0.
        losses: [K] non-negative task losses; when given, ``grads`` are divided by
            ``losses + 1e-8``, the gradient of LibMTL's :math:`\log(L_k + 10^{-8})`.

    Returns:
        The update ``d`` of shape [P] and the new buffer of shape [K, P], detached.

    Example:
        >>> import torch
        >>> from lightning_lossagg.functional.db_mtl import db_mtl
        >>> update, buffer = db_mtl(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), None, step=1)
        >>> update
        tensor([0.2000, 0.2000])
    """
    if grads.ndim != 2 or grads.shape[0] == 0:
        raise ValueError(f"grads must be a [K, P] matrix with K >= 1, got {tuple(grads.shape)}.")
    if buffer is not None and buffer.shape != grads.shape:
        raise ValueError(
            f"buffer has shape {tuple(buffer.shape)} but grads {tuple(grads.shape)}: pass the "
            "buffer returned by the previous call, or None at the first step."
        )
    if isinstance(step, bool) or not (isinstance(step, numbers.Integral) and step >= 1):
        raise ValueError(f"step must be an integer >= 1 (1 at the first call), got {step!r}.")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1) (LibMTL's default is 0.9), got {beta}.")
    if not beta_sigma >= 0.0:
        raise ValueError(f"beta_sigma must be >= 0 (LibMTL's default is 0), got {beta_sigma}.")
    if losses is not None and (losses.shape != (grads.shape[0],) or not bool((losses >= 0).all())):
        raise ValueError(f"losses must hold {grads.shape[0]} values >= 0, got {losses}.")
    new_buffer = db_mtl_buffer(grads, buffer, step, beta, beta_sigma, losses)
    return db_mtl_buffer_weights(new_buffer) @ new_buffer, new_buffer


def db_mtl_buffer(
    grads: Tensor,
    buffer: Tensor | None,
    step: int,
    beta: float,
    beta_sigma: float,
    losses: Tensor | None = None,
) -> Tensor:
    """The new buffer of :func:`db_mtl`, unchecked (for the callback, which checks ``losses`` on
    the host later and balances the buffer itself), on the device of ``grads``, detached."""
    grads = grads.detach()
    if losses is not None:
        grads = grads / (losses.detach().to(grads) + LOG_EPS).unsqueeze(1)
    previous = torch.zeros_like(grads) if buffer is None else buffer.detach().to(grads)
    return grads + (beta / step**beta_sigma) * (previous - grads)
