"""Telling a full disk from other LMDB write errors (agent store and server store)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

LOW_SPACE_BYTES = 4 * 1024 * 1024
"""Below this much free space, an EIO from LMDB is taken as the disk being full."""


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """ENOSPC, or EIO on a nearly full filesystem: LMDB reports a short write (which a
    full filesystem causes) as EIO ("short write, filesystem full?" in its source)."""
    text = str(exc)
    if (getattr(exc, "errno", None) == errno.ENOSPC
            or os.strerror(errno.ENOSPC) in text or "ENOSPC" in text):
        return True
    if os.strerror(errno.EIO) in text or "EIO" in text:
        try:
            stat = os.statvfs(path)
        except OSError:
            return False
        return stat.f_bavail * stat.f_frsize < LOW_SPACE_BYTES
    return False


__all__ = ["LOW_SPACE_BYTES", "is_disk_full"]
