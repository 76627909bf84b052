"""The daemon sends `fetch` only to a server that agreed to the capability, applies the
`fetched` answers, and survives hostile ones (PROTOCOL.md §7.14). Over a real broker,
with a scripted server (a plain paho client)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.daemon import AgentDaemon
from schemas.collection import example_catalog_path, load_catalog
from tests.fixtures_brokers import PREFIX, USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_until
from waystation.config import AgentConfig

CATALOG = load_catalog(example_catalog_path())
DEV = "van-12"
D = "depot-7"
UP, DOWN = f"{PREFIX}/{DEV}/up", f"{PREFIX}/{DEV}/down"
ACK_TIMEOUT = 0.4
REC = {"c": "tasks", "k": "t-1", "s": D, "q": 7,
       "f": {"route": D, "status": "delivered"},
       "h": {"route": "0190000000070000:van-7", "status": "0190000000070000:van-7"}}




@pytest.fixture
def daemon(broker: BrokerProcess, tmp_path: Path) -> Iterator[AgentDaemon]:
    cfg = AgentConfig.model_validate({
        "device_id": DEV, "data_dir": str(tmp_path / "agent"), "scopes": [D],
        "mqtt": {"port": broker.port, "password": USERS[DEV]},
        "sync": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5,
                 "ack_timeout_s": ACK_TIMEOUT}})
    d = AgentDaemon(cfg, CATALOG, env={})
    yield d
    d.stop(drain_s=0.5)


def _up(server: RecordingClient, kind: str) -> list[dict[str, Any]]:
    msgs = [orjson.loads(m.payload) for m in server.received(UP)]
    return [m for m in msgs if m["type"] == kind]


def _send(server: RecordingClient, msg: dict[str, Any] | bytes) -> None:
    server.publish(DOWN, msg if isinstance(msg, bytes) else orjson.dumps({"v": 1, **msg}))


def test_fetch_waits_for_the_capability_then_applies_the_answer(
        daemon: AgentDaemon, server: RecordingClient) -> None:
    """No `fetch` before a welcome agreeing to it; then one request, whose answer brings
    the record back; hostile answers before it change nothing."""
    daemon.start()
    wait_until(lambda: _up(server, "hello") or None, 15, message="hello")
    assert "fetch" in _up(server, "hello")[0]["caps"]
    daemon.agent.fetch("tasks", ["t-1", "t-2"])
    _send(server, {"type": "welcome", "caps": ["txn"], "srv": "old/1"})  # no fetch
    wait_until(lambda: daemon.sync.server_caps is not None, 10, message="welcome applied")
    daemon.wake()
    wait_until(lambda: daemon.stats.loops > 20, 10)
    assert _up(server, "fetch") == []
    assert daemon.agent.status().fetching == 2
    _send(server, {"type": "welcome", "caps": ["fetch", "txn"], "srv": "new/1"})
    [req] = wait_until(lambda: _up(server, "fetch") or None, 10, message="fetch sent")
    assert req["dev"] == DEV and req["c"] == "tasks" and sorted(req["k"]) == ["t-1", "t-2"]
    # Hostile or broken answers: ignored, counted, nothing applied.
    for bad in (b"{not json", {"type": "fetched", "req": "x", "c": "tasks",
                               "recs": [{"c": "tasks"}], "miss": []},
                {"type": "fetched", "req": "x", "c": "tasks", "recs": [],
                 "miss": [f"k{i}" for i in range(101)]}):
        _send(server, bad)
    wait_until(lambda: daemon.stats.bad_messages >= 3, 10, message="bad answers counted")
    assert daemon.agent.status().fetching == 2
    _send(server, {"type": "fetched", "req": req["req"], "c": "tasks", "recs": [REC],
                   "miss": ["t-2"]})
    wait_until(lambda: daemon.agent.status().fetching == 0, 10, message="answer applied")
    record = daemon.agent.get("tasks", "t-1")
    assert record is not None and record.fields == REC["f"] and record.version == 7
    assert daemon.agent.get("tasks", "t-2") is None
