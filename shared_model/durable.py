"""Durable writes: how the project puts a file on the disk.

:func:`write_atomic` writes through a fsynced temporary file and a rename, then
flushes the folder: a crash leaves the old file or the new one, never half of
either. The checkpoint folder, the coordinator's run folder, the planning
record, a site's privacy ledger and its preprocessed-volume store all write
through it. :func:`json_bytes` is the project's JSON encoding of a record, and
:func:`read_record` reads one back.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from shared_model.errors import ConfigError


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and a rename,
    then flush the folder (a rename is durable only after that)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename or a new file in it is durable only
    after this); a no-op on a system whose folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_bytes(value: Any) -> bytes:
    """Indented JSON with a final newline (numpy scalars as floats)."""
    return (json.dumps(value, indent=2, default=float) + "\n").encode()


def read_record(path: Path, what: str, hint: str = "") -> dict[str, Any]:
    """The JSON object in ``path``; ConfigError naming the file when it is
    missing, unreadable or not ``what`` (``hint``: what to do then)."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e}){tail}") from e
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: not {what}{tail}")
    return record
