"""A running agent daemon carrying out the server's commands mid-work, and catching up
again when a checkpoint says it is behind — over a real broker, the server scripted
(tests/agent/test_daemon_catchup.py's fixtures)."""

from __future__ import annotations

from typing import Any

import orjson

from agent.daemon import AgentDaemon
from tests.agent import test_daemon_catchup as kit
from tests.agent.test_daemon_catchup import UP, _catchups, _rec, _send, _wait_catchups
from tests.helpers import RecordingClient, wait_until

# the same broker and scripted-server fixtures as the catch-up tests
setup = kit.setup


def _up(server: RecordingClient, kind: str) -> list[dict[str, Any]]:
    msgs = [orjson.loads(m.payload) for m in server.received(UP)]
    return [m for m in msgs if m["type"] == kind]


def _wait_up(server: RecordingClient, kind: str, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = wait_until(
        lambda: (lambda m: m if len(m) >= count else None)(_up(server, kind)), 15,
        message=f"{count} {kind} messages")
    return found


def _finish_first_catchup(daemon: AgentDaemon, server: RecordingClient) -> None:
    [first] = _wait_catchups(server, 1)
    _send(server, {"type": "checkpoint", "req": first["req"],
                   "cp": {"route-42": 0, "depot-7": 0}})
    assert wait_until(lambda: daemon._catchup is None, 10)


def test_checkpoint_saying_behind_starts_another_catch_up(
        setup: tuple[AgentDaemon, RecordingClient]) -> None:
    """A checkpoint naming a sequence the device has not reached (the pages were lost)
    does not end the catch-up: the daemon asks again from where it is, and the next
    answer completes it."""
    daemon, server = setup
    [first] = _wait_catchups(server, 1)
    _send(server, {"type": "checkpoint", "req": first["req"],
                   "cp": {"route-42": 2, "depot-7": 0}})
    second = _wait_catchups(server, 2)[1]
    assert second["cp"]["route-42"] == 0 and second["req"] != first["req"]
    assert daemon.agent.checkpoints()["route-42"].cp == 0
    _send(server, {"type": "page", "req": second["req"], "s": "route-42", "from": 0, "to": 2,
                   "reset": False, "more": False, "recs": [_rec("t-1", 1), _rec("t-2", 2)]})
    _send(server, {"type": "checkpoint", "req": second["req"],
                   "cp": {"route-42": 2, "depot-7": 0}})
    assert wait_until(lambda: daemon._catchup is None, 10)
    assert daemon.agent.checkpoints()["route-42"].cp == 2
    assert sorted(r.key for r in daemon.agent.list("tasks")) == ["t-1", "t-2"]
    assert len(_catchups(server)) == 2


def test_resync_mid_work_restarts_catch_up_and_resends_unacked_changes(
        setup: tuple[AgentDaemon, RecordingClient]) -> None:
    """A resync arriving while a change is in flight: the daemon drops its base and
    checkpoints, forgets what was in flight and sends it again (nothing lost), catches up
    from zero and confirms the command in its hello; the same command again is a no-op."""
    daemon, server = setup
    _finish_first_catchup(daemon, server)
    daemon.agent.put("tasks", "mine", {"route": "route-42", "status": "new"})
    [sent] = _wait_up(server, "changes", 1)
    assert [c["n"] for c in sent["ch"]] == [1]
    hellos = len(_up(server, "hello"))
    _send(server, {"type": "command", "id": "cmd-resync-1", "cmd": "resync"})
    again = _wait_catchups(server, 2)[1]
    assert again["cp"] == {"route-42": 0, "depot-7": 0}
    resent = _wait_up(server, "changes", 2)[1]
    assert [c["n"] for c in resent["ch"]] == [1]
    hello = _wait_up(server, "hello", hellos + 1)[-1]
    assert "cmd-resync-1" in hello["done"]
    assert daemon.agent.get("tasks", "mine") is not None   # the pending write survives
    _send(server, {"type": "ack", "ok": [[1, "route-42", 1]]})
    assert wait_until(lambda: daemon.agent.status().pending == 0, 10)
    _send(server, {"type": "checkpoint", "req": again["req"],
                   "cp": {"route-42": 1, "depot-7": 0}})
    assert wait_until(lambda: daemon._catchup is None, 10)
    catchups = len(_catchups(server))
    _send(server, {"type": "command", "id": "cmd-resync-1", "cmd": "resync"})   # redelivered
    wait_until(lambda: len(_up(server, "hello")) >= hellos + 2, 10)
    assert len(_catchups(server)) == catchups     # not carried out twice
    assert daemon.agent.get("tasks", "mine") is not None


def test_wipe_mid_work_empties_the_store_and_catches_up_from_zero(
        setup: tuple[AgentDaemon, RecordingClient]) -> None:
    """A wipe arriving while a change is in flight: the local data is gone (the
    unsynced change too: the operator ordered it), nothing in flight is resent, the
    daemon confirms the wipe in its hello and catches up from zero."""
    daemon, server = setup
    _finish_first_catchup(daemon, server)
    daemon.agent.put("tasks", "doomed", {"route": "route-42", "status": "new"})
    _wait_up(server, "changes", 1)
    hellos = len(_up(server, "hello"))
    _send(server, {"type": "command", "id": "cmd-wipe-1", "cmd": "wipe"})
    hello = _wait_up(server, "hello", hellos + 1)[-1]
    assert "cmd-wipe-1" in hello["done"]
    assert daemon.agent.status().online, "still connected: the new store says so at once"
    again = _wait_catchups(server, 2)[1]
    assert again["cp"] == {"route-42": 0, "depot-7": 0}
    assert daemon.agent.get("tasks", "doomed") is None
    assert daemon.agent.status().pending == 0
    _send(server, {"type": "page", "req": again["req"], "s": "route-42", "from": 0, "to": 1,
                   "reset": False, "more": False, "recs": [_rec("t-1", 1)]})
    _send(server, {"type": "checkpoint", "req": again["req"],
                   "cp": {"route-42": 1, "depot-7": 0}})
    assert wait_until(lambda: daemon._catchup is None, 10)
    assert [r.key for r in daemon.agent.list("tasks")] == ["t-1"]
    assert len(_up(server, "changes")) == 1   # the wiped change was never sent again
