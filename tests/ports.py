"""Ports for the servers tests start, safe when pytest-xdist runs several workers at once.

Binding to port 0 and closing (the usual trick) hands out a port from the kernel's
ephemeral range, the same range every outgoing connection takes its source port from: a
port free when chosen can be taken by any connection on the machine (another worker's
client, a daemon's) before the test's server binds it, and the server then fails to start.
With several workers the odds grow with the number of connections.

So the ports come from below the ephemeral range, where the kernel never picks one by
itself, and each xdist worker (PYTEST_XDIST_WORKER=gwN of PYTEST_XDIST_WORKER_COUNT) owns a
block of its own: no two workers can hand out the same port. Within its block a process
hands ports out in turn from a random start (two pytest sessions on one machine rarely
meet), skipping any that cannot be bound right now (a server of another session, a
listener still in TIME_WAIT). Where the ephemeral range starts too low to leave room,
it falls back to binding port 0.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

__all__ = ["LOWEST", "MIN_BLOCK", "PortAllocator", "free_port", "worker_block"]

LOWEST = 15000
"""The lowest port handed out: above the registered ports of common services."""
MIN_BLOCK = 200
"""A worker's block smaller than this is too small to be worth it (bind to 0 instead)."""
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def worker_block(ephemeral_low: int, worker: int, workers: int) -> range | None:
    """The ports worker `worker` (0-based) of `workers` may hand out: its share of
    [LOWEST, ephemeral_low), or None when that share is smaller than MIN_BLOCK."""
    if workers < 1 or not 0 <= worker < workers:
        raise ValueError(f"worker {worker} of {workers}")
    size = (ephemeral_low - LOWEST) // workers
    if size < MIN_BLOCK:
        return None
    start = LOWEST + worker * size
    return range(start, start + size)


def bindable(host: str, port: int) -> bool:
    """True when a listener could bind host:port right now (no SO_REUSEADDR, so a port
    still held in TIME_WAIT counts as taken: better skipped than fought over)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out the ports of one block in turn, from `start`, skipping unbindable ones."""

    def __init__(self, block: range, start: int) -> None:
        if len(block) == 0:
            raise ValueError("empty port block")
        self.block = block
        self._next = start % len(block)
        self._lock = threading.Lock()

    def take(self, host: str = "127.0.0.1") -> int:
        """The next port of the block that can be bound on `host` now; RuntimeError when
        none can (every port of the block is in use)."""
        with self._lock:
            for _ in range(len(self.block)):
                port = self.block[self._next]
                self._next = (self._next + 1) % len(self.block)
                if bindable(host, port):
                    return port
        raise RuntimeError(f"no free port in {self.block.start}-{self.block.stop - 1}: "
                           "stop the servers left running by earlier test runs")


def _ephemeral_low() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _this_worker() -> tuple[int, int]:
    """(index, count) of this xdist worker; (0, 1) outside xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    try:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        index = int(name[2:]) if name.startswith("gw") else 0
    except ValueError:
        return 0, 1
    if count < 1 or not 0 <= index < count:
        return 0, 1
    return index, count


_allocator: PortAllocator | None = None
_allocator_lock = threading.Lock()


def _shared_allocator() -> PortAllocator | None:
    global _allocator
    with _allocator_lock:
        if _allocator is None:
            block = worker_block(_ephemeral_low(), *_this_worker())
            if block is None:
                return None
            _allocator = PortAllocator(block, random.randrange(len(block)))
        return _allocator


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free now and that no other worker of this test run
    will hand out (see the module docstring)."""
    allocator = _shared_allocator()
    if allocator is not None:
        return allocator.take(host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
