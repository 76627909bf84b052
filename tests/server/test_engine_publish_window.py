"""No merge, catch-up or fan-out runs under a schema version that is no longer live
(issue 10 §1, the window after `schema publish` / `schema rollback`).

Deterministic: the test holds a server at the exact point (between reading its registry
and committing, or inside its merge transaction) and publishes or rolls back there, on
each store; with PostgreSQL, two servers share one database and the publish runs from a
third connection, as the CLI would.
"""

from __future__ import annotations

import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from broker.server import catchup as catchup_mod
from broker.server import schema_history
from broker.server.engine import Engine
from broker.server.fanout import Fanout
from broker.server.periodic import drain_notices
from broker.server.store.base import Notice, Store, WriteTxn
from broker.server.store.lmdb_store import LmdbStore
from schemas.collection import Catalog, parse_catalog
from tests.schema_versions import V1, V2, V3
from tests.server.conftest import StoreFactory, reopen
from tests.server.helpers import (
    by_device,
    catchup,
    changes,
    hello,
    make_engine,
    of_type,
    oks,
    rejections,
    status,
    task,
)
from waystation import merge


def catalog(text: str) -> Catalog:
    return parse_catalog(tomllib.loads(text), "test")


def publish_all(store: Store, *texts: str) -> None:
    for n, text in enumerate(texts, start=1):
        schema_history.publish(store, text, f"v{n}.toml", n)


def other_process(store: Store) -> Store:
    """The store as another process (the CLI, a second server) sees it. LMDB is opened
    once per process, so the same object; its single writer is the point there."""
    return store if isinstance(store, LmdbStore) else reopen(store)


def before_next_transaction(store: Store, action: Callable[[], Any],
                            monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Run `action` once, when the server next opens a write transaction: after it read
    its registry and parsed the group, before it commits anything."""
    real = store.transact
    fired: list[int] = []

    def transact(fn: Callable[[WriteTxn], Any]) -> Any:
        if not fired:
            fired.append(1)
            action()
        return real(fn)

    monkeypatch.setattr(store, "transact", transact)
    return fired


def fields_of(store: Store, key: str) -> dict[str, Any]:
    with store.read() as txn:
        raw = txn.get_record("tasks", key)
    assert raw is not None, key
    record = merge.from_json(raw)
    return {name: record.value(name) for name in record.fields}


def dead_letters(store: Store) -> list[Any]:
    with store.read() as txn:
        return txn.dead_letters(10)


def test_publish_between_registry_read_and_commit(store_factory: StoreFactory,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_factory()
    publish_all(store, V1, V2)
    engine, _, now = make_engine(tmp_path, {"van-1": ["r1"]}, catalog=catalog(V2), store=store)
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "t-1", notes="one")],
                                                      sv=2)))
    assert oks(out["van-1"]) == [[1, "r1", 1]]
    cli = other_process(store)
    fired = before_next_transaction(
        store, lambda: schema_history.publish(cli, V3, "v3.toml", now()), monkeypatch)
    # The device still writes `notes` (version 2) while version 3 renames it `note`.
    out = by_device(engine.handle_up("van-1", changes("van-1", [
        task(2, "t-1", notes="two"), task(3, "t-2", notes="three")], sv=2)))
    assert fired == [1]
    assert oks(out["van-1"]) == [[2, "r1", 2], [3, "r1", 3]]
    assert rejections(out["van-1"]) == []
    assert fields_of(store, "t-1") == {"route": "r1", "note": "two"}
    assert fields_of(store, "t-2") == {"route": "r1", "note": "three"}
    assert dead_letters(store) == []
    assert engine.catalog.version == 3 and engine.counters["schema_redos"] == 1


def test_rollback_between_registry_read_and_commit(store_factory: StoreFactory,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_factory()
    publish_all(store, V1, V2, V3)
    engine, _, now = make_engine(tmp_path, {"van-1": ["r1"]}, catalog=catalog(V3), store=store)
    engine.handle_up("van-1", orjson.dumps({"type": "hello", "v": 1, "dev": "van-1",
                                            "agent": "test/1", "sv": 3, "z": False,
                                            "caps": ["schema", "schema_push"]}))
    engine.handle_status("van-1", status("van-1"))
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "t-1", note="one")],
                                                      sv=3)))
    assert oks(out["van-1"]) == [[1, "r1", 1]]
    cli = other_process(store)
    fired = before_next_transaction(store, lambda: schema_history.rollback(cli, now()),
                                    monkeypatch)
    batch = [task(2, "t-1", note="two"), task(3, "t-2", note="three")]
    out = by_device(engine.handle_up("van-1", changes("van-1", batch, sv=3)))
    assert fired == [1]
    # Written under the version just rolled back: kept on the device (transient), which
    # is told to go back to version 2 and sends them again in its names.
    refused = rejections(out["van-1"])
    assert [(r["n"], r["code"], r["perm"]) for r in refused] == [
        (2, "schema_version", False), (3, "schema_version", False)]
    assert fields_of(store, "t-1") == {"route": "r1", "notes": "one"}
    # The device is told to go back to version 2 at the next tick.
    pushed = [m for m in by_device(engine.tick()).get("van-1", []) if m["type"] == "schema"]
    assert [m["sv"] for m in pushed] == [2]
    out = by_device(engine.handle_up("van-1", changes("van-1", [
        task(2, "t-1", notes="two"), task(3, "t-2", notes="three")], sv=2)))
    assert oks(out["van-1"]) == [[2, "r1", 2], [3, "r1", 3]]
    assert fields_of(store, "t-1") == {"route": "r1", "notes": "two"}
    assert fields_of(store, "t-2") == {"route": "r1", "notes": "three"}
    assert dead_letters(store) == []
    assert engine.catalog.version == 2


def test_catchup_read_after_a_publish_is_projected_with_it(
        store_factory: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device still on version 2 asks for a catch-up; version 3 (a rename) is published
    after the server last reloaded but before it reads the page: the page must still
    carry the device's name for the field."""
    store = store_factory()
    publish_all(store, V1, V2)
    engine, _, now = make_engine(tmp_path, {"van-1": ["r1"], "van-2": ["r1"]},
                                 catalog=catalog(V2), store=store)
    engine.handle_up("van-1", changes("van-1", [task(1, "t-1", notes="one")], sv=2))
    engine.handle_up("van-2", hello("van-2", sv=2))
    cli = other_process(store)
    real = catchup_mod.answer_all
    fired: list[int] = []

    def answer_all(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(1)
            schema_history.publish(cli, V3, "v3.toml", now())
        return real(*args, **kwargs)

    monkeypatch.setattr(catchup_mod, "answer_all", answer_all)
    out = by_device(engine.handle_up("van-2", catchup("van-2", {"r1": 0})))
    assert fired == [1]
    pages = of_type(out["van-2"], "page")
    assert [r["k"] for p in pages for r in p["recs"]] == ["t-1"]
    assert pages[0]["recs"][0]["f"] == {"route": "r1", "notes": "one"}
    assert engine.catalog.version == 3


# ---------------------------------------------------------------- two servers, PostgreSQL


@pytest.fixture
def pg_stores(pg_database: str) -> Iterator[Callable[[], Store]]:
    """Store objects on one database: each one a server (or the CLI) of its own."""
    from broker.server.store.postgres import PostgresStore

    opened: list[Store] = []

    def open_one() -> Store:
        opened.append(PostgresStore(pg_database))
        return opened[-1]

    try:
        yield open_one
    finally:
        for store in opened:
            store.close()


def waiting_for_schema_lock(store: Store) -> bool:
    """Whether some session waits for an advisory lock (the publish, behind a merge)."""
    url = store.url  # type: ignore[attr-defined]
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                           "AND NOT granted").fetchone()
    return bool(row and row[0])


def inside_next_transaction(store: Store, action: Callable[[], Any],
                            monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Run `action` once, inside the server's next write transaction, after it merged
    (its writes not sent yet) and before it commits."""
    real = store.transact
    fired: list[int] = []

    def transact(fn: Callable[[WriteTxn], Any]) -> Any:
        def held(txn: WriteTxn) -> Any:
            result = fn(txn)
            if not fired:
                fired.append(1)
                action()
            return result
        return real(held)

    monkeypatch.setattr(store, "transact", transact)
    return fired


def test_two_servers_on_one_postgres_publish_and_rollback_while_a_device_streams(
        tmp_path: Path, pg_stores: Callable[[], Store],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cli = pg_stores()
    publish_all(cli, V1, V2)
    a, store_a, now = make_engine(tmp_path / "a", {"van-1": ["r1"], "van-2": ["r1"]},
                                  catalog=catalog(V2), store=pg_stores())
    b = Engine(store_b := pg_stores(), catalog(V2), a.config, now)
    assert oks(by_device(a.handle_up("van-1", changes("van-1", [
        task(1, "t-1", notes="one")], sv=2)))["van-1"]) == [[1, "r1", 1]]

    # 1. Server A merges `notes` (version 2) and is held before its commit; the publish
    #    of version 3 must wait for it, then carry A's write to `note`.
    publisher: list[threading.Thread] = []
    failures: list[BaseException] = []

    def start_publish(run: Callable[[], Any]) -> None:
        def target() -> None:
            try:
                run()
            except BaseException as exc:  # reported by the assertion below
                failures.append(exc)
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        publisher.append(thread)
        deadline = time.monotonic() + 20
        while not waiting_for_schema_lock(cli):
            assert thread.is_alive(), f"the publish did not wait for the merge: {failures}"
            assert time.monotonic() < deadline, "the publish never queued for the lock"
            time.sleep(0.01)

    fired = inside_next_transaction(
        store_a, lambda: start_publish(lambda: schema_history.publish(cli, V3, "v3.toml",
                                                                      now())), monkeypatch)
    out = by_device(a.handle_up("van-1", changes("van-1", [task(2, "t-1", notes="two")],
                                                 sv=2)))
    assert fired == [1] and oks(out["van-1"]) == [[2, "r1", 2]]
    publisher[0].join(30)
    assert not publisher[0].is_alive() and failures == []
    assert fields_of(cli, "t-1") == {"route": "r1", "note": "two"}
    monkeypatch.undo()

    # 2. Server B, loaded at version 2, merges the device's next group (still `notes`)
    #    under version 3.
    out = by_device(b.handle_up("van-2", changes("van-2", [
        task(1, "t-4", notes="b-one"), task(2, "t-3", notes="b-two")], sv=2)))
    assert oks(out["van-2"]) == [[1, "r1", 3], [2, "r1", 4]] and rejections(out["van-2"]) == []
    assert b.catalog.version == 3
    assert fields_of(cli, "t-4") == {"route": "r1", "note": "b-one"}
    assert fields_of(cli, "t-3") == {"route": "r1", "note": "b-two"}

    # 3. Roll back while B is held inside a merge of `note` (version 3): the rollback
    #    waits, then carries B's write back to `notes`; A merges the next group under
    #    version 2.
    publisher.clear()
    fired = inside_next_transaction(
        store_b, lambda: start_publish(lambda: schema_history.rollback(cli, now())),
        monkeypatch)
    out = by_device(b.handle_up("van-2", changes("van-2", [task(3, "t-3", note="b-three")],
                                                 sv=3)))
    assert fired == [1] and oks(out["van-2"]) == [[3, "r1", 5]]
    publisher[0].join(30)
    assert not publisher[0].is_alive() and failures == []
    assert fields_of(cli, "t-3") == {"route": "r1", "notes": "b-three"}
    monkeypatch.undo()
    out = by_device(a.handle_up("van-1", changes("van-1", [task(3, "t-1", notes="a-three")],
                                                 sv=2)))
    assert oks(out["van-1"]) == [[3, "r1", 6]] and a.catalog.version == 2
    for key in ("t-1", "t-3", "t-4"):
        assert "note" not in fields_of(cli, key)
    assert fields_of(cli, "t-1")["notes"] == "a-three"
    assert dead_letters(cli) == []


def test_publish_carries_pending_notices_and_a_stale_drain_waits(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """A delta an operator tool queued (a notice) before the publish goes out in the new
    names; one naming an older version of its record is dropped; a server that has not
    reloaded drains nothing."""
    store = store_factory()
    publish_all(store, V1, V2)
    engine, _, now = make_engine(tmp_path, {"van-1": ["r1"]}, catalog=catalog(V2), store=store)
    engine.handle_up("van-1", changes("van-1", [task(1, "t-1", notes="one"),
                                                task(2, "t-1", notes="two")], sv=2))
    with store.read() as txn:
        record = merge.from_json(txn.get_record("tasks", "t-1"))
    current = merge.to_rec(record)
    older = {**current, "q": record.q - 1}
    store.transact(lambda t: (t.add_notice(Notice(0, "r1", record.q - 1, older)),
                              t.add_notice(Notice(0, "r1", record.q, current))))
    loaded = engine.registry.generation
    schema_history.publish(store, V3, "v3.toml", now())
    with store.read() as txn:
        notices = txn.notices(10)
    assert [(n.q, n.rec["f"]) for n in notices] == [(record.q, {"route": "r1", "note": "two"})]
    assert drain_notices(store, Fanout(engine.registry, engine.presence),
                         generation=loaded) == 0
    with store.read() as txn:
        assert len(txn.notices(10)) == 1
