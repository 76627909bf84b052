"""Eviction markers: what the device knows of a record it evicted (database ``evicted``).

A record evicted by retention (`agent.evict`) leaves its base, stamps, view and index
entries, and a marker ``record key -> {"s": scope, "q": version, "t": ms, "g": snapshot
generation}`` in their place (`g` is renewed when a snapshot lists the record again, so
the snapshot's sweep drops the markers of records the server no longer has). The marker
decides what a later record state may do (PROTOCOL.md §9.6):

- a state at or below the evicted version is what the device already had: ignored, so
  neither a re-sent delta nor a snapshot page re-creates an evicted record;
- a *partial* state newer than it cannot rebuild the record (the fields it does not
  list are gone from the device): ignored as well, the record stays evicted;
- a *whole* state newer than it is the record as it now is: the record comes back;
- a `fetched` answer (the device asked for the record) always brings it back.

The scope's checkpoint is not touched by any of this: it says which changes the device
has *seen*, not which records it holds, so catch-up never resends an evicted record
that did not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.base import RecState
from agent.store import Tx
from agent.view import ViewState

DB = "evicted"


def marker(tx: Tx, rk: bytes) -> dict[str, Any] | None:
    """The eviction marker of record `rk`, or None (held, or never seen)."""
    doc: dict[str, Any] | None = tx.get(DB, rk)
    return doc


def held_scope(tx: Tx, rk: bytes, view: ViewState | None) -> str | None:
    """The scope of a record this device holds, or held until retention evicted it (its
    marker keeps the scope, so a write on it needs no scope field)."""
    if view is not None:
        return view.s
    mark = marker(tx, rk)
    scope = mark.get("s") if mark is not None else None
    return scope if isinstance(scope, str) else None


def admit(mark: dict[str, Any] | None, states: Sequence[RecState], *,
          fetched: bool = False) -> Sequence[RecState]:
    """The states that may be applied to a record with eviction marker `mark` (all of
    them when there is none, or the device fetched the record)."""
    if mark is None or fetched:
        return states
    evicted_q = int(mark.get("q", 0))
    if any(not st.part and st.q > evicted_q for st in states):
        return states
    return ()


__all__ = ["DB", "admit", "marker"]
