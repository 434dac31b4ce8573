"""The one way results and experiments put a file on disk.

:func:`write_atomic` writes under a temporary name in the target's own folder, flushes and
fsyncs the file, renames it over the final name and fsyncs the folder, so that the rename
itself survives a crash or a power cut. A reader sees the old file or the new one, never half
of one. Files that a library writes to a path of its own (safetensors, peft) are put in place
the same way with :func:`commit`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be
    opened, e.g. on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(path: Path) -> Path:
    """A fresh, unused name next to ``path`` (hidden, ends in ``.partial``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
        try:
            # 0o666 less the umask, as for any new file (mkstemp would make it 0o600).
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp


def commit(tmp: Path, path: Path) -> Path:
    """fsync the finished file ``tmp``, rename it to ``path`` and fsync the folder."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` crash-safely; return ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (null), also inside lists and dicts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def strict_json(value: Any, **options: Any) -> str:
    """Strict JSON of ``value``, non-finite numbers as null: every JSON a run writes."""
    return json.dumps(plain(value), allow_nan=False, **options)


def write_json(path: Path, payload: Any) -> Path:
    """Indented strict JSON with a final newline (a NaN or infinity is refused, not written as
    the bare token that JSON does not have)."""
    return write_atomic(path, json.dumps(payload, indent=1, allow_nan=False) + "\n")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """One row per dict; columns in order of first appearance; None as an empty cell."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    return write_atomic(path, buffer.getvalue())


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
