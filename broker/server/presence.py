"""Presence: which devices are online, from their retained `status` (PROTOCOL.md §7.10).

A device is online iff its latest retained status says `"on": true`. The server keeps
this in memory (it rebuilds from the retained messages the broker replays when the
server subscribes) and mirrors it into the store for the operator CLI.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from schemas import codec
from schemas.errors import ProtocolError
from schemas.wire import STATUS_TYPES, Status

MAX_STATUS_BYTES = 4096
LOG_EVERY_MS = 1000
"""At most one `presence` log event per device per this many ms (`PresenceLog`)."""

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class StatusReport:
    """A decoded status: online or not, plus what the device reported of its outbox."""

    on: bool
    pend: int = -1
    """Changes waiting in its outbox (-1: the status says nothing of it, e.g. a will)."""
    t: int | None = None
    """The device's time (ms) of the status, if it says."""
    old: int | None = None
    """Age (ms) of its oldest waiting change, if it says."""
    dl: int | None = None
    """Its dead letters (changes refused for good, waiting for a person), if it says."""


def parse_status(topic_device: str, payload: bytes) -> StatusReport:
    """Decode a status payload; ProtocolError (with a rejection code) if it is not valid.

    An empty payload (a cleared retained message) reads as offline.
    """
    if not payload:
        return StatusReport(False)
    msg = codec.decode(payload, allowed=STATUS_TYPES, max_payload=MAX_STATUS_BYTES)
    assert isinstance(msg, Status)
    if msg.dev != topic_device:
        raise ProtocolError(codec.WRONG_DEVICE, f"status for {msg.dev!r} published on the "
                                                f"status topic of {topic_device!r}")
    return StatusReport(msg.on, -1 if msg.pend is None else msg.pend, msg.t, msg.old, msg.dl)


def status_time(t: int | None, now: int, enrolled_ms: int, max_skew_ms: int) -> int:
    """When a status was reported, for PENDING's age: the device's time `t` (a retained
    status replayed to a restarted server is as old as it says), never later than the
    server's `now`, and `now` when the status has no `t` or dates itself before the
    device was enrolled by more than the clock skew the server tolerates
    (`merge.max_skew_ms`): such a clock is wrong (a device without a real-time clock
    reads 1970 until it has NTP), and "5 (20,000 days ago)" would be nonsense."""
    if t is None or t < enrolled_ms - max_skew_ms:
        return now
    return min(now, t)


class PresenceLog:
    """The `presence` log events: a device's change is logged at once unless one of its
    changes was logged within `every_ms`; then it is held, and the tick (`flush`) logs
    the device's latest state with `unlogged`, the changes not logged one by one. A
    device flapping its status as fast as it can costs the log one event per second,
    not one per message (a flood of log lines would trip journald's rate limit, which
    drops every other event of the server too)."""

    def __init__(self, every_ms: int = LOG_EVERY_MS) -> None:
        self.every_ms = every_ms
        self._logged: dict[str, int] = {}
        """Device -> when its last event was logged (within `every_ms` only)."""
        self._held: dict[str, tuple[bool, int]] = {}
        """Device -> (its latest state, changes held since its last event)."""

    def changed(self, dev: str, online: bool, now: int) -> None:
        """`dev`'s presence changed to `online` at `now`."""
        last = self._logged.get(dev)
        if last is not None and now - last < self.every_ms:
            held = self._held.get(dev, (online, 0))[1]
            self._held[dev] = (online, held + 1)
            return
        self._emit(dev, online, now)

    def flush(self, now: int) -> None:
        """Log the held changes whose device's last event is `every_ms` old (the tick);
        forget what no longer matters, so memory follows the devices changing now."""
        for dev, (online, _) in list(self._held.items()):
            if now - self._logged.get(dev, 0) >= self.every_ms:
                self._emit(dev, online, now)
        for dev, at in list(self._logged.items()):
            if now - at >= self.every_ms and dev not in self._held:
                del self._logged[dev]

    def _emit(self, dev: str, online: bool, now: int) -> None:
        held = self._held.pop(dev, None)
        self._logged[dev] = now
        if held is None:
            log.info("presence", dev=dev, online=online)
        else:
            log.info("presence", dev=dev, online=online, unlogged=held[1])


class Presence:
    """The set of online devices."""

    def __init__(self) -> None:
        self._online: set[str] = set()

    def set(self, dev: str, on: bool) -> bool:
        """Record a device's presence; True when it changed."""
        if on == (dev in self._online):
            return False
        if on:
            self._online.add(dev)
        else:
            self._online.discard(dev)
        return True

    def reset(self) -> frozenset[str]:
        """Forget every device's presence (the broker connection was re-established: the
        retained statuses it replays rebuild it); returns who was online."""
        was = frozenset(self._online)
        self._online.clear()
        return was

    def is_online(self, dev: str) -> bool:
        return dev in self._online

    def online(self) -> frozenset[str]:
        return frozenset(self._online)


__all__ = ["LOG_EVERY_MS", "MAX_STATUS_BYTES", "Presence", "PresenceLog", "StatusReport",
           "parse_status", "status_time"]
