"""The intake between whatever receives messages and the merge worker, thread-safe.

    intake = Intake(IntakeLimits(...))
    intake.put("up", "van-12", payload)   # receiving thread; blocks while the intake is
                                          # full (backpressure), never grows past the bound
    intake.put_control("connected")       # the server's own items; never blocks
    items = intake.take(timeout=1.0, max_items=2000, max_bytes=256 * 1024)
    intake.close()                        # put refuses from now on; take drains, then None

Scheduling and bounds are `broker.server.intake.fair.FairQueue`'s. The producer is any
receiving thread (paho's network thread for MQTT; another transport could feed it the
same way). While `put` waits for room, the receiving thread reads nothing more from its
socket, so the broker holds what follows (in its queue for this client, under its own
limits) instead of this process.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from broker.server.intake.fair import FairQueue, IntakeLimits, Item, Verdict

_WAIT_SLICE_S = 0.5


@dataclass(frozen=True, slots=True)
class IntakeStats:
    """A snapshot of the intake for metrics and status."""

    bytes: int
    items: int
    devices: int
    peak_bytes: int
    max_bytes: int
    device_bytes: int
    queued: int
    refused: int
    refused_bytes: int
    dropped: int
    dropped_bytes: int
    waits: int
    """Times the receiving thread had to wait for room (backpressure)."""
    wait_seconds: float

    def to_json(self) -> dict[str, int | float]:
        return asdict(self)


class Intake:
    """A `FairQueue` behind one lock, with blocking `put` / `take` (module docstring)."""

    def __init__(self, limits: IntakeLimits) -> None:
        self._queue = FairQueue(limits)
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # an item arrived, or closed
        self._room = threading.Condition(self._lock)   # the worker took items, or closed
        self._closed = False
        self._waits = 0
        self._wait_s = 0.0

    @property
    def limits(self) -> IntakeLimits:
        return self._queue.limits

    def put(self, kind: str, device: str, payload: bytes, *, retained: bool = False,
            at: int = 0) -> Verdict:
        """Queue a device's message; waits while the intake is full. Never FULL."""
        with self._lock:
            waited = False
            started = 0.0
            try:
                while True:
                    if self._closed:
                        return Verdict.CLOSED
                    verdict = self._queue.offer(kind, device, payload, retained=retained,
                                                at=at)
                    if verdict is not Verdict.FULL:
                        if verdict is Verdict.QUEUED or verdict is Verdict.REFUSED:
                            self._ready.notify()
                        return verdict
                    if not waited:
                        waited, started = True, time.monotonic()
                        self._waits += 1
                    self._room.wait(_WAIT_SLICE_S)
            finally:
                if waited:
                    self._wait_s += time.monotonic() - started

    def put_control(self, kind: str) -> None:
        """Queue one of the server's own items (one of each kind waits at most)."""
        with self._lock:
            if not self._closed and self._queue.offer_control(kind):
                self._ready.notify()

    def take(self, timeout: float, *, max_items: int, max_bytes: int,
             window: float = 0.0) -> list[Item] | None:
        """Items in serving order, at most one turn of each device (one round): waits
        up to `timeout` for the first, then `window` more seconds for others; [] when
        nothing came, None once closed and empty."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not len(self._queue):
                if self._closed:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._ready.wait(left)
            out = self._queue.take(max_items, max_bytes, rounds=1)
            if window > 0:
                end = time.monotonic() + window
                size = sum(len(i.payload) for i in out)
                while len(out) < max_items and size < max_bytes and not self._closed:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    if not len(self._queue):
                        self._ready.wait(left)
                        continue
                    more = self._queue.take(max_items - len(out), max_bytes - size,
                                            rounds=1)
                    out.extend(more)
                    size += sum(len(i.payload) for i in more)
            self._room.notify_all()
            return out

    def close(self) -> None:
        """Stop taking: `put` returns CLOSED (also one waiting for room); `take` hands
        out what is still queued without waiting, then returns None."""
        with self._lock:
            self._closed = True
            self._ready.notify_all()
            self._room.notify_all()

    def stats(self) -> IntakeStats:
        with self._lock:
            q = self._queue
            c = q.counters
            return IntakeStats(
                bytes=q.queued_bytes, items=len(q), devices=q.devices(),
                peak_bytes=q.peak_bytes, max_bytes=q.limits.max_bytes,
                device_bytes=q.limits.device_bytes, queued=c.queued, refused=c.refused,
                refused_bytes=c.refused_bytes, dropped=c.dropped,
                dropped_bytes=c.dropped_bytes, waits=self._waits,
                wait_seconds=self._wait_s)


__all__ = ["Intake", "IntakeStats"]
