"""A TCP relay that behaves like a slow cellular link (GPRS/EDGE): each direction is
limited to `rate_bps` bits per second, every byte arrives `rtt_s / 2` after it was
sent, and the link can stall (carry nothing, both ways) for `stall_s` every `stall_every_s`.
The kernel here has no netem; this is the userspace equivalent, with the bytes each way
and the connections counted, so a test sees what a device spends on the link.

    with SlowRelay(broker_port, rate_bps=32_000, rtt_s=0.6) as relay:
        ... connect to relay.port; relay.bytes_up / relay.bytes_down / relay.connections

Each direction has a buffer of `buffer_bytes` (a modem's queue): once it is full the
relay stops reading, so the sender's TCP window closes as it would on the real link.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections import deque

from tests.tcp_relay import Relay, close_both

_CHUNK = 512
"""Bytes the relay reads at once: about a radio block's worth, so a big message trickles."""


class SlowRelay(Relay):
    """Relays 127.0.0.1:`port` to 127.0.0.1:`target_port` through a slow link."""

    def __init__(self, target_port: int, *, rate_bps: int = 32_000, rtt_s: float = 0.6,
                 stall_every_s: float = 0.0, stall_s: float = 0.0,
                 buffer_bytes: int = 32_768) -> None:
        self.rate = rate_bps / 8.0  # bytes per second
        self.delay = rtt_s / 2
        self.stall_every = stall_every_s
        self.stall = stall_s
        self.buffer = buffer_bytes
        self.bytes_up = 0
        """Bytes that crossed the link from the client (the device) to the target."""
        self.bytes_down = 0
        self._t0 = time.monotonic()
        super().__init__(("127.0.0.1", target_port), "slow-relay")

    def relay(self, client: socket.socket, upstream: socket.socket, number: int) -> None:
        for src, dst, up in ((client, upstream, True), (upstream, client, False)):
            _Direction(self, src, dst, up).start()

    def after_stall(self, t: float) -> float:
        """The first moment at or after `t` that the link is not stalled."""
        if self.stall_every <= 0 or self.stall <= 0:
            return t
        phase = (t - self._t0) % self.stall_every
        start = self.stall_every - self.stall  # the stall ends each period
        return t if phase < start else t + (self.stall_every - phase)

    def count(self, n: int, up: bool) -> None:
        with self._lock:
            if up:
                self.bytes_up += n
            else:
                self.bytes_down += n


class _Direction:
    """One way of one connection: a reader filling the link's buffer, a writer
    emptying it at the link's rate, each byte delivered its one-way delay later."""

    def __init__(self, relay: SlowRelay, src: socket.socket, dst: socket.socket,
                 up: bool) -> None:
        self.relay, self.src, self.dst, self.up = relay, src, dst, up
        self.queue: deque[tuple[float, bytes] | None] = deque()
        self.queued = 0
        self.cond = threading.Condition()

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while data := self.src.recv(_CHUNK):
                with self.cond:
                    self.cond.wait_for(lambda: self.queued < self.relay.buffer)
                    self.queue.append((time.monotonic(), data))
                    self.queued += len(data)
                    self.cond.notify_all()
        except OSError:
            pass
        with self.cond:
            self.queue.append(None)
            self.cond.notify_all()

    def _write(self) -> None:
        relay = self.relay
        clock = time.monotonic()  # when the link finishes sending what it took so far
        try:
            while True:
                with self.cond:
                    self.cond.wait_for(lambda: bool(self.queue))
                    item = self.queue.popleft()
                if item is None:
                    return
                # The link starts on a chunk when it is free and the chunk is there (not
                # when this thread got to it: it slept through the previous one's delay).
                arrived, data = item
                start = relay.after_stall(max(clock, arrived))
                clock = start + len(data) / relay.rate
                if relay.after_stall(clock) != clock:  # the stall hit mid-chunk
                    clock = relay.after_stall(clock) + len(data) / relay.rate
                deliver = clock + relay.delay
                if (pause := deliver - time.monotonic()) > 0:
                    time.sleep(pause)
                self.dst.sendall(data)
                relay.count(len(data), self.up)
                with self.cond:
                    self.queued -= len(data)
                    self.cond.notify_all()
        except OSError:
            pass
        finally:
            close_both(self.src, self.dst)


def transfer_s(nbytes: int, rate_bps: int) -> float:
    """Seconds `nbytes` take on a link of `rate_bps` bits per second (no overhead)."""
    return math.ceil(nbytes * 8) / rate_bps


__all__ = ["SlowRelay", "transfer_s"]
