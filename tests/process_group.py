"""Run a function on every rank of a real 2-process group (CPU): a gloo group, or the ranks of a
Lightning DDP job; collect what each returns."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as distributed_c10d
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import _wrap as _torch_wrap


def run_rank_then_exit(fn: Callable, i: int, args: tuple, error_file: str) -> None:
    """torch's ``_wrap`` of a spawned process (it reports an error to the parent and exits 1), but
    a rank that finished leaves at once, without interpreter finalization: a gloo worker thread
    that frees its state while the interpreter finalizes can abort the process (torch's bug,
    pytorch/pytorch#190489), failing a test whose rank had done all its work. The ranks meet
    first, so none leaves while another still talks to it; the process group is destroyed."""
    finished = []

    def run(i: int, *args: Any) -> None:
        fn(i, *args)
        finished.append(True)

    _torch_wrap(run, i, args, error_file)
    if not finished:  # interrupted by the parent: nothing to hurry
        return
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _launch(worker: Callable, world_size: int, fn: Callable, args: tuple, *extra: Any) -> list:
    """Spawn ``worker(rank, world_size, out_dir, fn, args, *extra)`` on every rank and load what
    each rank saved."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            worker,
            args=(world_size, out_dir, fn, args, *extra),
            nprocs=world_size,
            start_method="spawn",
        )
        return [
            torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)
        ]


def _gloo_worker(rank: int, world_size: int, out_dir: str, fn: Callable, args: tuple) -> None:
    init_file = os.path.join(out_dir, "init")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        torch.save(fn(rank, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> list[Any]:
    """``[fn(rank, *args) for each rank]``, each run in its own process of one gloo group."""
    return _launch(_gloo_worker, world_size, fn, args)


def _lightning_worker(
    rank: int, world_size: int, out_dir: str, fn: Callable, args: tuple, port: int
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )
    torch.set_num_threads(1)  # the ranks share the machine's cores
    torch.save(fn(rank, *args), Path(out_dir) / f"rank{rank}.pt")


def rank_trainer(**settings: Any) -> L.Trainer:
    """A quiet float64 Trainer that joins :func:`run_on_lightning_ranks`' 2-rank job."""
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        precision="64-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **settings,
    )


def run_on_lightning_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> list[Any]:
    """``[fn(rank, *args) for each rank]``, each run in its own process set up as a rank of a
    Lightning DDP job (as ``ddp_spawn`` would launch it): a Trainer with ``strategy="ddp"`` inside
    ``fn`` joins the process group instead of spawning, so one launch serves many fits."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return _launch(_lightning_worker, world_size, fn, args, port)


class CollectiveCounter:
    """Counts every collective issued through ``torch.distributed`` while active: each public
    collective is wrapped where it can be looked up, on ``torch.distributed`` and on
    ``torch.distributed.distributed_c10d`` (a wrapper that calls the real collective: the count
    is of real calls; a collective built on another, such as ``broadcast_object_list``, counts
    both)."""

    NAMES = (
        "all_reduce",
        "all_reduce_coalesced",
        "all_gather",
        "all_gather_coalesced",
        "all_gather_into_tensor",
        "all_gather_object",
        "all_to_all",
        "all_to_all_single",
        "barrier",
        "broadcast",
        "broadcast_object_list",
        "gather",
        "gather_object",
        "monitored_barrier",
        "reduce",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "scatter",
        "scatter_object_list",
    )
    MODULES = (dist, distributed_c10d)

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._originals: list[tuple[Any, str, Callable]] = []

    def __enter__(self) -> CollectiveCounter:
        for module in self.MODULES:
            for name in self.NAMES:
                original = getattr(module, name, None)
                if original is None:
                    continue
                self._originals.append((module, name, original))

                def counted(*args, _name=name, _original=original, **kwargs):
                    self.calls.append(_name)
                    return _original(*args, **kwargs)

                setattr(module, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)


class CollectivesPerStep(L.Callback):
    """The ``torch.distributed`` collectives of each training batch, by name, its hooks included
    (placed after the weighting callback: its ``on_train_batch_end`` is counted, what follows is
    not)."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self._counter: CollectiveCounter | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._counter = CollectiveCounter().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert self._counter is not None
        self._counter.__exit__()
        self.calls.append(list(self._counter.calls))
