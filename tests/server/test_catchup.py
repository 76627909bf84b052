"""Catch-up (PROTOCOL.md §7.3, §7.7-7.8, §9.5): paging, checkpoints, snapshot resets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.checkpoints import ScopeCheckpoint
from broker.server.engine import Engine
from broker.server.operations import purge_tombstones
from broker.server.store.base import Store, WriteTxn
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    T0,
    by_device,
    catchup,
    changes,
    make_engine,
    of_type,
    task,
)
from waystation import merge

DEVICES = {"van-1": ["r1", "r2"], "van-2": ["r1"]}


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    """An engine over a fresh store of each backend."""
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory())
    yield engine, store


def _ask(engine: Engine, dev: str, cp: dict[str, int], **kw: Any) -> list[dict[str, Any]]:
    return by_device(engine.handle_up(dev, catchup(dev, cp, **kw))).get(dev, [])


def _fill(engine: Engine, dev: str, scope: str, count: int, start: int = 1) -> None:
    for first in range(start, start + count, 500):
        last = min(first + 500, start + count)
        engine.handle_up(dev, changes(dev, [task(n, f"{scope}-{n}", scope, status="s")
                                            for n in range(first, last)]))


def test_paging_over_ten_thousand_records(env: tuple[Engine, Store]) -> None:
    """Paging reaches every record exactly once, with contiguous from/to, then checkpoints."""
    engine, _ = env
    _fill(engine, "van-1", "r1", 10_000)
    # rewrite some records so the index is not just 1..N
    engine.handle_up("van-1", changes("van-1", [task(10_001 + i, f"r1-{i * 7 + 1}",
                                                     status="t", create=False)
                                                for i in range(300)]))
    cp, seen, pages = 0, [], 0
    while True:
        msgs = _ask(engine, "van-2", {"r1": cp}, lim=1000)
        (page,) = of_type(msgs, "page")
        pages += 1
        assert page["from"] == cp and not page["reset"]
        qs = [r["q"] for r in page["recs"]]
        assert qs == sorted(qs) and all(cp < q <= page["to"] for q in qs)
        assert all(not r.get("part") for r in page["recs"])
        seen += [r["k"] for r in page["recs"]]
        cp = page["to"]
        if not page["more"]:
            (done,) = of_type(msgs, "checkpoint")
            assert done["cp"] == {"r1": 10_300}
            break
        assert of_type(msgs, "checkpoint") == []
    assert len(seen) == len(set(seen)) == 10_000
    assert pages == 10


def test_nothing_new_gives_only_a_checkpoint(env: tuple[Engine, Store]) -> None:
    """A device that is up to date gets just the checkpoint; foreign scopes are denied."""
    engine, _ = env
    _fill(engine, "van-1", "r1", 3)
    msgs = _ask(engine, "van-2", {"r1": 3, "r2": 0, "r9": 0})
    assert [m["type"] for m in msgs] == ["checkpoint"]
    assert msgs[0]["cp"] == {"r1": 3} and msgs[0]["denied"] == ["r2", "r9"]


def test_catchup_records_device_checkpoints(env: tuple[Engine, Store]) -> None:
    """The server remembers how far each device had caught up (for `server devices`)."""
    engine, store = env
    _ask(engine, "van-2", {"r1": 0, "r2": 4})
    with store.read() as txn:
        row = txn.get_device("van-2")
    assert row is not None and row.cp == {"r1": 0}


def test_pages_are_bounded_in_bytes(env: tuple[Engine, Store]) -> None:
    """Large records end a page early (`more`), so no page exceeds the down-message bound."""
    engine, _ = env
    blob = "y" * 40_000
    for n in range(1, 13, 3):
        engine.handle_up("van-1", changes("van-1", [task(i, f"big-{i}", proof={"b": blob})
                                                    for i in range(n, n + 3)]))
    cp, got = 0, 0
    while True:
        msgs = _ask(engine, "van-2", {"r1": cp})
        (page,) = of_type(msgs, "page")
        got += len(page["recs"])
        cp = page["to"]
        if not page["more"]:
            break
    assert got == 12


def _delete(engine: Engine, dev: str, key: str, n: int) -> None:
    engine.handle_up(dev, changes(dev, [{"n": n, "h": f"{T0 + n:012x}0000", "c": "tasks",
                                         "k": key, "s": "r1", "op": "del"}]))


def test_snapshot_reset_after_tombstone_purge(env: tuple[Engine, Store]) -> None:
    """Below the purge horizon a catch-up restarts from 0 (reset) unless in a snapshot."""
    engine, store = env
    _fill(engine, "van-1", "r1", 5)              # q 1..5
    _delete(engine, "van-1", "r1-2", 100)        # q 6: tombstone
    _fill(engine, "van-1", "r1", 2, start=200)   # q 7, 8
    msgs = _ask(engine, "van-2", {"r1": 5})
    assert [r["x"] for r in of_type(msgs, "page")[0]["recs"] if r.get("x")] == [True]
    assert purge_tombstones(store, T0 + 10, retention_ms=0) == 1
    with store.read() as txn:
        assert txn.purge_horizon("r1") == 6
        assert txn.get_record("tasks", "r1-2") is None
    msgs = _ask(engine, "van-2", {"r1": 5})
    (page,) = of_type(msgs, "page")
    assert page["reset"] is True and page["from"] == 0 and page["to"] == 8
    assert sorted(r["k"] for r in page["recs"]) == ["r1-1", "r1-200", "r1-201", "r1-3",
                                                    "r1-4", "r1-5"]
    # within the snapshot (snap), paging continues without another reset
    msgs = _ask(engine, "van-2", {"r1": 3}, snap=["r1"])
    assert of_type(msgs, "page")[0]["reset"] is False
    # a checkpoint at or past the horizon needs no reset; 0 never does
    assert of_type(_ask(engine, "van-2", {"r1": 6}), "page")[0]["reset"] is False
    assert of_type(_ask(engine, "van-2", {"r1": 0}), "page")[0]["reset"] is False


def test_fresh_device_paging_below_the_horizon_gets_each_page_once(
        env: tuple[Engine, Store]) -> None:
    """A device from checkpoint 0 that follows §9.5 (a `reset` page starts a snapshot, its
    further requests list the scope in `snap`) is sent every record once, also when its
    pages end below the purge horizon (purged tombstones; every scope after a restore,
    when every device resyncs from 0). The first page said no reset, the continuation
    below the horizon was reset to 0: the first page came twice."""
    engine, store = env
    _fill(engine, "van-1", "r1", 5)              # q 1..5
    _delete(engine, "van-1", "r1-2", 100)        # q 6: tombstone
    _fill(engine, "van-1", "r1", 2, start=200)   # q 7, 8
    assert purge_tombstones(store, T0 + 10, retention_ms=0) == 1
    cp, snap, sent, starts = 0, [], [], []
    for _ in range(10):
        msgs = _ask(engine, "van-2", {"r1": cp}, lim=2, snap=snap)
        (page,) = of_type(msgs, "page")
        if page["reset"]:
            snap = ["r1"]
        starts.append(page["from"])
        sent += [r["k"] for r in page["recs"]]
        cp = page["to"]
        if not page["more"]:
            break
    assert sorted(sent) == ["r1-1", "r1-200", "r1-201", "r1-3", "r1-4", "r1-5"], sent
    assert starts == [0, 3, 5], starts
    # one page is enough: no snapshot needed (0 never resets on its own)
    assert of_type(_ask(engine, "van-2", {"r1": 0}), "page")[0]["reset"] is False


def test_purge_respects_retention(env: tuple[Engine, Store]) -> None:
    """Tombstones younger than the retention stay; revived records are not purged."""
    engine, store = env
    _fill(engine, "van-1", "r1", 2)
    _delete(engine, "van-1", "r1-1", 10)
    _delete(engine, "van-1", "r1-2", 11)
    engine.handle_up("van-1", changes("van-1", [task(12, "r1-2", status="back",
                                                     create=False)]))
    assert purge_tombstones(store, T0 + 1000, retention_ms=60_000) == 0
    assert purge_tombstones(store, T0 + 120_000, retention_ms=60_000) == 1
    with store.read() as txn:
        assert txn.get_record("tasks", "r1-1") is None
        raw = txn.get_record("tasks", "r1-2")
        assert raw is not None and not merge.from_json(raw).deleted


def test_checkpoint_beyond_sequence_resets(env: tuple[Engine, Store]) -> None:
    """A checkpoint the server never issued (store replaced) starts a snapshot."""
    engine, _ = env
    _fill(engine, "van-1", "r1", 2)
    (page,) = of_type(_ask(engine, "van-2", {"r1": 50}), "page")
    assert page["reset"] is True and page["to"] == 2 and len(page["recs"]) == 2


def test_empty_scope_reset_still_sends_a_page(env: tuple[Engine, Store]) -> None:
    """A reset is announced even when the scope has no records left."""
    engine, store = env

    def bump(txn: WriteTxn) -> None:
        for _ in range(3):
            txn.allocate_seq("r1")
        txn.set_purge_horizon("r1", 3)

    store.transact(bump)
    msgs = _ask(engine, "van-2", {"r1": 1})
    (page,) = of_type(msgs, "page")
    assert page["reset"] and page["recs"] == [] and page["to"] == 3
    assert of_type(msgs, "checkpoint")[0]["cp"] == {"r1": 3}


def _device_after(msgs: list[dict[str, Any]], scope: str) -> ScopeCheckpoint:
    """The device's checkpoint of `scope` after applying `msgs` as an agent does (§7.8:
    pages move it, a `checkpoint` message only tells where the scope stands)."""
    cp = ScopeCheckpoint()
    for page in of_type(msgs, "page"):
        cp = cp.page(page["from"], page["to"], T0)
    for done in of_type(msgs, "checkpoint"):
        cp = cp.complete(done["cp"][scope], T0)
    return cp


def test_scope_with_no_records_left_moves_a_fresh_device_to_its_sequence(
        env: tuple[Engine, Store]) -> None:
    """A device from checkpoint 0 on a scope whose sequence is past every record left (a
    restore's jump over an empty scope; tombstones all purged) gets a page without records
    up to the sequence; with the `checkpoint` message alone it stayed behind and asked
    again at once, for ever (~100 catch-ups a second, seen after `server restore`)."""
    engine, store = env

    def jump(txn: WriteTxn) -> None:  # what a restore does to a scope with no records
        for _ in range(3):
            txn.allocate_seq("r1")
        txn.set_purge_horizon("r1", 3)

    store.transact(jump)
    msgs = _ask(engine, "van-2", {"r1": 0})
    (page,) = of_type(msgs, "page")
    assert page["from"] == 0 and page["to"] == 3 and page["recs"] == [] and not page["reset"]
    cp = _device_after(msgs, "r1")
    assert cp.cp == 3 and not cp.has_gap

    _fill(engine, "van-1", "r2", 2)                 # r2 q 1, 2
    engine.handle_up("van-1", changes("van-1", [       # q 3, 4: both deleted
        {"n": n, "h": f"{T0 + n:012x}0000", "c": "tasks", "k": k, "s": "r2", "op": "del"}
        for n, k in ((10, "r2-1"), (11, "r2-2"))]))
    assert purge_tombstones(store, T0 + 100, retention_ms=0) == 2
    msgs = _ask(engine, "van-1", {"r2": 0})
    cp = _device_after(msgs, "r2")
    assert cp.cp == 4 and not cp.has_gap
