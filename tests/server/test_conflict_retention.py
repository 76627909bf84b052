"""The conflict log is bounded like the dead letters: closed entries go by age and
count, open ones stay until a person settles them; on every store backend."""

from __future__ import annotations

from pathlib import Path

from broker.server.engine import Engine
from broker.server.store.base import ConflictRow, Store, WriteTxn
from tests.server.conftest import StoreFactory
from tests.server.helpers import make_engine


def _row(created: int, open_: bool, closed: int = 0) -> ConflictRow:
    return ConflictRow(id=0, created_ms=created, c="tasks", k=f"t-{created}", s="r1",
                       field="address", entry={"winner": "x", "loser": "y"}, open=open_,
                       closed_ms=closed)


def _ids(store: Store) -> list[int]:
    with store.read() as txn:
        return sorted(r.id for r in txn.conflicts(open_only=False, limit=1000))


def _open_ids(store: Store) -> list[int]:
    with store.read() as txn:
        return sorted(r.id for r in txn.conflicts(open_only=True, limit=1000))


def test_closed_entries_go_by_age_open_ones_stay(store_factory: StoreFactory) -> None:
    """Entries last touched before the cutoff go unless open; a long-open conflict
    closed recently counts from its closing."""
    store = store_factory()

    def add(txn: WriteTxn) -> list[int]:
        return [txn.add_conflict(_row(10, False)),          # old, closed: goes
                txn.add_conflict(_row(20, True)),           # old, open: stays
                txn.add_conflict(_row(30, False, 500)),     # closed recently: stays
                txn.add_conflict(_row(600, False))]         # new: stays

    ids = store.transact(add)
    assert store.transact(lambda t: t.trim_conflicts(100, 1000)) == 1
    assert _ids(store) == ids[1:]
    assert _open_ids(store) == [ids[1]]
    assert store.transact(lambda t: t.trim_conflicts(100, 1000)) == 0


def test_closed_entries_beyond_the_count_go_oldest_first(store_factory: StoreFactory) -> None:
    """Past `keep_closed`, the oldest closed entries go; open ones neither count nor go;
    `limit` bounds one call."""
    store = store_factory()

    def add(txn: WriteTxn) -> list[int]:
        out = []
        for i in range(10):
            out.append(txn.add_conflict(_row(1000 + i, open_=i % 3 == 0)))
        return out

    ids = store.transact(add)
    open_ids = [cid for i, cid in enumerate(ids) if i % 3 == 0]
    closed_ids = [cid for i, cid in enumerate(ids) if i % 3 != 0]
    assert store.transact(lambda t: t.trim_conflicts(0, 4, limit=1)) == 1
    assert store.transact(lambda t: t.trim_conflicts(0, 4)) == 1
    assert _ids(store) == sorted(open_ids + closed_ids[2:])
    assert store.transact(lambda t: t.trim_conflicts(0, 4)) == 0
    assert _open_ids(store) == open_ids


def test_the_engine_trims_the_conflict_log(tmp_path: Path,
                                            store_factory: StoreFactory) -> None:
    """The server applies the bound on its periodic tick (with the dead letters')."""
    engine, store, time = make_engine(tmp_path, {"van-1": ["r1"]}, store=store_factory())
    engine.cfg = engine.cfg.model_copy(update={"conflict_retention_s": 3600})
    store.transact(lambda t: t.add_conflict(_row(time() - 2 * 3600 * 1000, False)))
    keep = store.transact(lambda t: t.add_conflict(_row(time(), False)))
    assert isinstance(engine, Engine)
    engine.tick()
    assert _ids(store) == [keep]
