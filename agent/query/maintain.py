"""Keeping index entries in step with the views, inside the view's own transaction.

The adapter between the pure index code (`agent.query.indexes`) and LMDB:

- `IndexUpkeep.view_saved` runs in the SAME write transaction as every change of a
  view (`agent.core.Work.save_view` calls it just before it stores the view): it reads
  the stored view, and replaces the entries the old view implied by those the new one
  implies. A local write, an ack, a rollback, a delta, a catch-up page and a snapshot
  sweep all save views that way, so an index can never disagree with the views, whatever
  crashes: LMDB commits both or neither.
- `IndexUpkeep.views_cleared` erases every entry with the views (wipe, resync).
- `ensure_indexes` (run when the agent opens the store) records the schema's indexes
  (`Registry.reconcile`) and builds new ones / drops removed ones in batches of their own
  transactions. Each batch records how far it got (meta ``idx``), so a build that was
  killed resumes where it stopped. Writes made meanwhile maintain an index being built
  like a ready one: every record the build has passed, and every record written since
  the index was added, has exactly its entries; the build fills in the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

import orjson

from agent.query.indexes import (
    IndexDef,
    Registry,
    StoredView,
    declared_indexes,
    entries,
    unchanged,
)
from agent.query.logs import event
from agent.store import Tx, record_key, split_record_key
from agent.view import ViewState

if TYPE_CHECKING:
    from agent.core import Core, Work

META_KEY = "idx"
BUILD_BATCH = 1000
"""Records indexed per build transaction."""
DROP_BATCH = 10_000
"""Entries deleted per drop transaction."""

Progress = Callable[[IndexDef], None]


class Unknown(Enum):
    """`IndexUpkeep.view_saved` was not told what view is stored now."""

    TOKEN = 0


UNKNOWN: Final = Unknown.TOKEN


_parsed: tuple[bytes | None, Registry] = (None, Registry())
"""The last registry document read (its stored bytes) and its parsed form: every write
transaction that saves a view reads the registry, and it changes only when indexes are
added, built or dropped. Keyed on the bytes, so an unchanged registry costs one
comparison, not a JSON parse."""


def load_registry(tx: Tx) -> Registry:
    global _parsed
    raw = tx.raw("meta", META_KEY.encode())
    last_raw, last = _parsed
    if raw == last_raw:
        return last
    registry = Registry.from_doc(None if raw is None else orjson.loads(raw))
    _parsed = (raw, registry)
    return registry


def save_registry(tx: Tx, registry: Registry) -> None:
    tx.set_meta(META_KEY, registry.to_doc())


class IndexUpkeep:
    """The index side of one write transaction (`Work.indexes`)."""

    __slots__ = ("_by_collection", "_registry", "tx")

    def __init__(self, tx: Tx) -> None:
        self.tx = tx
        self._registry: Registry | None = None
        self._by_collection: dict[str, list[IndexDef]] = {}

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = load_registry(self.tx)
        return self._registry

    def _maintained(self, collection: str) -> list[IndexDef]:
        found = self._by_collection.get(collection)
        if found is None:
            found = self.registry.maintained(collection)
            self._by_collection[collection] = found
        return found

    def view_saved(self, rk: bytes, state: ViewState | None,
                   stored: Mapping[str, Any] | Unknown | None = UNKNOWN) -> None:
        """Called with the new view of record `rk` (None: removed) BEFORE it is stored;
        `stored` is the view document stored now (None: none) when the caller has it
        at hand (`Work.load_view` read it), else it is read here."""
        if state is not None:
            c, k = state.c, state.k
        else:
            c, k = split_record_key(rk)
        indexes = self._maintained(c)
        if not indexes:
            return
        tx = self.tx
        doc = tx.get("view", rk) if stored is UNKNOWN else stored
        memo: dict[str, bytes | list[bytes]] = {}  # the new view's encoded fields
        if doc is None:  # a new record: nothing to compare or delete
            if state is not None:
                for ix in indexes:
                    for key, value in entries(ix, state, memo).items():
                        tx.put_raw("index", key, value)
            return
        assert isinstance(doc, Mapping)
        old = StoredView.from_doc(k, doc)
        for ix in indexes:
            if state is not None and unchanged(ix, old, state):
                continue
            before = entries(ix, old)
            after = entries(ix, state, memo)
            for key in before:
                if key not in after:
                    tx.delete("index", key)
            for key, value in after.items():
                if before.get(key) != value:
                    tx.put_raw("index", key, value)

    def views_cleared(self) -> None:
        """Every view was erased in this transaction: erase every entry with them."""
        self.tx.clear("index")
        self._registry = self.registry.all_ready()
        self._by_collection.clear()
        save_registry(self.tx, self._registry)


# ------------------------------------------------------------ build and drop


def indexes_allowed(core: Core) -> bool:
    """Index keys are plain text: on an encrypted store only with plaintext_indexes."""
    return not core.store.encrypted or core.settings.plaintext_indexes


def reconcile(core: Core) -> Registry:
    """Record the indexes the schema declares (new ones to build, removed ones to drop);
    none on an encrypted store unless allowed (`indexes_allowed`)."""
    declared = declared_indexes(core.catalog) if indexes_allowed(core) else {}

    def run(work: Work) -> Registry:
        current = load_registry(work.tx)
        wanted = current.reconcile(declared)
        if wanted != current:
            save_registry(work.tx, wanted)
        return wanted

    current = core.read(lambda work: load_registry(work.tx))
    if current.reconcile(declared) == current:
        return current  # the usual open: nothing to record, no write transaction
    return core.write(run)


def ensure_indexes(core: Core, *, build: bool = True, batch: int = BUILD_BATCH,
                   progress: Progress | None = None) -> Registry:
    """Reconcile the registry with the schema, then (unless `build=False`) build and
    drop until every index is ready. Returns the registry."""
    registry = reconcile(core)
    if build and registry.pending():
        for ix in registry.pending():
            event("info", "index_build_started" if ix.state == "build"
                  else "index_drop_started", collection=ix.collection, index=ix.name,
                  done=ix.done)
        start = time.monotonic()
        registry = build_indexes(core, batch=batch, progress=progress)
        event("info", "indexes_ready", seconds=round(time.monotonic() - start, 3),
              indexes=[f"{ix.collection}({ix.name})" for ix in registry.indexes])
    return registry


def build_indexes(core: Core, *, batch: int = BUILD_BATCH,
                  progress: Progress | None = None) -> Registry:
    """Run build / drop batches until no index has work left (resumes a killed build)."""
    while True:
        result = core.write(lambda work: _step(work, batch), durable=False)
        if result is None:
            return core.read(lambda work: load_registry(work.tx))
        if progress is not None:
            progress(result)


def _step(work: Work, batch: int) -> IndexDef | None:
    """One batch of the first index with work left; returns it as it is now."""
    tx = work.tx
    registry = load_registry(tx)
    pending = registry.pending()
    if not pending:
        return None
    ix = pending[0]
    if ix.state == "drop":
        doomed = []
        for key in tx.keys("index", ix.prefix):
            doomed.append(key)
            if len(doomed) >= DROP_BATCH:
                break
        for key in doomed:
            tx.delete("index", key)
        if len(doomed) < DROP_BATCH:
            save_registry(tx, registry.without(ix.id))
        return ix
    prefix = ix.collection.encode() + b"\0"
    start = record_key(ix.collection, ix.at or "")
    done = 0
    next_key: str | None = None
    for raw, doc in tx.items("view", prefix, start=start):
        _, k = split_record_key(raw)
        if done >= batch:
            next_key = k
            break
        for key, value in entries(ix, StoredView.from_doc(k, doc)).items():
            tx.put_raw("index", key, value)
        done += 1
    if next_key is None:
        updated_ix = replace(ix, state="ready", at=None, done=ix.done + done)
    else:
        updated_ix = replace(ix, at=next_key, done=ix.done + done)
    save_registry(tx, registry.with_index(updated_ix))
    return updated_ix


__all__ = [
    "BUILD_BATCH",
    "IndexUpkeep",
    "build_indexes",
    "ensure_indexes",
    "indexes_allowed",
    "load_registry",
    "reconcile",
]
