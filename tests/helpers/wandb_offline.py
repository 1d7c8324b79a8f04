"""Read the history rows of an offline W&B run back from its ``run-*.wandb`` file.

The file is wandb's transaction log: a 7-byte header (``:W&B``, a 2-byte magic, a version byte), then
LevelDB-log framed records (32 KiB blocks; each chunk has a 4-byte checksum, a 2-byte little-endian length
and a type byte: 1 full, 2 first, 3 middle, 4 last) holding serialized ``wandb.proto`` ``Record`` messages.
wandb ships the protobuf classes but, since its Go core, no Python reader of the file, hence this one.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7


def _payloads(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", "not a wandb transaction log"
    out: list[bytes] = []
    pos, partial = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            out.append(partial + chunk)
            partial = b""
    return out


def read_history(run_dir: Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every history row of the offline run in ``run_dir`` (``.../wandb/offline-run-*``), values decoded.

    wandb's core process writes the file asynchronously, even after ``run.finish()`` returned: wait (up to
    ``timeout`` seconds) until the run's exit record is in it.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (file,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for payload in _payloads(file.read_bytes()):
            rec = pb.Record()
            rec.ParseFromString(payload)
            records.append(rec)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rows: list[dict[str, Any]] = []
    for rec in records:
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows
