"""Small files next to an LMDB environment, written crash-safely (temp file, fsync,
rename, fsync of the directory): the wrapped data key and the sentinel of a conversion.

The sentinel (`PENDING`) exists while a store's encryption is being changed; the stores
refuse to open while it is there, so no process reads or writes a half-converted store.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import orjson

from waystation.atrest.rewrite import kill_point

PENDING = "atrest.pending"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: after a crash it holds the old or the new bytes."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    kill_point("written")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def pending(env_dir: Path) -> str | None:
    """The operation (``encrypt`` / ``decrypt``) a conversion of this store was doing when
    it stopped, or None when no conversion is under way."""
    try:
        raw = (env_dir / PENDING).read_bytes()
    except FileNotFoundError:
        return None
    try:
        op = orjson.loads(raw).get("op")
    except (orjson.JSONDecodeError, AttributeError):
        op = None
    return op if op in ("encrypt", "decrypt") else "encrypt"


def mark_pending(env_dir: Path, op: str) -> None:
    write_atomic(env_dir / PENDING, orjson.dumps({"op": op}))


def clear_pending(env_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (env_dir / PENDING).unlink()
    fsync_dir(env_dir)


__all__ = ["PENDING", "clear_pending", "fsync_dir", "mark_pending", "pending", "write_atomic"]
