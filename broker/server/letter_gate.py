"""Which refusals become dead letters one by one, and which are only counted (pure).

    gate = LetterGate(GateLimits(keep_first=10, window_ms=60_000, raw_bytes=65536))
    session = gate.session()              # one per transaction attempt
    for letter in session.admit(letter):  # 0, 1 or 2 letters to store
        txn.add_dead_letter(letter)
    gate.commit(session)                  # after the transaction committed
    gate.due(now_ms)                      # summary letters of the windows that ended

A device that sends the same bad input ten thousand times must not cost ten thousand
dead letters (each up to 64 KiB). Refusals are grouped by (device, topic kind, code)
in windows of `window_ms` that start with the first refusal: the first `keep_first` of
a window are kept whole (raw bytes cut to `raw_bytes`), the others only counted, and
when the window ends one summary letter says how many there were, how many bytes they
had, and the first reason among them. A `session` sees the gate's state plus its own
admissions and changes nothing until `commit`, so a transaction that runs again (the
store may retry it) decides the same way and nothing is counted twice.

At most `max_keys` groups are tracked; past that, refusals of new devices share one
group per (topic, code) under the device name ``*``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime

from broker.server.store.base import DeadLetter

_Key = tuple[str, str, str]
OVERFLOW_DEVICE = "*"
REASON_CHARS = 1000


@dataclass(frozen=True, slots=True)
class GateLimits:
    keep_first: int = 10
    window_ms: int = 60_000
    raw_bytes: int = 64 * 1024
    max_keys: int = 10_000


@dataclass(slots=True)
class _Window:
    start_ms: int
    last_ms: int = 0
    kept: int = 0
    counted: int = 0
    counted_bytes: int = 0
    reason: str = ""
    """The first reason among the counted refusals."""

    def copy(self) -> _Window:
        return dataclasses.replace(self)


class GateSession:
    """Decisions for one transaction attempt (see the module docstring)."""

    def __init__(self, gate: LetterGate) -> None:
        self._gate = gate
        self.windows: dict[_Key, _Window | None] = {}  # None: window closed, none open
        self.seen = 0
        self.kept = 0
        self.counted = 0

    def admit(self, letter: DeadLetter) -> list[DeadLetter]:
        """The letters to store for this refusal: itself (cut), a summary of its
        group's window that just ended, both, or none (only counted)."""
        limits = self._gate.limits
        self.seen += 1
        key = self._key(letter)
        now = letter.t_ms
        out: list[DeadLetter] = []
        window = self._window(key)
        if window is not None and now - window.start_ms >= limits.window_ms:
            summary = _summary(key, window)
            if summary is not None:
                out.append(summary)
            window = None
        if window is None:
            window = self.windows[key] = _Window(start_ms=now)
        window.last_ms = now
        if window.kept < limits.keep_first:
            window.kept += 1
            self.kept += 1
            size = letter.size or len(letter.raw)
            out.append(dataclasses.replace(letter, raw=bytes(letter.raw[:limits.raw_bytes]),
                                           size=size))
            return out
        window.counted += 1
        window.counted_bytes += letter.size or len(letter.raw)
        if not window.reason:
            window.reason = letter.reason
        self.counted += 1
        return out

    def _key(self, letter: DeadLetter) -> _Key:
        key = (letter.device, letter.topic, letter.code)
        gate = self._gate
        if (key not in gate.windows and key not in self.windows
                and len(gate.windows) + len(self.windows) >= gate.limits.max_keys):
            return (OVERFLOW_DEVICE, letter.topic, letter.code)
        return key

    def _window(self, key: _Key) -> _Window | None:
        if key in self.windows:
            return self.windows[key]
        window = self._gate.windows.get(key)
        if window is None:
            return None
        mine = self.windows[key] = window.copy()
        return mine


class LetterGate:
    """The groups' windows between transactions (see the module docstring)."""

    def __init__(self, limits: GateLimits) -> None:
        self.limits = limits
        self.windows: dict[_Key, _Window] = {}
        self.seen = 0
        self.kept = 0
        self.counted = 0

    def session(self) -> GateSession:
        return GateSession(self)

    def commit(self, session: GateSession) -> None:
        """Adopt a session's decisions (its transaction committed)."""
        for key, window in session.windows.items():
            if window is None:
                self.windows.pop(key, None)
            else:
                self.windows[key] = window
        self.seen += session.seen
        self.kept += session.kept
        self.counted += session.counted

    def due(self, now_ms: int, *, everything: bool = False) -> list[DeadLetter]:
        """Summary letters of the windows that ended by `now_ms` (all of them with
        `everything`, e.g. at shutdown); those windows are forgotten."""
        out: list[DeadLetter] = []
        for key, window in list(self.windows.items()):
            if everything or now_ms - window.start_ms >= self.limits.window_ms:
                del self.windows[key]
                summary = _summary(key, window)
                if summary is not None:
                    out.append(summary)
        return out


def _summary(key: _Key, window: _Window) -> DeadLetter | None:
    """The letter standing for a window's counted refusals (None if there were none)."""
    if not window.counted:
        return None
    device, topic, code = key
    who = "devices beyond the tracked limit" if device == OVERFLOW_DEVICE else device
    reason = (f"{window.counted} more {code} refusal(s) from {who} on its {topic} topic "
              f"({window.counted_bytes} bytes in all) between {_iso(window.start_ms)} and "
              f"{_iso(window.last_ms)} were counted, not kept one by one (the first "
              f"{window.kept} of that window are kept with their raw bytes); first "
              f"reason: {window.reason}")
    return DeadLetter(0, window.last_ms, device, topic, code, reason[:REASON_CHARS], b"", 0)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


__all__ = ["OVERFLOW_DEVICE", "GateLimits", "GateSession", "LetterGate"]
