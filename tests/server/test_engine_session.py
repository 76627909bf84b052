"""Hello, commands, presence and the periodic tick (registry reload, resolutions)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.errors import ConflictClosed, ConflictNotFound, InvalidArgument
from broker.server.engine import Engine
from broker.server.operations import resolve_conflict
from broker.server.registry import add_device, issue_command, remove_device, set_scopes
from broker.server.store.base import Store
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    CATALOG,
    T0,
    by_device,
    changes,
    hello,
    hp,
    make_engine,
    of_type,
    oks,
    status,
    task,
)
from waystation.hlc import SERVER_NODE, Clock

DEVICES = {"van-1": ["r1"], "van-2": ["r1"], "van-3": ["r1"]}


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    """An engine over a fresh store of each backend."""
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory())
    yield engine, store


def test_hello_returns_pending_commands(env: tuple[Engine, Store]) -> None:
    """hello is answered with every command not yet reported done; done ones are closed."""
    engine, store = env
    wipe = issue_command(store, "van-1", "wipe", T0)
    ping = issue_command(store, "van-1", "ping", T0 + 1)
    issue_command(store, "van-2", "resync", T0)
    out = by_device(engine.handle_up("van-1", hello("van-1")))
    assert [(m["type"], m["id"], m["cmd"]) for m in out["van-1"]] == [
        ("command", wipe.id, "wipe"), ("command", ping.id, "ping")]
    out = by_device(engine.handle_up("van-1", hello("van-1", done=[wipe.id])))
    assert [m["id"] for m in out["van-1"]] == [ping.id]
    with store.read() as txn:
        done = {c.id: c.done_ms for c in txn.commands("van-1")}
    assert done[wipe.id] == T0 and done[ping.id] == 0


def test_hello_records_the_device(env: tuple[Engine, Store]) -> None:
    """hello stores last contact, agent, schema version and compression support."""
    engine, store = env
    assert engine.handle_up("van-1", hello("van-1", z=True, sv=1)) == []
    with store.read() as txn:
        row = txn.get_device("van-1")
    assert row is not None and row.z and row.agent == "test/1" and row.last_seen_ms == T0


def test_presence_is_mirrored_to_the_store(env: tuple[Engine, Store]) -> None:
    """Status changes are flushed to the store for the CLI; a restart starts from the
    recorded presence, which the replayed statuses then correct."""
    engine, store = env
    engine.handle_status("van-1", status("van-1"))
    engine.handle_status("van-2", status("van-2"))
    engine.handle_status("van-2", b"")  # a cleared retained status: offline
    assert engine.is_online("van-1") and not engine.is_online("van-2")
    engine.tick()
    with store.read() as txn:
        assert [d.id for d in txn.devices() if d.online] == ["van-1"]
    fresh = Engine(store, CATALOG, engine.config, engine.now_ms)
    assert fresh.is_online("van-1") and not fresh.is_online("van-2")
    fresh.handle_status("van-1", status("van-1", on=False))  # the broker's replay
    assert not fresh.is_online("van-1")
    fresh.tick()
    with store.read() as txn:
        assert [d.id for d in txn.devices() if d.online] == []


def test_tick_reloads_registry_changed_elsewhere(env: tuple[Engine, Store]) -> None:
    """Devices added, re-scoped or removed by the CLI take effect without a restart."""
    engine, store = env
    add_device(store, "van-9", ["r1"], T0)
    assert oks(by_device(engine.handle_up("van-9", changes("van-9", [
        task(1, "t", status="x")])))["van-9"]) == [[1, "r1", 1]]
    set_scopes(store, "van-9", ["r2"])
    out = by_device(engine.handle_up("van-9", changes("van-9", [task(2, "t", status="y")])))
    assert out["van-9"][0]["rj"][0]["code"] == "scope_denied"
    remove_device(store, "van-9")
    out = by_device(engine.handle_up("van-9", changes("van-9", [task(3, "t", status="y")])))
    assert out["van-9"][0]["err"]["code"] == "unknown_device"


def test_tick_sends_new_commands_to_online_devices(env: tuple[Engine, Store]) -> None:
    """A command issued while a device is online reaches it at the next tick, once."""
    engine, store = env
    engine.handle_status("van-1", status("van-1"))
    cmd = issue_command(store, "van-1", "resync", T0)
    issue_command(store, "van-2", "ping", T0)  # offline: waits for its hello
    out = by_device(engine.tick())
    assert [(m["id"], m["cmd"]) for m in out["van-1"]] == [(cmd.id, "resync")]
    assert "van-2" not in out
    issue_command(store, "van-3", "ping", T0)
    assert "van-1" not in by_device(engine.tick())


def _manual_conflict(engine: Engine) -> None:
    engine.handle_up("van-1", changes("van-1", [task(1, "t", address="Dock 1")]))
    engine.handle_up("van-2", changes("van-2", [task(1, "t", h=hp(T0 + 9), create=False,
                                                     address="Dock 2")]))


def test_operator_resolution_is_fanned_out_by_tick(env: tuple[Engine, Store]) -> None:
    """`server resolve` writes a new version; the server's next tick sends it as a delta."""
    engine, store = env
    _manual_conflict(engine)
    for dev in DEVICES:
        engine.handle_status(dev, status(dev))
    with store.read() as txn:
        (row,) = txn.conflicts(open_only=True, limit=10)
    clock = Clock(SERVER_NODE, lambda: T0)
    res = resolve_conflict(store, CATALOG, clock, row.id, "Gate B", T0 + 100)
    assert res.q == 3 and res.closed == (row.id,)
    out = by_device(engine.tick())
    for dev in DEVICES:
        (delta,) = of_type(out[dev], "delta")
        rec = delta["d"][0]
        assert rec["q"] == 3 and rec["f"] == {"address": "Gate B"}
        assert rec["h"]["address"].endswith(":~server") and "cf" not in rec
    assert engine.tick() == []  # sent once
    with pytest.raises(ConflictClosed):
        resolve_conflict(store, CATALOG, clock, row.id, "again", T0 + 200)
    with pytest.raises(ConflictNotFound):
        resolve_conflict(store, CATALOG, clock, 999, "x", T0 + 200)


def test_resolution_value_is_validated(env: tuple[Engine, Store]) -> None:
    """A resolution value of the wrong type is refused and the conflict stays open."""
    engine, store = env
    _manual_conflict(engine)
    with store.read() as txn:
        (row,) = txn.conflicts(open_only=True, limit=10)
    clock = Clock(SERVER_NODE, lambda: T0)
    with pytest.raises(InvalidArgument, match="expected a string"):
        resolve_conflict(store, CATALOG, clock, row.id, 42, T0)
    with store.read() as txn:
        assert txn.get_conflict(row.id).open  # type: ignore[union-attr]
        assert txn.scope_seq("r1") == 2


def test_reset_presence_until_statuses_replay(env: tuple[Engine, Store]) -> None:
    """After a broker reconnect presence restarts empty and is rebuilt from statuses."""
    engine, store = env
    engine.handle_status("van-1", status("van-1"))
    engine.handle_status("van-2", status("van-2"))
    engine.tick()
    engine.reset_presence()
    assert not engine.is_online("van-1")
    engine.handle_status("van-2", status("van-2"))
    engine.tick()
    with store.read() as txn:
        assert [d.id for d in txn.devices() if d.online] == ["van-2"]
    out = by_device(engine.handle_up("van-3", changes("van-3", [task(1, "t", status="x")])))
    assert set(out) == {"van-2", "van-3"}


def test_first_status_of_a_device_enrolled_since_the_last_refresh_counts(
        env: tuple[Engine, Store]) -> None:
    """A device enrolled by another process is online from its first status on, and the
    next change in its scope reaches it as a delta (no dead letter for the status)."""
    engine, store = env
    engine.handle_status("van-1", status("van-1"))
    add_device(store, "van-9", ["r1"], T0)  # `waystation device add`, another process
    engine.handle_status("van-9", status("van-9"))
    assert engine.is_online("van-9")
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "t", status="x")])))
    assert [m["type"] for m in out["van-9"]] == ["delta"]
    with store.read() as txn:
        assert txn.dead_letters(10) == []


def test_command_is_pushed_even_if_a_batch_saw_the_registry_first(
        env: tuple[Engine, Store]) -> None:
    """A command issued between ticks is sent at the next tick, whatever ran in between."""
    engine, store = env
    engine.handle_status("van-1", status("van-1"))
    cmd = issue_command(store, "van-1", "ping", T0)
    engine.handle_up("van-2", changes("van-2", [task(1, "t", status="x")]))
    out = by_device(engine.tick())
    assert [m["id"] for m in of_type(out["van-1"], "command")] == [cmd.id]
