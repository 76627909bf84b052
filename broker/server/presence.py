"""Presence: which devices are online, from their retained `status` (PROTOCOL.md §7.10).

A device is online iff its latest retained status says `"on": true`. The server keeps
this in memory (it rebuilds from the retained messages the broker replays when the
server subscribes) and mirrors it into the store for the operator CLI.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas import codec
from schemas.errors import ProtocolError
from schemas.wire import STATUS_TYPES, Status

MAX_STATUS_BYTES = 4096


@dataclass(frozen=True, slots=True)
class StatusReport:
    """A decoded status: online or not, plus what the device reported of its outbox."""

    on: bool
    pend: int = -1
    """Changes waiting in its outbox (-1: the status says nothing of it, e.g. a will)."""
    t: int | None = None
    """The device's time (ms) of the status, if it says."""


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
    return StatusReport(msg.on, -1 if msg.pend is None else msg.pend, msg.t)


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


__all__ = ["MAX_STATUS_BYTES", "Presence", "StatusReport", "parse_status"]
