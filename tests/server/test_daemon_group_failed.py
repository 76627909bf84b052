"""The merge server daemon when the engine raises for a whole group (a store or
programming failure the engine did not turn into replies): nothing is published for
that group, the operator sees `group_failed`, and the devices' resends are applied once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from broker.server.daemon import MergeServer
from broker.server.registry import add_device
from tests.server.conftest import StoreFactory
from tests.server.helpers import CATALOG, T0, by_device, changes, oks, task
from waystation.config import ServerConfig


def test_group_failing_in_the_engine_publishes_nothing_and_resends_apply_once(
        tmp_path: Path, store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_factory()
    add_device(store, "van-1", ["r1"], T0)
    cfg = ServerConfig.model_validate({"data_dir": str(tmp_path), "mqtt": {"password": "x"}})
    server = MergeServer(cfg, CATALOG, env={}, store=store)
    real = server.engine.handle_many
    failures = [RuntimeError("injected: engine bug")]

    def flaky(items: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(items)

    monkeypatch.setattr(server.engine, "handle_many", flaky)
    group = [("van-1", changes("van-1", [task(1, "a"), task(2, "b")]))]
    with capture_logs() as logs:
        assert server._handle(group) == []
    assert [e["messages"] for e in logs if e["event"] == "group_failed"] == [1]
    with store.read() as txn:
        assert txn.get_record("tasks", "a") is None
    out = by_device(server._handle(group))          # the device resends after its timeout
    assert [ok[0] for ok in oks(out["van-1"])] == [1, 2]
    out = by_device(server._handle(group))          # and once more: acked, not re-applied
    assert [ok[0] for ok in oks(out["van-1"])] == [1, 2]
    assert server.engine.counters["applied"] == 2
    assert server.engine.counters["duplicates"] == 2
