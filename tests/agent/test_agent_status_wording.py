"""`agent status`'s summary (also the local API's `summary`) in states a real fleet
reaches: each says what is true and, where someone has to act, what to do."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.api import Agent
from agent.errors import QuotaReached
from agent.service.lock import SYNC_LOCK, FileLock, acquire_service_lock
from agent.status import UNANSWERED_S
from schemas import wire
from schemas.collection import Catalog
from tests.agent.agentkit import FakeClock, make_cfg, rec
from tests.small_disk import fill_disk, small_disk
from waystation.timefmt import iso

S = "route-42"


def _policy(agent: Agent, up: bool | None) -> None:
    """What a running daemon records of its policy: nothing held, and whether the merge
    server group announced itself (None: never)."""
    agent.sync.record_policy({"deferrals": [], "sync_now_until_ms": None,
                              "server": {"group": "main", "up": up, "down_since_ms": None},
                              "probes": {}})


def test_a_store_no_daemon_ever_ran_on_says_to_start_it(agent: Agent) -> None:
    """A fresh install: writes wait, and the next step is starting the daemon (not a
    vague "waiting for connection" with no cause)."""
    agent.put("tasks", "t-1", {"route": S})
    status = agent.status()
    assert status.agent_running is None and not status.online
    summary = status.summary()
    assert "sync daemon has not run on this store yet" in summary
    assert "`waystation agent run`" in summary
    assert "1 change saved locally" in summary and "never synced" in summary


def test_online_with_pending_changes_says_how_old_they_are(agent: Agent,
                                                           clock: FakeClock) -> None:
    agent.put("tasks", "t-1", {"route": S})
    agent.sync.set_online(True)
    _policy(agent, True)
    clock.advance(12)  # within the heartbeat timeout
    agent.sync.set_online(True)
    summary = agent.status().summary()
    assert summary.startswith("online, 1 pending (oldest 12 s), never synced"), summary
    assert "announced" not in summary  # a server is up: nothing to point at


def test_changes_unacked_with_no_server_announced_point_at_the_server(
        agent: Agent, clock: FakeClock) -> None:
    """Connected, changes waiting for minutes, and no merge server of the group ever
    announced itself (none runs for this broker): say so, and where to look."""
    agent.put("tasks", "t-1", {"route": S})
    _policy(agent, None)
    clock.advance(UNANSWERED_S - 1)
    agent.sync.set_online(True)
    assert "announced" not in agent.status().summary()  # not yet long: no alarm
    clock.advance(121)
    agent.sync.set_online(True)
    summary = agent.status().summary()
    assert "oldest change has waited 3 min" in summary
    assert "no merge server of group 'main' has announced itself" in summary
    assert "`waystation server status`" in summary
    agent.sync.apply_ack(wire.Ack(ok=[(1, S, 1)]))  # a server answered: nothing waits
    assert "announced" not in agent.status().summary()


def test_dead_letters_and_conflicts_say_where_to_look(agent: Agent) -> None:
    agent.put("tasks", "t-1", {"route": S})
    agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
        n=1, code="rule_rejected", reason="status must be set", perm=True)]))
    status = agent.status()
    assert status.dead_letters == 1
    assert "1 dead letter (changes the server refused for good: `waystation agent " \
           "deadletters`)" in status.summary()
    agent.sync.apply_delta(wire.Delta(d=[wire.Rec.model_validate({
        "c": "tasks", "k": "t-5", "s": S, "q": 1,
        "f": {"route": S, "address": "Gate 1"}, "h": {"address": "0190000000000000:van-3"},
        "cf": {"address": [{"v": "Dock 4", "by": "van-7", "h": "0190000000010000:van-7"}]}})]))
    status = agent.status()
    assert status.open_conflicts == 1
    assert "1 open conflict to settle (`waystation agent conflicts`)" in status.summary()


def test_a_full_quota_says_what_frees_room(tmp_path: Path, catalog: Catalog,
                                           clock: FakeClock) -> None:
    """Local writes refused at the quota: with changes waiting, their acks free room;
    with the outbox empty nothing will by itself, so the next step is the operator's."""
    pending = Agent.open(make_cfg(tmp_path / "a", quota_bytes=1 << 20), catalog, now_ms=clock)
    try:
        with pytest.raises(QuotaReached):
            for i in range(5000):
                pending.put("tasks", f"w-{i}", {"route": S, "status": "open",
                                                "notes": "x" * 1800})
        summary = pending.status().summary()
        assert "disk quota reached" in summary
        assert "until the outbox drains or retention evicts synced records" in summary
    finally:
        pending.close()
    synced = Agent.open(make_cfg(tmp_path / "b", quota_bytes=1 << 20), catalog, now_ms=clock)
    try:
        for q in range(1, 5000):
            synced.sync.apply_delta(wire.Delta(d=[rec(f"r-{q}", q, {
                "route": S, "status": "open", "notes": "x" * 1800})]))
            if (synced.status().quota or {}).get("reached"):
                break
        status = synced.status()
        assert status.pending == 0 and status.quota is not None and status.quota["reached"]
        assert ("the outbox is empty: declare retention for more collections or raise "
                "storage.quota_bytes") in status.summary()
    finally:
        synced.close()


def test_a_connection_closed_before_any_connack_names_port_and_tls(agent: Agent,
                                                                   clock: FakeClock) -> None:
    """Something at mqtt.port took the connection and closed it (a TLS listener spoken to
    in plain text, a port that is not MQTT): not "the network is unreachable"; and once
    the retry is due, "trying again now", not "retrying in 0 s"."""
    agent.sync.set_online(False)
    agent.sync.record_link("retrying", "connection ended (The connection was lost.) before "
                           "the broker accepted it", 4.0, code="network")
    summary = agent.status().summary()
    assert "network is unreachable" not in summary
    assert "mqtt.port" in summary and "mqtt.tls" in summary
    assert "retrying in 4 s" in summary
    clock.advance(10)
    agent.sync.set_online(False)  # the daemon's heartbeat goes on while it retries
    summary = agent.status().summary()
    assert "trying again now" in summary and "retrying in 0 s" not in summary


def test_a_dead_sync_process_under_a_running_service_is_named(agent: Agent) -> None:
    """The service runs (its lock is held) but no sync process does (none holds the sync
    lock): status names that (the service restarts it), not the last connection problem
    ("retrying in ...": nothing retries) nor a bare "waiting for connection". A new
    sync process that has not connected yet (the heartbeat still names the dead one)
    is running: its own connection problem is shown."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(proc.stdout)
    lock = acquire_service_lock(agent.store.path.parent)
    try:
        agent.put("tasks", "t-1", {"route": S})
        agent.sync.set_online(False)
        agent.sync.record_link("retrying", "[Errno 111] Connection refused", 8.0,
                               code="connection_refused")
        agent._core.store.write(lambda tx: tx.set_meta(
            "online", {**tx.meta("online"), "pid": dead}))
        status = agent.status()
        assert status.agent_running is True and not status.online
        assert status.link is not None and status.link["code"] == "sync_restarting"
        summary = status.summary()
        assert "its sync process does not" in summary and "restarts it" in summary
        assert "retrying in" not in summary and "1 change saved locally" in summary
        sync_lock = FileLock(agent.store.path.parent / SYNC_LOCK)
        assert sync_lock.acquire()
        try:
            status = agent.status()
            assert status.link is not None and status.link["code"] == "connection_refused"
            assert "nothing accepts connections" in status.summary()
        finally:
            sync_lock.release()
    finally:
        lock.release()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: room for a store and more than `LOW_SPACE_BYTES` free (needs
    root and mount rights; skipped otherwise)."""
    with small_disk(tmp_path / "disk", "16m") as mnt:
        yield mnt


def test_a_full_disk_is_named_before_writes_fail(disk: Path, catalog: Catalog) -> None:
    """A nearly full filesystem under the store: status says so (every write, an ack's
    too, needs room), with the free space; once space is freed it no longer does."""
    with Agent.open(make_cfg(disk / "data"), catalog) as ag:
        ag.put("tasks", "t-1", {"route": S})
        assert "nearly full" not in ag.status().summary()
        filler = disk / "filler"
        fill_disk(filler)
        status = ag.status()
        assert status.disk_free_bytes is not None and status.disk_free_bytes < 1 << 20
        summary = status.summary()
        assert "the disk holding the store is nearly full" in summary
        assert "KiB free" in summary and "until space is freed" in summary
        # "may": LMDB often still finds room in its file (the e2e run synced 3 changes
        # on a disk with 0 KiB free), so a plain "syncing fail" read false
        assert "local writes and syncing may fail (storage_full)" in summary
        filler.unlink()
        assert "nearly full" not in ag.status().summary()


def test_changes_held_by_the_policy_say_how_to_send_them_now(agent: Agent) -> None:
    """A closed window holds the outbox: the summary names "sync now"; a server that is
    down is not lifted by asking, so then it does not."""
    agent.put("tasks", "t-1", {"route": S})
    agent.sync.set_online(True)
    closed = {"code": "window_closed", "reason": "outside the sync windows",
              "lanes": ["records", "files", "telemetry"], "until_ms": None, "since_ms": None}
    agent.sync.record_policy({"deferrals": [closed], "sync_now_until_ms": None,
                              "server": {"group": "main", "up": True,
                                         "down_since_ms": None}, "probes": {}})
    summary = agent.status().summary()
    assert "waiting: outside the sync windows" in summary
    assert "`waystation agent sync` sends them now" in summary
    down = {**closed, "code": "server_unavailable", "reason": "no merge server is up"}
    agent.sync.record_policy({"deferrals": [down], "sync_now_until_ms": None,
                              "server": {"group": "main", "up": False,
                                         "down_since_ms": None}, "probes": {}})
    assert "agent sync" not in agent.status().summary()


def _server_up(agent: Agent, up_since_ms: int) -> None:
    """What a running daemon records when its merge server group is announced up."""
    agent.sync.record_policy({"deferrals": [], "sync_now_until_ms": None,
                              "server": {"group": "main", "up": True, "down_since_ms": None,
                                         "up_since_ms": up_since_ms}, "probes": {}})


def test_a_server_announced_up_that_answers_nothing_is_pointed_at(
        agent: Agent, clock: FakeClock) -> None:
    """A merge server hung (stopped, stuck) stays announced up until the broker's
    keep-alive gives up on it, and acks nothing: "online, 2 pending (oldest 5 min)"
    alone read as a sync under way.
    Not said while acks come (a backlog draining), nor right after the server came up
    (the changes held while it was down go now)."""
    agent.put("tasks", "t-1", {"route": S})
    agent.put("tasks", "t-2", {"route": S})
    _server_up(agent, clock.ms)
    clock.advance(UNANSWERED_S + 240)
    agent.sync.set_online(True)
    summary = agent.status().summary()
    assert summary.startswith("online, 2 pending (oldest 5 min)"), summary
    assert "nothing has come from the server yet" in summary
    assert "though a merge server of group 'main' is announced up" in summary
    assert "hung or overloaded" in summary and "`waystation server status`" in summary
    agent.sync.apply_ack(wire.Ack(ok=[(1, S, 1)]))  # acks arrive: a backlog draining
    clock.advance(5)
    agent.sync.set_online(True)
    assert "announced up" not in agent.status().summary()
    clock.advance(UNANSWERED_S + 60)  # then the server falls silent again
    agent.sync.set_online(True)
    assert "nothing has come from the server for 2 min" in agent.status().summary()
    _server_up(agent, clock.ms - 10_000)  # it was down, and came up 10 s ago
    assert "announced up" not in agent.status().summary()


def test_a_server_down_heard_before_the_link_was_lost_is_said_so(
        agent: Agent, clock: FakeClock) -> None:
    """Offline, the daemon cannot know the merge servers' state: a broker that stops
    delivers their last wills first, so "server unavailable" then may be false (they
    run). The summary says it is what was last heard, not a fact of now."""
    agent.put("tasks", "t-1", {"route": S})
    down = {"code": "server_unavailable", "reason": "no merge server is up",
            "lanes": ["records", "files", "telemetry"], "until_ms": None,
            "since_ms": clock.ms}
    agent.sync.record_policy({"deferrals": [down], "sync_now_until_ms": None,
                              "server": {"group": "main", "up": False,
                                         "down_since_ms": clock.ms, "up_since_ms": None},
                              "probes": {}})
    agent.sync.set_online(True)
    summary = agent.status().summary()
    assert "server unavailable since " in summary and "as last heard" not in summary
    clock.advance(3)
    agent.sync.set_online(False)
    agent.sync.record_link("retrying", "[Errno 111] Connection refused", 2.0,
                           code="connection_refused")
    summary = agent.status().summary()
    assert summary.startswith("offline — nothing accepts connections"), summary
    assert ("server unavailable since " in summary
            and "(as last heard before the link to the broker was lost)" in summary)


def test_a_device_removed_from_the_registry_says_whose_move_it_is(agent: Agent) -> None:
    """The server refuses a removed device's messages (`unknown_device`, naming `device
    add`): the device's user reads that the command is the operator's and that the
    changes waiting are kept."""
    agent.put("tasks", "t-1", {"route": S})
    agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
        n=1, code="unknown_device", perm=False,
        reason="device 'van-1' is not registered: enrol it with `waystation device add`")]))
    status = agent.status()
    assert status.pending == 1 and status.dead_letters == 0
    assert ("enrol it with `waystation device add` (the operator's command, on the server "
            "host; the changes waiting stay on this device)") in status.summary()


def test_a_server_whose_store_fails_says_whose_problem_it_is(agent: Agent) -> None:
    """PostgreSQL down, the server refuses each change for now (`server_error`, "send it
    again later"): the device's user reads that the device does so by itself and that
    the fix is the operator's, on the server."""
    agent.put("tasks", "t-1", {"route": S})
    agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
        n=1, code="server_error", perm=False,
        reason="the server failed to apply this change; send it again later")]))
    summary = agent.status().summary()
    assert "server says: the server failed to apply this change; send it again later" in summary
    assert ("a problem on the server, its store down or failing: this device sends the "
            "change again by itself") in summary and "`waystation server status`" in summary


def test_offline_says_since_when(agent: Agent, clock: FakeClock) -> None:
    """Offline, the summary said why and when the daemon tries again, never since when:
    the link's record keeps when it went down, across retries (and a restarted daemon's
    first attempts), and a new outage starts a new "since"."""
    agent.sync.set_online(True)
    agent.sync.record_link("online")
    clock.advance(5)
    down = clock.ms
    agent.sync.set_online(False)
    agent.sync.record_link("offline", "The connection was lost.", code="disconnected")
    for _ in range(3):  # retries go on: "since" stays
        clock.advance(40)
        agent.sync.set_online(False)
        agent.sync.record_link("retrying", "[Errno 111] Connection refused", 2.0,
                               code="connection_refused")
    status = agent.status()
    assert status.link is not None and status.link["since_ms"] == down
    summary = status.summary()
    assert f"; offline since {iso(down)}" in summary, summary
    agent.sync.set_online(True)
    agent.sync.record_link("online")
    assert agent.status().link is None
    clock.advance(60)
    again = clock.ms
    agent.sync.set_online(False)
    agent.sync.record_link("retrying", "[Errno 111] Connection refused", 2.0,
                           code="connection_refused")
    assert agent.status().link["since_ms"] == again  # type: ignore[index]


def test_a_daemon_not_running_says_when_it_was_last_heard(agent: Agent,
                                                          clock: FakeClock) -> None:
    """Stopped (or killed): "not running" and since about when, its last heartbeat."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    agent.sync.set_online(False)
    agent._core.store.write(lambda tx: tx.set_meta(
        "online", {**tx.meta("online"), "pid": int(proc.stdout), "proc": ""}))
    clock.advance(7 * 60)
    status = agent.status()
    assert status.agent_running is False
    assert status.summary().startswith(
        "offline — the sync daemon is not running, last heard from 7 min ago (start "), \
        status.summary()
