"""Per-scope checkpoints (PROTOCOL.md §9.4, §9.5). Pure: no I/O.

A checkpoint `cp` promises: every change with `q <= cp` in the scope is in the base. It
moves over the sequences the device receives (its own acks, others' deltas) only while
they are contiguous; sequences above a gap wait in `seen` until the gap fills. A
catch-up `page` that continues from at most `cp` moves it to `to`.

`head` is the highest sequence the device knows exists (from a `checkpoint` message that
is ahead of what the pages delivered, e.g. because a page was lost). A scope has a *gap*
while `seen` is not empty or `head > cp`; `gap_since` remembers when the current gap was
first noticed so the daemon can ask for a catch-up when it does not fill in time.

A snapshot (a page with `reset: true`) records the generation it started and the
request it answered, so that the `checkpoint` completing it can drop the base records no
page, delta or ack touched since.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

MAX_SEEN = 10_000
"""Sequences kept above a gap. Beyond this the highest are forgotten: they only let the
checkpoint advance sooner; the catch-up that a long gap triggers brings them anyway."""


@dataclass(frozen=True, slots=True)
class ScopeCheckpoint:
    """The stored state of one scope's checkpoint."""

    cp: int = 0
    seen: tuple[int, ...] = ()
    head: int = 0
    gap_since: int | None = None
    snap_gen: int | None = None
    snap_req: str | None = None

    @property
    def snapshot(self) -> bool:
        """A snapshot (reset) of this scope is in progress."""
        return self.snap_gen is not None

    @property
    def has_gap(self) -> bool:
        return bool(self.seen) or self.head > self.cp

    def to_doc(self) -> dict[str, Any]:
        return {"cp": self.cp, "seen": list(self.seen), "head": self.head,
                "gap": self.gap_since, "sg": self.snap_gen, "sr": self.snap_req}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> ScopeCheckpoint:
        if doc is None:
            return cls()
        return cls(doc["cp"], tuple(doc["seen"]), doc["head"], doc["gap"], doc["sg"], doc["sr"])

    def _settle(self, cp: int, seen: list[int], head: int, now_ms: int) -> ScopeCheckpoint:
        while seen and seen[0] <= cp + 1:
            cp = max(cp, seen.pop(0))
        if len(seen) > MAX_SEEN:
            del seen[MAX_SEEN:]
        gap = bool(seen) or head > cp
        since = (self.gap_since if self.gap_since is not None else now_ms) if gap else None
        return replace(self, cp=cp, seen=tuple(seen), head=max(head, cp), gap_since=since)

    def mark(self, q: int, now_ms: int) -> ScopeCheckpoint:
        """Sequence `q` is now in the base (own ack or delta): advance while contiguous."""
        if q <= self.cp or q in self.seen:
            return self
        seen = list(self.seen)
        bisect.insort(seen, q)
        return self._settle(self.cp, seen, self.head, now_ms)

    def mark_all(self, qs: Iterable[int], now_ms: int) -> ScopeCheckpoint:
        """`mark(q)` of every q in `qs`, in order, with one new state instead of one per q
        (an ack carries hundreds)."""
        cp, seen, head, since = self.cp, list(self.seen), self.head, self.gap_since
        changed = False
        for q in qs:
            if q <= cp or q in seen:
                continue
            changed = True
            bisect.insort(seen, q)
            # _settle, on local values
            while seen and seen[0] <= cp + 1:
                cp = max(cp, seen.pop(0))
            if len(seen) > MAX_SEEN:
                del seen[MAX_SEEN:]
            gap = bool(seen) or head > cp
            since = (since if since is not None else now_ms) if gap else None
            head = max(head, cp)
        if not changed:
            return self
        # (the constructor, not dataclasses.replace: every ack comes here)
        return ScopeCheckpoint(cp, tuple(seen), head, since, self.snap_gen, self.snap_req)

    def page(self, from_: int, to: int, now_ms: int) -> ScopeCheckpoint:
        """A catch-up page `from_ -> to` was applied. It moves `cp` to `to` only if it
        continues from at most `cp`; a page from further on (an earlier page was lost)
        leaves `cp` and records that the scope goes at least to `to`."""
        if from_ > self.cp:
            return self._settle(self.cp, list(self.seen), max(self.head, to), now_ms)
        if to <= self.cp:
            return self
        return self._settle(to, [q for q in self.seen if q > to], self.head, now_ms)

    def complete(self, cp: int, now_ms: int) -> ScopeCheckpoint:
        """A `checkpoint` message says the scope is complete up to `cp`. The device's
        own `cp` is not moved past what it received; if `cp` is ahead, that is a gap."""
        return self._settle(self.cp, list(self.seen), max(self.head, cp), now_ms)

    def start_snapshot(self, to: int, gen: int, req: str, now_ms: int) -> ScopeCheckpoint:
        """A `reset` page: the scope restarts from 0 and is at `to` after this page."""
        fresh = ScopeCheckpoint(snap_gen=gen, snap_req=req)
        return fresh._settle(to, [q for q in self.seen if q > to], 0, now_ms)

    def end_snapshot(self) -> ScopeCheckpoint:
        return replace(self, snap_gen=None, snap_req=None)

    def gap_age_ms(self, now_ms: int) -> int | None:
        """How long the current gap has been open (None: no gap)."""
        return None if self.gap_since is None else max(0, now_ms - self.gap_since)


__all__ = ["MAX_SEEN", "ScopeCheckpoint"]
