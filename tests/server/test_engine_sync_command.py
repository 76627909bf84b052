"""The `sync` command (PROTOCOL.md §7.9) reaches only devices that agreed the `sync`
capability: a v1 device never gets a message it cannot read. Both backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from broker.server.engine import Engine
from broker.server.registry import deliverable, issue_command
from broker.server.store.base import CommandRow, Store
from tests.server.conftest import StoreFactory
from tests.server.helpers import T0, by_device, make_engine, of_type

DEVICES = {"van-1": ["r1"]}


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory())
    yield engine, store


def hello(caps: Any = None, done: list[str] | None = None) -> bytes:
    msg: dict[str, Any] = {"type": "hello", "v": 1, "dev": "van-1", "agent": "t/1", "sv": 1}
    if caps is not None:
        msg["caps"] = caps
    if done:
        msg["done"] = done
    return orjson.dumps(msg)


def test_deliverable() -> None:
    def row(cmd: str) -> CommandRow:
        return CommandRow(f"{cmd}-1", "van-1", cmd, {}, created_ms=T0)
    assert deliverable(row("ping"), ()) and deliverable(row("wipe"), ())
    assert not deliverable(row("sync"), ()) and deliverable(row("sync"), ("sync",))


def test_sync_command_only_for_devices_that_agreed(env: tuple[Engine, Store]) -> None:
    """A v1 hello gets the ping but not the sync; a hello offering `sync` gets both; once
    reported done, neither comes again."""
    engine, store = env
    sync = issue_command(store, "van-1", "sync", T0)
    ping = issue_command(store, "van-1", "ping", T0 + 1)
    old = of_type(by_device(engine.handle_up("van-1", hello()))["van-1"], "command")
    assert [c["id"] for c in old] == [ping.id]
    new = of_type(by_device(engine.handle_up("van-1", hello(["sync"])))["van-1"], "command")
    assert sorted(c["id"] for c in new) == sorted([sync.id, ping.id])
    assert {c["cmd"] for c in new} == {"sync", "ping"}
    done = by_device(engine.handle_up("van-1", hello(["sync"], [sync.id, ping.id])))
    assert of_type(done.get("van-1", []), "command") == []
