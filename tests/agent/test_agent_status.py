"""Status that tells the truth (issue 8 §4): own superseded writes are not "lost",
offline says why, a dead daemon is not "online", server problems clear once over."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from agent.api import Agent
from schemas import codec, wire
from tests.agent.agentkit import FakeClock
from tests.server.helpers import make_engine

S = "route-42"


def _deliver(agent: Agent, out: list[tuple[str, bytes]]) -> None:
    for dev, payload in out:
        assert dev == agent.device_id
        msg = codec.decode(payload, allowed=wire.DOWN_TYPES)
        if isinstance(msg, wire.Ack):
            agent.sync.apply_ack(msg)
        elif isinstance(msg, wire.Reject):
            agent.sync.apply_reject(msg)


def test_own_superseded_write_is_not_reported_lost(agent: Agent, tmp_path: Path) -> None:
    """Field written twice (n=1, n=2), both acks lost, everything resent: the server
    re-acks with the whole record and n=2's value; nothing is "lost"."""
    engine, _, _ = make_engine(tmp_path / "server", {agent.device_id: [S]})
    agent.put("tasks", "t-1", {"route": S, "status": "100000"})
    agent.put("tasks", "t-1", {"status": "100001"})
    batch = agent.sync.next_batch()
    payload = codec.encode(batch.message(agent.device_id))
    engine.handle_up(agent.device_id, payload)  # applied; the acks are lost
    _deliver(agent, engine.handle_up(agent.device_id, payload))  # the resend: duplicates
    assert agent.status().pending == 0
    assert agent.conflicts() == []
    assert agent.status().lost_writes == 0
    record = agent.get("tasks", "t-1")
    assert record is not None and record.fields["status"] == "100001"


def test_a_write_that_really_lost_is_still_reported(agent: Agent, tmp_path: Path,
                                                    clock: FakeClock) -> None:
    """Another device's later write wins: the own write is "lost" (kept for people)."""
    engine, _, _ = make_engine(tmp_path / "server", {agent.device_id: [S], "van-9": [S]})
    agent.put("tasks", "t-1", {"route": S, "status": "mine"})
    other = {"type": "changes", "v": 1, "dev": "van-9", "sv": 1, "ch": [
        {"n": 1, "h": f"{clock() + 60_000:012x}0000", "c": "tasks", "k": "t-1", "s": S,
         "b": 0, "op": "put", "f": {"route": S, "status": "theirs"}}]}
    engine.handle_up("van-9", codec.encode_dict(other))
    _deliver(agent, engine.handle_up(
        agent.device_id, codec.encode(agent.sync.next_batch().message(agent.device_id))))
    assert [c.kind for c in agent.conflicts()] == ["lost"]


def test_offline_says_why_and_when_it_retries(agent: Agent) -> None:
    """A refused login is named in status, with the next try; connecting clears it."""
    agent.sync.set_online(False)
    agent.sync.record_link("retrying", "Not authorized", 8.0, code="login_refused")
    status = agent.status()
    assert not status.online and status.link is not None
    assert status.link["code"] == "login_refused"
    assert "refused the login" in status.summary() and "retrying in 8 s" in status.summary()
    agent.sync.set_online(True)
    agent.sync.record_link("online")
    status = agent.status()
    assert status.online and status.link is None


def test_a_killed_daemon_is_not_online(agent: Agent) -> None:
    """The heartbeat of a process that no longer exists does not count as online."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(proc.stdout)
    agent.sync.set_online(True)
    # an earlier release's heartbeat: a pid alone
    agent._core.store.write(lambda tx: tx.set_meta(
        "online", {"on": True, "t": tx.meta("online")["t"], "pid": dead}))
    status = agent.status()
    assert not status.online and status.agent_running is False
    assert "sync daemon is not running" in status.summary()


def test_a_crashed_daemons_pid_reused_by_another_process_is_not_online(agent: Agent) -> None:
    """The heartbeat names its process, not only its pid: after a crash the pid may be
    given to another process (here: this test's own), which must not pass for it."""
    code = "from waystation.processes import this_process; print(this_process())"
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    assert dead
    agent.sync.set_online(True)
    assert agent.status().online  # its own heartbeat: this process, alive
    reused = dead.rsplit("/", 2)[0] + f"/{os.getpid()}/" + dead.rsplit("/", 1)[1]
    agent._core.store.write(lambda tx: tx.set_meta(
        "online", {**tx.meta("online"), "pid": os.getpid(), "proc": reused}))
    status = agent.status()
    assert not status.online and status.agent_running is False


def test_a_daemon_alive_but_silent_is_not_responding(agent: Agent, clock: FakeClock) -> None:
    """Its last heartbeat said connected, its process lives, but no heartbeat came for
    longer than the timeout (frozen, asleep, stuck on a disk): status says it does not
    respond, not "offline, waiting for connection"; a fresh heartbeat clears it."""
    agent.put("tasks", "t-1", {"route": S})
    agent.sync.set_online(True)   # this process: alive
    clock.advance(agent._core.settings.heartbeat_timeout_s + 30)
    status = agent.status()
    assert not status.online and status.link is not None
    assert status.link["code"] == "not_responding", status.link
    summary = status.summary()
    assert "not responding" in summary and "no heartbeat from the sync daemon for" in summary
    assert "waiting for connection" in summary  # the pending change is still said
    agent.sync.set_online(True)
    assert agent.status().online and agent.status().link is None


def test_a_daemon_that_went_offline_is_not_called_stuck(agent: Agent,
                                                        clock: FakeClock) -> None:
    """Offline, the daemon writes no heartbeat: an old one saying "not connected" is not
    a daemon that stopped responding."""
    agent.sync.set_online(False)
    agent.sync.record_link("retrying", "refused", 8.0, code="connection_refused")
    clock.advance(3600)
    status = agent.status()
    assert status.link is not None and status.link["code"] == "connection_refused"


def test_server_problem_clears_after_a_successful_sync(agent: Agent) -> None:
    """"device disabled" stays only until the server accepts something again."""
    agent.put("tasks", "t-1", {"route": S})
    agent.sync.apply_reject(wire.Reject(err=wire.ErrorInfo(
        code="device_disabled", reason="device van-1 is disabled by the operator")))
    assert "disabled" in agent.status().summary()
    agent.sync.apply_ack(wire.Ack(ok=[(1, S, 1)]))
    status = agent.status()
    assert status.last_error is None and "disabled" not in status.summary()


def test_status_names_the_store_it_reads(agent: Agent) -> None:
    """agent status shows the store's path and incarnation."""
    status = agent.status()
    assert status.store_path == str(agent.store.path)
    assert status.incarnation == agent.sync.hello("t/1").inc


def test_receiving_records_is_a_sync(agent: Agent) -> None:
    """A device that just received records (a delta, a page) says it synced just now."""
    from tests.agent.agentkit import rec

    assert agent.status().last_sync_ms is None
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 1, {"route": S})]))
    first = agent.status().last_sync_ms
    assert first is not None
    agent.sync.apply_page(wire.Page.model_validate(
        {"req": "c-1", "s": S, "from": 1, "to": 2, "reset": False, "more": False,
         "recs": [rec("t-2", 2, {"route": S}).model_dump(by_alias=True)]}))
    assert agent.status().last_sync_ms is not None


def test_a_change_held_by_the_server_says_when_it_is_tried_again(agent: Agent,
                                                                 clock: FakeClock) -> None:
    """A change refused for now (device disabled) waits in the daemon's backoff: status
    says when the next try is, counting down, and stops saying it once due."""
    agent.put("tasks", "t-1", {"route": S})
    reject = wire.Reject(rj=[wire.Rejection(
        n=1, code="device_disabled", reason="device van-1 is disabled by the operator",
        perm=False)])
    result = agent.sync.apply_reject(reject, {1: 42.0})
    assert result.transient == [1]
    status = agent.status()
    assert status.last_error is not None and status.last_error["retry_in_s"] == 42.0
    assert "disabled by the operator (next try in 42 s)" in status.summary()
    clock.advance(40)
    assert "(next try in 2 s)" in agent.status().summary()
    clock.advance(5)
    status = agent.status()
    assert status.last_error is not None and status.last_error["retry_in_s"] == 0.0
    assert "next try" not in status.summary() and "disabled" in status.summary()
    # Without the daemon's backoff (no daemon), nothing is promised.
    agent.sync.apply_reject(reject)
    status = agent.status()
    assert status.last_error is not None and "retry_in_s" not in status.last_error
    assert "next try" not in status.summary()
