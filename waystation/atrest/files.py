"""Small files next to an LMDB environment, written crash-safely (temp file, fsync,
rename, fsync of the directory): the wrapped data key and the sentinel of a conversion.

The sentinel (`PENDING`) exists while a store's encryption is being changed; the stores
refuse to open while it is there, so no process reads or writes a half-converted store.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import orjson

from waystation.atrest.rewrite import kill_point

PENDING = "atrest.pending"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (mode 0600 from the start): after a crash it holds the
    old or the new bytes, and no temporary file is left behind by a failed write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        kill_point("written")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
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
