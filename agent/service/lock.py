"""One agent service per store: an exclusive `flock` on `service.lock` in the store's
directory, held for the life of `waystation agent run`, with the holder's PID inside.

The kernel drops the lock when the process dies, however it dies (kill -9 included), so
a stale lock file never blocks a restart. `service_pid(data_dir)` tells any process
whether the service runs (and its PID) without disturbing it; CLI and Python API writes
beside the running service do not take this lock and keep working.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from agent.errors import AgentError

SERVICE_LOCK = "service.lock"
SYNC_LOCK = "sync.lock"


class ServiceRunning(AgentError):
    """Another agent service already runs on this store."""

    exit_code = 3

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"PID {pid}" if pid else "another process"
        super().__init__(f"the agent service is already running on {path.parent} ({who}): "
                         "stop it first (systemctl stop, or kill that PID), or use another "
                         "data_dir")
        self.pid = pid


class FileLock:
    """An exclusive flock on a file; the holder's PID is written into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, wait_s: float = 0.0) -> bool:
        """Take the lock (waiting up to `wait_s`); False if another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)


def holder_pid(path: Path) -> int | None:
    """The PID of the process holding the lock at `path`, or None if nobody holds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(raw) if raw.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def service_pid(data_dir: Path) -> int | None:
    """The PID of the agent service running on the store at `data_dir`, or None.

    -1 means running but its PID could not be read (it is just starting)."""
    return holder_pid(Path(data_dir) / SERVICE_LOCK)


def acquire_service_lock(data_dir: Path) -> FileLock:
    lock = FileLock(Path(data_dir) / SERVICE_LOCK)
    if not lock.acquire():
        pid = service_pid(data_dir)
        raise ServiceRunning(lock.path, pid if pid and pid > 0 else None)
    return lock


__all__ = ["SERVICE_LOCK", "SYNC_LOCK", "FileLock", "ServiceRunning", "acquire_service_lock",
           "holder_pid", "service_pid"]
