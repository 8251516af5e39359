"""Read an offline W&B run file (``run-<id>.wandb``) back, record by record.

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB
blocks of chunks, each with a 7-byte header (CRC32, length, type: full/first/middle/last), whose
payloads join into serialised ``wandb.proto.wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    records, pending, offset = [], b"", 7
    while offset + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK - offset % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:
            offset += left_in_block
            continue
        _, length, kind = _CHUNK_HEADER.unpack_from(data, offset)
        if offset + _CHUNK_HEADER.size + length > len(data):
            break  # the service is still writing this chunk: the records before it are whole
        payload = data[offset + _CHUNK_HEADER.size : offset + _CHUNK_HEADER.size + length]
        offset += _CHUNK_HEADER.size + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (_FULL, _FIRST) else pending + payload
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


@dataclass
class OfflineRun:
    """What an offline run logged: history rows, config, summary, defined metrics."""

    history: list[dict[str, object]] = field(default_factory=list)
    config: dict[str, object] = field(default_factory=dict)
    defined_metrics: dict[str, object] = field(default_factory=dict)
    summary: dict[str, object] = field(default_factory=dict)  # the run's, as W&B shows it
    kinds: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    files_dir: Path | None = None

    def rows_with(self, key: str) -> list[dict[str, object]]:
        """The history rows that hold ``key``, in order."""
        return [row for row in self.history if key in row]

    def table(self, key: str) -> dict[str, list]:
        """The last ``wandb.Table`` logged under ``key``: ``{"columns": [...], "data": [...]}``."""
        assert self.files_dir is not None
        path = self.rows_with(f"{key}/path")[-1][f"{key}/path"]
        return json.loads((self.files_dir / str(path)).read_text())

    @property
    def history_keys(self) -> set[str]:
        return {key for row in self.history for key in row}


def read_offline_run(run_dir: Path, wait_for_exit_s: float = 0.0) -> OfflineRun:
    """Parse the single ``*.wandb`` file under ``run_dir`` (searched recursively).

    W&B's service writes the file in the background: after ``run.finish()`` pass
    ``wait_for_exit_s`` to wait (up to that long) until the run's exit record is on disk.
    """
    files = sorted(Path(run_dir).rglob("*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .wandb file under {run_dir}, found {files}")
    records = read_records(files[0])
    deadline = time.monotonic() + wait_for_exit_s
    while time.monotonic() < deadline and not any(r.HasField("exit") for r in records):
        time.sleep(0.1)
        records = read_records(files[0])
    run = OfflineRun()
    for record in records:
        kind = record.WhichOneof("record_type")
        run.kinds[kind] += 1
        if kind == "history":
            run.history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
        elif kind == "config":
            for item in record.config.update:
                run.config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "metric":
            run.defined_metrics[record.metric.name or record.metric.glob_name] = record.metric
    run.files_dir = files[0].parent / "files"
    return run
