"""Server-side retention per collection (broker.server.expiry): records the operator
lets expire are deleted by the server like a device's delete -- a tombstone, a delta to
online devices, catch-up for the others; on every store backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.server.engine import Engine
from broker.server.registry import add_device
from broker.server.store.base import Store
from broker.server.store.lmdb_store import LmdbStore
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    CATALOG,
    FakeTime,
    by_device,
    catchup,
    changes,
    hp,
    of_type,
    status,
    task,
)
from waystation import merge
from waystation.config import ServerConfig
from waystation.errors import ConfigError

DAY_MS = 86_400_000
RULES = {"retention": {"interval_s": 60, "batch": 2, "collections": {
    "tasks": {"after": "30d", "when": {"status": ["delivered"]}}}}}
DEVICES = {"van-1": ["r1"], "van-2": ["r1"]}


def _engine(tmp: Path, store: Store, retention: dict[str, Any],
            devices: dict[str, list[str]]) -> tuple[Engine, Store, FakeTime]:
    time = FakeTime()
    for dev, scopes in devices.items():
        add_device(store, dev, scopes, time())
    cfg = ServerConfig.model_validate({"data_dir": str(tmp), "retention": retention})
    return Engine(store, CATALOG, cfg, time), store, time


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store, FakeTime]]:
    yield _engine(tmp_path, store_factory(), RULES["retention"], DEVICES)


def _record(store: Store, k: str) -> Any:
    with store.read() as txn:
        raw = txn.get_record("tasks", k)
    return None if raw is None else merge.from_json(raw)


def _tick_until_quiet(engine: Engine) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for _ in range(20):
        out.extend(engine.tick())
        if not engine.expiry.running:
            break
    return out


def test_due_records_expire_as_deletes(env: tuple[Engine, Store, FakeTime]) -> None:
    """Delivered tasks unchanged for 30 days are deleted at a new sequence, with a
    tombstone; the others stay; online devices get a delta, the rest catch up."""
    engine, store, time = env
    engine.handle_status("van-2", status("van-2"))
    engine.handle_up("van-1", changes("van-1", [
        task(1, "t-old", status="delivered"), task(2, "t-out", status="out"),
        task(3, "t-new", status="delivered"), task(4, "t-4", status="delivered"),
        task(5, "t-5", status="delivered")]))
    time.now += 20 * DAY_MS
    engine.handle_up("van-1", changes("van-1", [task(6, "t-new", status="delivered",
                                                     notes="touched", create=False,
                                                     h=hp(time.now))]))
    seq = _seq(store)
    time.now += 11 * DAY_MS
    out = by_device(_tick_until_quiet(engine))
    assert _record(store, "t-old").deleted and _record(store, "t-4").deleted
    assert _record(store, "t-5").deleted
    assert not _record(store, "t-out").deleted and not _record(store, "t-new").deleted
    assert _seq(store) == seq + 3
    with store.read() as txn:
        assert len(txn.tombs("r1", 10)) == 3
    deltas = of_type(out.get("van-2", []), "delta")
    gone = {rec["k"] for d in deltas for rec in d["d"] if rec.get("x")}
    assert gone == {"t-old", "t-4", "t-5"}
    # A device that was offline learns it by catch-up.
    answer = by_device(engine.handle_up("van-1", catchup("van-1", {"r1": seq})))["van-1"]
    (page,) = of_type(answer, "page")
    assert {r["k"] for r in page["recs"] if r.get("x")} == {"t-old", "t-4", "t-5"}
    # Nothing more to do: the next pass expires nothing.
    time.now += 2 * 3600 * 1000
    _tick_until_quiet(engine)
    assert _seq(store) == seq + 3


def test_a_device_may_write_an_expired_record_again(env: tuple[Engine, Store, FakeTime]
                                                     ) -> None:
    """An expired record is deleted, not forbidden: a later write re-creates it."""
    engine, store, time = env
    engine.handle_up("van-1", changes("van-1", [task(1, "t-1", status="delivered")]))
    time.now += 31 * DAY_MS
    _tick_until_quiet(engine)
    assert _record(store, "t-1").deleted
    time.now += 1000
    engine.handle_up("van-1", changes("van-1", [task(2, "t-1", status="out", h=hp(time.now))]))
    assert not _record(store, "t-1").deleted


def _seq(store: Store) -> int:
    with store.read() as txn:
        return txn.scope_seq("r1")


@pytest.mark.parametrize(("rules", "needle"), [
    ({"nope": {"after": "1d"}}, "no collection 'nope'"),
    ({"tasks": {"after": "1d", "when": {"colour": ["red"]}}}, "not a field"),
])
def test_rules_naming_what_the_schema_lacks_are_refused(tmp_path: Path, rules: Any,
                                                        needle: str) -> None:
    """A rule for an unknown collection or field stops the server with a clear error."""
    with pytest.raises(ConfigError, match=needle):
        _engine(tmp_path, LmdbStore(tmp_path), {"collections": rules}, {})


@pytest.mark.parametrize("bad", [
    {"collections": {"tasks": {"after": "7w"}}},
    {"collections": {"tasks": {}}},
    {"interval_s": 0},
    {"batch": 0},
    {"collections": {"tasks": {"after": "1d", "when": {"status": "delivered"}}}},
])
def test_bad_retention_config_is_refused(bad: dict[str, Any]) -> None:
    """Wrong [retention] tables are refused when the config is read."""
    with pytest.raises(ValueError, match="retention"):
        ServerConfig.model_validate({"retention": bad})
