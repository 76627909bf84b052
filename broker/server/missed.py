"""Deltas a device missed while the server counted it offline, and the nudge that heals
them when it comes back without reconnecting (PROTOCOL.md §7.6).

The server sends deltas only to devices it believes online (§7.6). A device that
reconnects sends `hello` and `catchup` and gets everything it missed; but a device the
server counted offline while its connection stayed up (a last will or a stale retained
status that arrived after its "online", a broker that misjudged its session) comes back
by its next periodic `status` alone, and asks nothing: the deltas of those seconds
reach it only at its next gap or reconnect, which in a quiet scope may be days away.

A device disabled while online gets no deltas either, and when it is enabled again its
`sync` command brings a `hello` (reporting it done), not a catch-up: the engine counts
it away from its disabling to its enabling.

So the server remembers, per scope, the last change it applied (its sequence `q`) and,
per device that went away, how far the changes had gone then. When such a device is
back and has sent no `catchup` within `GRACE_MS`, it gets one
`delta` with, for each of its scopes that moved meanwhile, the record at (or after) the
scope's last sequence: a device that missed anything then sees a gap in its sequence
and catches up by itself (§9.4); one that missed nothing applies a state it holds
(idempotent, §6). Pure bookkeeping, no I/O: the engine reads the records.

Memory: one entry per scope changed while this server runs, and one per device that
went offline (both bounded by the registry). Only this server's changes are known (a
second server of the group sends its own deltas, and counts presence itself).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

GRACE_MS = 10_000
"""How long a device back online has to send a `catchup` (a reconnect does at once,
§9.2) before it is nudged."""


SCOPES_PER_TICK = 2000
"""Scopes nudged per engine tick at most (`MissedDeltas.due`)."""


@dataclass(frozen=True, slots=True)
class Nudge:
    """A device back online that missed changes: the scopes, each with the sequence of
    the last change the server applied to it."""

    dev: str
    scopes: tuple[tuple[str, int], ...]


class MissedDeltas:
    """See the module docstring. One thread only (the engine's)."""

    def __init__(self, grace_ms: int = GRACE_MS) -> None:
        self.grace_ms = grace_ms
        self._count = 0
        """Changes applied so far (this server's run): the clock of `_latest`/`_away`."""
        self._latest: dict[str, tuple[int, int]] = {}
        """Scope -> (`_count` when it last changed, that change's q)."""
        self._away: dict[str, int] = {}
        """Offline device -> `_count` when it went offline."""
        self._back: dict[str, tuple[int, int]] = {}
        """Device back online -> (when to nudge it, `_count` when it went offline)."""

    @property
    def count(self) -> int:
        """Changes applied so far: what `undelivered` takes as `since`."""
        return self._count

    def applied(self, scope: str, q: int) -> None:
        """A change (a device's or the operator's) was applied at sequence `q`."""
        self._count += 1
        self._latest[scope] = (self._count, q)

    def offline(self, dev: str) -> None:
        """The server now counts `dev` offline: its deltas stop."""
        back = self._back.pop(dev, None)  # offline again before its nudge: still owed
        self._away.setdefault(dev, self._count if back is None else back[1])

    def online(self, dev: str, now_ms: int) -> None:
        """The server counts `dev` online again: nudge it after the grace, unless it
        asks first."""
        since = self._away.pop(dev, None)
        if since is not None:
            self._back[dev] = (now_ms + self.grace_ms, since)

    def asked(self, dev: str) -> None:
        """`dev` sent a `catchup`: it brings what it missed."""
        self._back.pop(dev, None)
        if dev in self._away:  # asking while counted offline: owed only what follows
            self._away[dev] = self._count

    def undelivered(self, dev: str, since: int, now_ms: int) -> None:
        """A message to `dev` could not be handed to the broker (the server's link was
        down, its queue full), sent after the `since`-th change: a delta may be among
        them, and the device, online all along, would never ask. It is owed what changed
        since, shown after the grace as if it had come back then."""
        if dev in self._away:
            self._away[dev] = min(self._away[dev], since)
        elif dev in self._back:
            at, was = self._back[dev]
            self._back[dev] = (at, min(was, since))
        else:
            self._back[dev] = (now_ms + self.grace_ms, since)

    def waiting(self) -> int:
        """Devices back online that may still be nudged."""
        return len(self._back)

    def due(self, now_ms: int, scopes_of: Callable[[str], Iterable[str]],
            budget: int = SCOPES_PER_TICK) -> list[Nudge]:
        """The devices whose grace is over, each with the scopes (of `scopes_of(dev)`,
        those it still follows) changed since it went offline; forgets them. At most
        about `budget` scopes in all (each costs the engine a read): the rest stay due
        for the next call, so a whole fleet owed a nudge at once (the server's broker
        link lost a round of deltas) does not stall the engine for one tick."""
        out: list[Nudge] = []
        used = 0
        for dev, (at, since) in list(self._back.items()):
            if at > now_ms:
                continue
            if used >= budget:
                break
            del self._back[dev]
            moved = []
            for scope in sorted(scopes_of(dev)):
                last = self._latest.get(scope)
                if last is not None and last[0] > since:
                    moved.append((scope, last[1]))
            if moved:
                out.append(Nudge(dev, tuple(moved)))
                used += len(moved)
        return out

    def forget(self, known: Callable[[str], bool]) -> None:
        """Drop the devices for which `known(dev)` is false (removed from the fleet)."""
        for table in (self._away, self._back):
            for dev in [d for d in table if not known(d)]:
                del table[dev]


__all__ = ["GRACE_MS", "SCOPES_PER_TICK", "MissedDeltas", "Nudge"]
