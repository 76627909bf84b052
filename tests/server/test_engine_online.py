"""What an online group of one message costs the store, and what it still guarantees
(`broker.server.engine_txn`): no registry read before the transaction (registry changes
are found by the guard inside it), and contact times written at the next tick."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.server.engine import Engine
from broker.server.registry import add_device, set_scopes
from broker.server.store.base import DeviceRow, Store
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    T0,
    FakeTime,
    by_device,
    changes,
    hello,
    make_engine,
    oks,
    rejections,
    task,
)


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory
        ) -> Iterator[tuple[Engine, Store, FakeTime]]:
    engine, store, now = make_engine(tmp_path, {"van-1": ["r1"]}, store=store_factory())
    yield engine, store, now


def row(store: Store, dev: str) -> DeviceRow:
    with store.read() as txn:
        found = txn.get_device(dev)
    assert found is not None, dev
    return found


def test_a_device_enrolled_after_the_registry_was_loaded_syncs_at_once(
        env: tuple[Engine, Store, FakeTime]) -> None:
    """Enrolled by the CLI (another process) after the engine loaded its registry: its
    first batch is applied, not refused as from an unknown device (the transaction
    finds the generation moved, reloads and parses the group again)."""
    engine, store, now = env
    add_device(store, "van-9", ["r1"], now())
    out = by_device(engine.handle_up("van-9", changes("van-9", [task(1, "a")])))
    assert oks(out["van-9"]) == [[1, "r1", 1]]
    assert rejections(out["van-9"]) == []
    assert engine.counters["schema_redos"] == 1
    out = by_device(engine.handle_up("van-9", changes("van-9", [task(2, "b")])))
    assert oks(out["van-9"]) == [[2, "r1", 2]]
    assert engine.counters["schema_redos"] == 1  # nothing moved since


def test_a_scope_granted_between_groups_counts_for_the_next_group(
        env: tuple[Engine, Store, FakeTime]) -> None:
    engine, store, _ = env
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "a", "r2")])))
    assert [r["code"] for r in rejections(out["van-1"])] == ["scope_denied"]
    set_scopes(store, "van-1", ["r1", "r2"])
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(2, "b", "r2")])))
    assert oks(out["van-1"]) == [[2, "r2", 1]]


def test_contact_times_are_written_at_the_next_tick(
        env: tuple[Engine, Store, FakeTime]) -> None:
    """A batch does not rewrite its device's row: the contact times wait in memory for
    the tick; a hello meanwhile writes them with its own fields, and a later tick does
    not put an older time back."""
    engine, store, now = env
    now.now = T0 + 1000
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "a")])))
    assert oks(out["van-1"]) == [[1, "r1", 1]]
    before = row(store, "van-1")
    assert (before.last_seen_ms, before.synced_ms) == (0, 0)
    engine.tick()
    after = row(store, "van-1")
    assert (after.last_seen_ms, after.synced_ms) == (T0 + 1000, T0 + 1000)

    now.now = T0 + 2000
    engine.handle_up("van-1", changes("van-1", [task(2, "b")]))
    now.now = T0 + 3000
    engine.handle_up("van-1", hello("van-1", z=True))
    seen = row(store, "van-1")
    assert seen.z and seen.last_seen_ms == T0 + 3000 and seen.synced_ms == T0 + 2000
    now.now = T0 + 4000
    engine.tick()
    assert row(store, "van-1") == seen


def test_flush_writes_the_contact_times_without_a_tick(
        env: tuple[Engine, Store, FakeTime]) -> None:
    """What the daemon does when it stops: nothing waits for a tick that never comes."""
    engine, store, now = env
    now.now = T0 + 1000
    engine.handle_up("van-1", changes("van-1", [task(1, "a")]))
    assert row(store, "van-1").synced_ms == 0
    engine.flush()
    assert (row(store, "van-1").last_seen_ms, row(store, "van-1").synced_ms) == (T0 + 1000,
                                                                                T0 + 1000)
