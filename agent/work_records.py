"""Work on records inside one store transaction: bases, views (with their index
entries) and conflict entries. A mixin of `agent.core.Work`, which adds the counters,
clock, feed, checkpoints and outbox these build on (see agent.core)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from agent import evicted
from agent.base import BaseRecord, apply_rec, rec_state
from agent.query.maintain import UNKNOWN, IndexUpkeep
from agent.store import Tx, n_key, record_key
from agent.view import ViewState, compute_view
from schemas import wire

if TYPE_CHECKING:
    from agent.core import Core, FeedKind

MAX_LOST_ENTRIES = 10_000


def open_conflict_key(rk: bytes, name: str) -> bytes:
    return b"O" + rk + b"\0" + name.encode()


def lost_key(n: int, name: str) -> bytes:
    return b"L" + n_key(n) + name.encode()


class RecordWork:
    """Bases, views and conflicts of one transaction (a mixin of `agent.core.Work`)."""

    def __init__(self) -> None:
        self._ix: IndexUpkeep | None = None
        self._stored: dict[bytes, dict[str, Any] | None] = {}
        """View documents as `load_view` read them, until that view is saved (what the
        index upkeep compares the new view with, without reading it again)."""

    __slots__ = ("_ix", "_stored")

    core: Core
    dev: str
    tx: Tx
    now: Callable[[], int]
    gen: Callable[[], int]
    feed: Callable[..., int]
    pending_changes: Callable[[bytes], list[dict[str, Any]]]

    # ------------------------------------------------------------------ bases

    def load_base(self, rk: bytes, c: str, k: str) -> BaseRecord | None:
        doc = self.tx.get("base", rk)
        if doc is None:
            return None
        return BaseRecord.from_docs(c, k, doc, self.tx.get("stamps", rk))

    def save_base(self, rk: bytes, old: BaseRecord | None, new: BaseRecord | None) -> None:
        """Store `new` (None: drop the record) and keep the open-conflict entries in step."""
        if new is None:
            self.tx.delete("base", rk)
            self.tx.delete("stamps", rk)
        else:
            doc, stamps = new.to_docs()
            doc["st"] = self.now()  # last synced: when retention's clock starts
            self.tx.put("base", rk, doc)
            if stamps:
                self.tx.put("stamps", rk, stamps)
            else:
                self.tx.delete("stamps", rk)
        old_cf = old.cf if old is not None else {}
        new_cf = new.cf if new is not None else {}
        for name in old_cf:
            if name not in new_cf:
                self.tx.delete("conflicts", open_conflict_key(rk, name))
        if new is None:
            return
        for name, cands in new_cf.items():
            if old_cf.get(name) == cands:
                continue
            key = open_conflict_key(rk, name)
            prior = self.tx.get("conflicts", key)
            if prior is None:
                self.feed(new.c, new.k, "conflict", {"field": name, "candidates": cands})
            self.tx.put("conflicts", key, {
                "kind": "open", "c": new.c, "k": new.k, "s": new.s, "field": name,
                "value": new.f.get(name), "h": new.h.get(name), "candidates": cands,
                "q": new.fq.get(name, new.q),
                "t": prior["t"] if prior else self.now()})

    def apply_recs(self, recs: Iterable[wire.Rec], kind: FeedKind, *,
                   fetched: bool = False) -> dict[bytes, BaseRecord]:
        """Apply record states to the base, recompute the views, record feed events.

        Returns the new base of every record touched. Every touched record is marked
        with the current snapshot generation. A record the device evicted takes only
        the states `agent.evicted.admit` lets through (all of them when `fetched`).
        """
        grouped: dict[bytes, list[wire.Rec]] = {}
        for rec in recs:
            grouped.setdefault(record_key(rec.c, rec.k), []).append(rec)
        out: dict[bytes, BaseRecord] = {}
        gen = self.gen()
        for rk, group in grouped.items():
            c, k = group[0].c, group[0].k
            old = self.load_base(rk, c, k)
            states = [rec_state(rec) for rec in group]
            if old is None:
                mark = evicted.marker(self.tx, rk)
                states = list(evicted.admit(mark, states, fetched=fetched))
                if not states:
                    if mark is not None and mark.get("g") != gen:
                        # Still on the server (a snapshot's sweep keeps the marker).
                        self.tx.put(evicted.DB, rk, {**mark, "g": gen})
                    continue
                if mark is not None:
                    self.tx.delete(evicted.DB, rk)
            new = old
            for st in states:
                new = apply_rec(new, st)
            assert new is not None
            new.g = gen
            self.save_base(rk, old, new)
            self.refresh_view(rk, c, k, new)
            self.feed(c, k, kind)
            out[rk] = new
        return out

    # ------------------------------------------------------------------ views

    def load_view(self, rk: bytes, c: str, k: str) -> ViewState | None:
        doc = self.tx.get("view", rk)
        self._stored[rk] = doc  # ViewState.from_doc copies what a write may change
        return None if doc is None else ViewState.from_doc(c, k, doc)

    @property
    def indexes(self) -> IndexUpkeep:
        """The index entries of this transaction's views (agent.query)."""
        if self._ix is None:
            self._ix = IndexUpkeep(self.tx)
        return self._ix

    def save_view(self, rk: bytes, state: ViewState | None) -> None:
        # Index entries change in this same transaction, so they never disagree.
        self.indexes.view_saved(rk, state, self._stored.pop(rk, UNKNOWN))
        if state is None:
            self.tx.delete("view", rk)
        else:
            self.tx.put("view", rk, state.to_doc())

    def clear_views(self) -> None:
        """Erase every view (wipe, resync), and with them every index entry."""
        self.tx.clear("view")
        self._stored.clear()
        self.indexes.views_cleared()

    def refresh_view(self, rk: bytes, c: str, k: str, base: BaseRecord | None) -> ViewState | None:
        """Recompute a record's view from its base and its own pending changes."""
        state = compute_view(base, self.pending_changes(rk), self.core.spec(c), self.dev,
                             c=c, k=k)
        self.save_view(rk, state)
        return state

    # -------------------------------------------------------------- conflicts

    def record_lost_write(self, n: int, name: str, doc: dict[str, Any]) -> None:
        self.tx.put("conflicts", lost_key(n, name), doc)

    def prune_lost(self) -> None:
        keys = list(self.tx.keys("conflicts", b"L"))
        for key in keys[: max(0, len(keys) - MAX_LOST_ENTRIES)]:
            self.tx.delete("conflicts", key)


__all__ = ["MAX_LOST_ENTRIES", "RecordWork", "lost_key", "open_conflict_key"]
