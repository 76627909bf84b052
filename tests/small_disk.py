"""A small filesystem of the test's own, to fill up: a tmpfs mounted under the test's
temporary directory (needs root and mount rights; the test is skipped, saying why,
where there are none).

    with small_disk(tmp_path / "tiny", "3m") as mnt:
        ...
        fill_disk(mnt / "filler")  # until the disk refuses another byte
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's notation: "3m", "16m") at `mnt`, unmounted after."""
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                            capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill_disk(path: Path) -> None:
    """Write zeros to `path` until its filesystem is full."""
    # Unbuffered: a buffered file would keep the part of the last write that did not
    # fit, and raise ENOSPC again when flushing it at close.
    with path.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError:
            pass


__all__ = ["fill_disk", "small_disk"]
