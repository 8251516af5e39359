"""The one place that knows how figures cross ranks, and between the host and the device.

Everything the library reduces goes through :func:`all_reduce_sum` (or :func:`all_reduce_max`),
which does nothing at all on a single process, so counting its calls counts the library's
collectives. :class:`HostCopy` and
:func:`to_device` move small figures without stalling the device.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

# A summed set of ranks, exact in float64 (integers below 2**53): ranks 0 to 40 each set their
# bit; the 12 bits above count the ranks from 41 on (up to 4095 of them).
_NAMED_RANKS = 41
_AVAILABLE = dist.is_available()  # whether this build of torch has torch.distributed


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return _AVAILABLE and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place; a no-op on a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: Tensor) -> Tensor:
    """The maximum of ``tensor`` over all ranks, in place; a no-op on a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def rank_bit(rank_index: int) -> float:
    """The value a rank contributes to a summed set of ranks (exact in float64, in any order)."""
    return float(2 ** min(rank_index, _NAMED_RANKS))


def ranks_in_bitset(bitset: float) -> str:
    """The ranks a summed set names, as text: "0, 3", or "0, 3, 2 ranks from 41 on"."""
    bits = int(bitset)
    ranks = [str(index) for index in range(_NAMED_RANKS) if bits >> index & 1]
    beyond = bits >> _NAMED_RANKS
    if beyond:
        ranks.append(f"{beyond} rank{'s' * (beyond > 1)} from {_NAMED_RANKS} on")
    return ", ".join(ranks)


def stats_dtype(device: torch.device) -> torch.dtype:
    """float64 for the packed statistics (exact counts and rank bits) where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


class HostCopy:
    """A tensor copied to the host without stalling the device.

    On CUDA the copy is queued right away and :meth:`get` waits only for it, not for the work
    queued after it (the backward pass): reading a flag costs no pipeline stall.
    """

    def __init__(self, tensor: Tensor) -> None:
        if tensor.requires_grad:
            tensor = tensor.detach()
        self._event: torch.cuda.Event | None = None
        if tensor.is_cuda:
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor if tensor.is_cpu else tensor.cpu()

    def get(self) -> Tensor:
        """The host tensor, once its copy is complete."""
        if self._event is not None:
            self._event.synchronize()
        return self._host


# Devices on which a method reads a step's K figures as Python floats and weighs with them: on
# the CPU that costs nothing, and a dozen operations on K-element tensors several times more.
PYTHON_FLOAT_DEVICES = frozenset({"cpu"})


def host_list_later(tensor: Tensor) -> Callable[[], list[float]]:
    """A function returning ``tensor`` as a host list: on CUDA from a :class:`HostCopy` queued
    now, elsewhere read when called."""
    if tensor.is_cuda:
        copy = HostCopy(tensor)
        return lambda: copy.get().tolist()
    return tensor.tolist


def to_device(
    values: list[float] | np.ndarray | Tensor, like: Tensor, dtype: torch.dtype | None = None
) -> Tensor:
    """Host ``values`` (floats, a NumPy array or a CPU tensor) as a tensor on ``like``'s device,
    in ``dtype`` (default: ``like``'s, at least float32). On CUDA the copy is queued from pinned
    memory: the host does not wait for the work queued before it (a copy from pageable memory
    would)."""
    dtype = dtype or torch.promote_types(like.dtype, torch.float32)
    if like.device.type == "cuda":
        return _host_tensor(values, dtype).pin_memory().to(like.device, non_blocking=True)
    if like.device.type == "cpu":
        return _host_tensor(values, dtype)
    return torch.as_tensor(values, dtype=dtype, device=like.device)


# NumPy makes a host tensor of a few floats in a third of the time torch.as_tensor takes.
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _host_tensor(values: list[float] | np.ndarray | Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` as a new CPU tensor in ``dtype`` (a CPU tensor in ``dtype`` as it is)."""
    numpy_dtype = _NUMPY_DTYPES.get(dtype)
    if numpy_dtype is None or isinstance(values, Tensor):
        return torch.as_tensor(values, dtype=dtype, device="cpu")
    return torch.from_numpy(np.array(values, dtype=numpy_dtype))
