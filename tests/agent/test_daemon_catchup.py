"""The agent daemon follows a catch-up to its end, over a real broker (PROTOCOL.md §7.8,
§9.5). A scripted server (a plain paho client) answers exactly as the merge server does:
no checkpoint for an answer where a scope says `more`, and a checkpoint that lists only
the scopes of the request that completes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.daemon import AgentDaemon
from schemas.collection import example_catalog_path, load_catalog
from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_until
from waystation.config import AgentConfig

CATALOG = load_catalog(example_catalog_path())
DEV = "van-12"
UP, DOWN = f"{PREFIX}/{DEV}/up", f"{PREFIX}/{DEV}/down"
H = "0192f2a4c9b10000:van-7"



@pytest.fixture
def setup(broker: BrokerProcess, tmp_path: Path) -> Iterator[tuple[AgentDaemon, RecordingClient]]:
    """A daemon following route-42 and depot-7, two records a page; a scripted server."""
    cfg = AgentConfig.model_validate({
        "device_id": DEV, "data_dir": str(tmp_path / "agent"),
        "scopes": ["route-42", "depot-7"],
        "mqtt": {"port": broker.port, "password": USERS[DEV]},
        "sync": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "catchup_page": 2,
                 "ack_timeout_s": 120.0}})  # no retry of an unanswered catch-up mid-test
    daemon = AgentDaemon(cfg, CATALOG, env={})
    server = RecordingClient(broker.port, "test-server", SERVER_USER, USERS[SERVER_USER])
    assert server.connect() == "Success"
    assert server.subscribe(UP) == 1
    try:
        daemon.start()
        assert daemon.link.wait_connected(10)
        yield daemon, server
    finally:
        server.close()
        daemon.stop(drain_s=0.5)


def _catchups(server: RecordingClient) -> list[dict[str, Any]]:
    msgs = [orjson.loads(m.payload) for m in server.received(UP)]
    return [m for m in msgs if m["type"] == "catchup"]


def _wait_catchups(server: RecordingClient, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = wait_until(
        lambda: (lambda c: c if len(c) >= count else None)(_catchups(server)), 15,
        message=f"{count} catchup requests")
    return found


def _rec(k: str, q: int) -> dict[str, Any]:
    return {"c": "tasks", "k": k, "s": "route-42", "q": q,
            "f": {"route": "route-42", "status": "out"}, "h": {"route": H, "status": H}}


def _send(server: RecordingClient, msg: dict[str, Any]) -> None:
    server.publish(DOWN, orjson.dumps({"v": 1, **msg}))


def test_scope_left_out_of_every_checkpoint_is_asked_for_again(
        setup: tuple[AgentDaemon, RecordingClient]) -> None:
    """route-42 needs two pages, depot-7 has nothing new: after route-42's checkpoint the
    daemon asks for depot-7 alone, and the catch-up ends with depot-7's checkpoint."""
    daemon, server = setup
    [first] = _wait_catchups(server, 1)
    req = first["req"]
    assert set(first["cp"]) == {"route-42", "depot-7"}
    _send(server, {"type": "page", "req": req, "s": "route-42", "from": 0, "to": 2,
                   "reset": False, "more": True, "recs": [_rec("t-1", 1), _rec("t-2", 2)]})
    cont = _wait_catchups(server, 2)[1]
    assert (cont["req"], cont["cp"], cont["lim"]) == (req, {"route-42": 2}, 2)
    _send(server, {"type": "page", "req": req, "s": "route-42", "from": 2, "to": 3,
                   "reset": False, "more": False, "recs": [_rec("t-3", 3)]})
    _send(server, {"type": "checkpoint", "req": req, "cp": {"route-42": 3}})
    again = _wait_catchups(server, 3)[2]
    assert (again["req"], again["cp"]) == (req, {"depot-7": 0})
    _send(server, {"type": "checkpoint", "req": req, "cp": {"depot-7": 0}})
    assert wait_until(lambda: daemon._catchup is None, 10)
    cps = daemon.agent.checkpoints()
    assert (cps["route-42"].cp, cps["depot-7"].cp) == (3, 0)
    assert len(_catchups(server)) == 3


def test_a_late_copy_of_a_reset_page_starts_a_catch_up(
        setup: tuple[AgentDaemon, RecordingClient]) -> None:
    """A reset page delivered again after its catch-up ended restarts the snapshot; the
    daemon asks again (naming the snapshot) so that a checkpoint can end it."""
    daemon, server = setup
    [first] = _wait_catchups(server, 1)
    req = first["req"]
    page = {"type": "page", "req": req, "s": "route-42", "from": 0, "to": 1, "reset": True,
            "more": False, "recs": [_rec("t-1", 1)]}
    _send(server, page)
    _send(server, {"type": "checkpoint", "req": req, "cp": {"route-42": 1, "depot-7": 0}})
    assert wait_until(lambda: daemon._catchup is None, 10)
    assert not daemon.agent.checkpoints()["route-42"].snapshot
    _send(server, page)  # the broker delivers it again
    second = _wait_catchups(server, 2)[1]
    assert second["snap"] == ["route-42"] and second["req"] != req
    _send(server, {"type": "checkpoint", "req": second["req"],
                   "cp": {"route-42": 1, "depot-7": 0}})
    assert wait_until(lambda: not daemon.agent.checkpoints()["route-42"].snapshot, 10)
    assert daemon.agent.get("tasks", "t-1") is not None


def test_a_checkpoint_ahead_that_no_answer_moves_is_not_asked_for_at_once_again(
        setup: tuple[AgentDaemon, RecordingClient]) -> None:
    """A server that answers with a checkpoint ahead of the device and no page (one from
    before PROTOCOL.md §7.7's page without records, on a scope with no records left) is
    asked once more at once (a page may have been lost), then only at the gap timer's
    pace; the daemon asked again the moment each answer came, ~100 times a second."""
    daemon, server = setup
    answered: set[str] = set()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and len(answered) < 10:
        for req in {c["req"] for c in _catchups(server)} - answered:
            _send(server, {"type": "checkpoint", "req": req,
                           "cp": {"route-42": 1_000_000_000_000, "depot-7": 0}})
            answered.add(req)
        time.sleep(0.01)  # the scripted server's polling interval, not a wait for a result
    assert len(answered) == 2, f"{len(answered)} catch-ups answered in 2 s"
    assert daemon.agent.checkpoints()["route-42"].cp == 0


def test_the_operator_s_sync_command_brings_a_catch_up(
        setup: tuple[AgentDaemon, RecordingClient]) -> None:
    """`sync` (the operator's sync now, and what `device enable` sends a device that was
    disabled: no deltas reached it meanwhile) asks for what others wrote, at once."""
    daemon, server = setup
    [first] = _wait_catchups(server, 1)
    _send(server, {"type": "checkpoint", "req": first["req"],
                   "cp": {"route-42": 0, "depot-7": 0}})
    assert wait_until(lambda: daemon._catchup is None, 10)
    _send(server, {"type": "command", "id": "sync-1", "cmd": "sync"})
    second = _wait_catchups(server, 2)[1]
    assert second["req"] != first["req"]
    assert set(second["cp"]) == {"route-42", "depot-7"}
    _send(server, {"type": "command", "id": "sync-1", "cmd": "sync"})  # a copy: done once

    def reported() -> int:
        msgs = (orjson.loads(m.payload) for m in server.received(UP))
        return sum(1 for m in msgs if m["type"] == "hello" and "sync-1" in m.get("done", []))

    wait_until(lambda: reported() >= 2, 10)
    assert len(_catchups(server)) == 2
