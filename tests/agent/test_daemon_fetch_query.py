"""The daemon sends `fetchq` only to a server that agreed to `fetch_query`, keeps the
request until an answer ends it (resending it meanwhile), applies the `fetchedq`
answers, and survives hostile ones (PROTOCOL.md §7.14.1). Over a real broker, with a
scripted server (a plain paho client)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent import fetch_queries
from agent.daemon import AgentDaemon
from agent.errors import BadRequest
from schemas.collection import example_catalog_path, load_catalog
from tests.fixtures_brokers import PREFIX, USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_until
from waystation.config import AgentConfig

CATALOG = load_catalog(example_catalog_path())
DEV = "van-12"
D = "depot-7"
UP, DOWN = f"{PREFIX}/{DEV}/up", f"{PREFIX}/{DEV}/down"


def _rec(k: str, q: int, status: str = "delivered") -> dict[str, Any]:
    return {"c": "tasks", "k": k, "s": D, "q": q, "f": {"route": D, "status": status},
            "h": {"route": f"01900000000{q:01x}0000:van-7",
                  "status": f"01900000000{q:01x}0000:van-7"}}


@pytest.fixture
def daemon(broker: BrokerProcess, tmp_path: Path) -> Iterator[AgentDaemon]:
    cfg = AgentConfig.model_validate({
        "device_id": DEV, "data_dir": str(tmp_path / "agent"), "scopes": [D],
        "mqtt": {"port": broker.port, "password": USERS[DEV]},
        "sync": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "ack_timeout_s": 0.4}})
    d = AgentDaemon(cfg, CATALOG, env={})
    yield d
    d.stop(drain_s=0.5)


def _up(server: RecordingClient, kind: str) -> list[dict[str, Any]]:
    msgs = [orjson.loads(m.payload) for m in server.received(UP)]
    return [m for m in msgs if m["type"] == kind]


def _send(server: RecordingClient, msg: dict[str, Any] | bytes) -> None:
    server.publish(DOWN, msg if isinstance(msg, bytes) else orjson.dumps({"v": 1, **msg}))


def test_fetch_query_waits_for_the_capability_then_applies_the_answer(
        daemon: AgentDaemon, server: RecordingClient) -> None:
    daemon.start()
    wait_until(lambda: _up(server, "hello") or None, 15, message="hello")
    assert "fetch_query" in _up(server, "hello")[0]["caps"]
    asked = daemon.agent.fetch_query("tasks", {"status": "delivered"}, limit=2)
    assert asked.state == "waiting" and asked.records == []
    _send(server, {"type": "welcome", "caps": ["fetch", "txn"], "srv": "old/1"})
    wait_until(lambda: daemon.sync.server_caps is not None, 10, message="welcome applied")
    daemon.wake()
    wait_until(lambda: daemon.stats.loops > 20, 10)
    assert _up(server, "fetchq") == []  # an older server never sees one
    assert daemon.agent.status().fetch_queries == 1
    _send(server, {"type": "welcome", "caps": ["fetch", "fetch_query"], "srv": "new/1"})
    [req] = wait_until(lambda: _up(server, "fetchq") or None, 10, message="fetchq sent")
    assert req == {"type": "fetchq", "v": 1, "dev": DEV, "req": asked.id, "c": "tasks",
                   "w": {"status": {"eq": "delivered"}}, "lim": 2}
    # Hostile or broken answers: ignored, counted, nothing applied.
    for bad in (b"{not json",
                {"type": "fetchedq", "req": asked.id, "c": "tasks", "recs": [{"c": "x"}],
                 "end": True},
                {"type": "fetchedq", "req": asked.id, "c": "tasks", "recs": [],
                 "end": True, "stop": "forever"},
                {"type": "fetchedq", "req": asked.id, "c": "tasks", "recs": [],
                 "end": True, "next": "a\u0000b"}):
        _send(server, bad)
    wait_until(lambda: daemon.stats.bad_messages >= 4, 10, message="bad answers counted")
    # An answer to a request this device never made changes nothing.
    _send(server, {"type": "fetchedq", "req": "q-other", "c": "tasks",
                   "recs": [_rec("t-9", 9)], "end": True})
    # The real answer, in two messages.
    _send(server, {"type": "fetchedq", "req": asked.id, "c": "tasks",
                   "recs": [_rec("t-1", 3)], "end": False})
    _send(server, {"type": "fetchedq", "req": asked.id, "c": "tasks",
                   "recs": [_rec("t-2", 4)], "end": True, "next": "t-2", "stop": "limit",
                   "scanned": 5})
    done = daemon.agent.fetch_query_status(asked.id, wait_s=10)
    assert done.state == "done" and [r.key for r in done.records] == ["t-1", "t-2"]
    assert done.next == "t-2" and done.stop == "limit" and done.scanned == 5
    assert daemon.agent.status().fetch_queries == 0
    assert daemon.agent.get("tasks", "t-9") is None
    record = daemon.agent.get("tasks", "t-1")
    assert record is not None and record.fields["status"] == "delivered" and record.version == 3


def test_unanswered_request_is_sent_again(daemon: AgentDaemon,
                                          server: RecordingClient) -> None:
    """No answer within the resend delay: the same request (same id) goes again; a
    server `err` settles it as failed."""
    daemon.start()
    wait_until(lambda: _up(server, "hello") or None, 15, message="hello")
    _send(server, {"type": "welcome", "caps": ["fetch_query"], "srv": "new/1"})
    wait_until(lambda: daemon.sync.server_caps is not None, 10, message="welcome applied")
    asked = daemon.agent.fetch_query("tasks", {"eta": {"gte": 5}})
    [first] = wait_until(lambda: _up(server, "fetchq") or None, 10, message="sent")
    # Age the request past the resend delay: the next turn sends it again.
    daemon.sync.core.write(lambda work: work.tx.put(
        fetch_queries.DB, asked.id.encode(),
        {**work.tx.get(fetch_queries.DB, asked.id.encode()), "sent": 0}))
    daemon.wake()
    again = wait_until(lambda: _up(server, "fetchq")[1:] or None, 10, message="resent")
    assert again[0]["req"] == first["req"] == asked.id
    _send(server, {"type": "fetchedq", "req": asked.id, "c": "tasks", "recs": [],
                   "end": True, "err": {"code": "unknown_field", "reason": "no eta here"}})
    failed = daemon.agent.fetch_query_status(asked.id, wait_s=10)
    assert failed.state == "failed" and failed.error == {"code": "unknown_field",
                                                         "reason": "no eta here"}


@pytest.mark.parametrize(("where", "options"), [
    ({"nope": 1}, {}),
    ({"eta": "soon"}, {}),
    ({"proof": "x"}, {}),
    ({"labels": {"gt": "a"}}, {}),
    ({"eta": {"gt": 2**60}}, {}),
    ({"eta": [1, 2]}, {}),
    ({f"f{i}": 1 for i in range(17)}, {}),
    ({}, {"limit": 0}),
    ({}, {"limit": 1001}),
    ({}, {"after": "a\u0000b"}),
    ({}, {"after": "x" * 300}),
    ({}, {"wait_s": -1}),
])
def test_bad_queries_are_refused_before_queueing(daemon: AgentDaemon, where: dict[str, Any],
                                                 options: dict[str, Any]) -> None:
    with pytest.raises(BadRequest) as err:
        daemon.agent.fetch_query("tasks", where, **options)
    assert str(err.value)
    assert daemon.agent.status().fetch_queries == 0


def test_unknown_collection_is_refused(daemon: AgentDaemon) -> None:
    with pytest.raises(BadRequest) as err:
        daemon.agent.fetch_query("nothing", {})
    assert err.value.code == "unknown_collection"
