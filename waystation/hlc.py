"""Hybrid logical clock stamps (docs/PROTOCOL.md §4).

A stamp is `(wall, counter, node)`: the writer's wall clock in milliseconds since the
Unix epoch, a counter (0-65535) ordering events within one millisecond, and the
writer's node id (its device id, or `~server` for the server operator). Stamps are
totally ordered by that tuple, so `Stamp` is a NamedTuple and compares natively.

Encodings: the *time part* is 16 lowercase hex digits (12 for the wall clock, 4 for the
counter); the *full* form appends `:` and the node. Because the time part has a fixed
width and `:` sorts below every character of a node id, string order of full stamps
equals tuple order.

This module does no I/O: the wall clock is injected (`now_ms`), so the clock is
deterministic under test and its state can be persisted by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from waystation.errors import ClockSkewError

SERVER_NODE = "~server"
"""The node of writes made by the server's operator (e.g. resolving a conflict)."""

MAX_WALL = (1 << 48) - 1
"""Largest wall clock value the 12-hex-digit time part can carry (year 10889)."""
MAX_COUNTER = 0xFFFF
"""Largest counter value (4 hex digits); one more advances the wall clock by 1 ms."""

_TIME_PART_RE = re.compile(r"[0-9a-f]{16}")
_NODE_RE = re.compile(r"~server|[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VALID_NODES: set[str] = set()
"""Nodes already checked (an agent makes a Clock per write transaction)."""


class Stamp(NamedTuple):
    """One hybrid-logical-clock stamp; ordered by `(wall, counter, node)`."""

    wall: int
    counter: int
    node: str

    def time_part(self) -> str:
        """The 16-hex-digit time part: 12 digits of wall clock, 4 of counter."""
        return f"{self.wall:012x}{self.counter:04x}"

    def encode(self) -> str:
        """The full form `<16 hex>:<node>`, e.g. `0192f2a4c9b10003:van-12`."""
        return f"{self.wall:012x}{self.counter:04x}:{self.node}"

    @classmethod
    def parse(cls, text: str) -> Stamp:
        """Parse a full stamp `<16 hex>:<node>`; ValueError if it is not one."""
        if not isinstance(text, str):
            raise ValueError(f"a stamp must be a string, got {type(text).__name__}")
        tp, sep, node = text.partition(":")
        if not sep:
            raise ValueError(f"{text!r} is not a stamp: expected '<16 hex digits>:<node>'")
        return cls.from_time_part(tp, node)

    @classmethod
    def from_time_part(cls, tp: str, node: str) -> Stamp:
        """A stamp from a change's time part `h` and its writer's node id."""
        if not isinstance(tp, str) or not _TIME_PART_RE.fullmatch(tp):
            raise ValueError(f"{tp!r} is not a stamp time part: expected 16 lowercase hex digits")
        if not isinstance(node, str) or not _NODE_RE.fullmatch(node):
            raise ValueError(f"{node!r} is not a valid stamp node (a device id or '~server')")
        return cls(int(tp[:12], 16), int(tp[12:], 16), node)


def parse_time_part(tp: str) -> tuple[int, int]:
    """`(wall, counter)` of a 16-hex-digit time part; ValueError if malformed."""
    if not isinstance(tp, str) or not _TIME_PART_RE.fullmatch(tp):
        raise ValueError(f"{tp!r} is not a stamp time part: expected 16 lowercase hex digits")
    return int(tp[:12], 16), int(tp[12:], 16)


class Clock:
    """A node's hybrid logical clock.

    `now_ms` is the injected wall clock (milliseconds since the epoch). The state
    (`wall`, `counter` of the last stamp issued or observed) must be persisted by the
    caller together with every write it stamps, and restored with `restore()` after a
    restart, so that stamps only ever increase (PROTOCOL.md §4).
    """

    __slots__ = ("_counter", "_now_ms", "_wall", "node")

    def __init__(self, node: str, now_ms: Callable[[], int], wall: int = 0,
                 counter: int = 0) -> None:
        if node not in _VALID_NODES:
            if not _NODE_RE.fullmatch(node):
                raise ValueError(f"{node!r} is not a valid clock node (a device id or "
                                 "'~server')")
            if type(node) is str and len(_VALID_NODES) < 1024:
                _VALID_NODES.add(node)
        self.node = node
        self._now_ms = now_ms
        self._wall = 0
        self._counter = 0
        self.restore(wall, counter)

    @property
    def state(self) -> tuple[int, int]:
        """`(wall, counter)` of the last stamp; persist it with each stamped write."""
        return self._wall, self._counter

    @property
    def last(self) -> Stamp:
        """The last stamp issued or observed, as this node's stamp."""
        return Stamp(self._wall, self._counter, self.node)

    def restore(self, wall: int, counter: int) -> None:
        """Set the persisted state (after a restart). Never moves the clock backwards."""
        if not 0 <= wall <= MAX_WALL or not 0 <= counter <= MAX_COUNTER:
            raise ValueError(f"clock state ({wall}, {counter}) is out of range")
        if (wall, counter) > (self._wall, self._counter):
            self._wall, self._counter = wall, counter

    def tick(self) -> Stamp:
        """A new stamp for a local event: later than every stamp issued or observed."""
        last_w = self._wall
        wall = max(last_w, self._now_ms())
        if wall == last_w:
            counter = self._counter + 1
            if counter > MAX_COUNTER:
                wall, counter = last_w + 1, 0
        else:
            counter = 0
        return self._set(wall, counter)

    def observe(self, remote: Stamp) -> Stamp:
        """Merge a received stamp; the result is later than it and than every own stamp."""
        last_w, last_c = self._wall, self._counter
        r_w, r_c = remote.wall, remote.counter
        wall = max(last_w, r_w, self._now_ms())
        if wall == last_w and wall == r_w:
            counter = max(last_c, r_c) + 1
        elif wall == last_w:
            counter = last_c + 1
        elif wall == r_w:
            counter = r_c + 1
        else:
            counter = 0
        if counter > MAX_COUNTER:
            wall, counter = wall + 1, 0
        return self._set(wall, counter)

    def _set(self, wall: int, counter: int) -> Stamp:
        if wall > MAX_WALL:
            raise ValueError("hybrid logical clock overflowed its 48-bit wall clock")
        self._wall, self._counter = wall, counter
        return Stamp(wall, counter, self.node)


def ahead_ms(stamp: Stamp, now_ms: int) -> int:
    """How many milliseconds `stamp` lies ahead of `now_ms` (negative: behind)."""
    return stamp.wall - now_ms


def too_far_ahead(stamp: Stamp, max_skew_ms: int, now_ms: int) -> bool:
    """True when `stamp` is more than `max_skew_ms` ahead of `now_ms` (§4 skew bound)."""
    return stamp.wall - now_ms > max_skew_ms


def check_skew(stamp: Stamp, max_skew_ms: int, now_ms: int) -> None:
    """Raise ClockSkewError if `stamp` is more than `max_skew_ms` ahead of `now_ms`."""
    ahead = stamp.wall - now_ms
    if ahead > max_skew_ms:
        who = "the server operator" if stamp.node == SERVER_NODE else stamp.node
        raise ClockSkewError(
            f"stamp from {who} is {_seconds(ahead)} s ahead of this server's clock "
            f"(limit {_seconds(max_skew_ms)} s): fix the device's time sync")


def _seconds(ms: int) -> str:
    if ms % 1000 == 0 or ms >= 10_000:
        return str(round(ms / 1000))
    return f"{ms / 1000:.1f}"


__all__ = [
    "MAX_COUNTER",
    "MAX_WALL",
    "SERVER_NODE",
    "Clock",
    "Stamp",
    "ahead_ms",
    "check_skew",
    "parse_time_part",
    "too_far_ahead",
]
