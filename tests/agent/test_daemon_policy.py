"""The agent daemon's sync policy over a real broker (embedded amqtt and Mosquitto), in
process so the policy's wall clock can be moved: a window closes and opens, hostile
server announcements are refused, an announced-down group holds the outbox, a
bandwidth cap spaces batches, sync now lifts a closed window."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.daemon import AgentDaemon
from agent.policy.gate import Gate
from schemas.collection import example_catalog_path, load_catalog
from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess
from tests.fixtures_brokers import any_broker as _any_broker
from tests.helpers import RecordingClient, wait_until
from waystation.config import AgentConfig

CATALOG = load_catalog(example_catalog_path())
DEV = "van-12"
STATE = f"{PREFIX}/_server/main/server-1/state"
MONDAY_0959 = int(datetime(2026, 11, 30, 9, 59, 30, tzinfo=UTC).timestamp() * 1000)


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def _daemon(broker: BrokerProcess, tmp_path: Path, clock: Clock,
            policy: dict[str, Any], **sync: Any) -> AgentDaemon:
    cfg = AgentConfig.model_validate({
        "device_id": DEV, "data_dir": str(tmp_path / "agent"), "scopes": ["route-42"],
        "mqtt": {"port": broker.port, "password": USERS[DEV]},
        "sync": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "ack_timeout_s": 60.0,
                 **sync},
        "policy": policy})
    return AgentDaemon(cfg, CATALOG, env={}, gate=Gate(cfg.policy, wall_ms=clock))


any_broker = _any_broker  # the fixture, each broker kind in turn


@pytest.fixture
def spy(any_broker: BrokerProcess) -> Iterator[RecordingClient]:
    client = RecordingClient(any_broker.port, "policy-spy", SERVER_USER, USERS[SERVER_USER])
    assert client.connect() == "Success"
    assert client.subscribe(f"{PREFIX}/{DEV}/up") == 1
    yield client
    client.publish(STATE, b"", retain=True)  # no retained announcement left behind
    client.close()


def _changes(spy: RecordingClient) -> list[int]:
    out: list[int] = []
    for m in spy.received(f"{PREFIX}/{DEV}/up"):
        doc = orjson.loads(m.payload)
        if doc["type"] == "changes":
            out += [ch["n"] for ch in doc["ch"]]
    return out


def _loops_pass(daemon: AgentDaemon, count: int = 5) -> None:
    """The engine loop turned `count` more times (each turn asks the policy and pumps)."""
    start = daemon.stats.loops
    wait_until(lambda: daemon.stats.loops >= start + count, 20, interval=0.02)


def _put(daemon: AgentDaemon, key: str, priority: int = 0) -> None:
    daemon.agent.put("tasks", key, {"route": "route-42", "status": "out"}, priority=priority)


def test_window_closes_and_opens(any_broker: BrokerProcess, spy: RecordingClient,
                                 tmp_path: Path) -> None:
    """Outside the window nothing is sent (a high-priority change is); status says until
    when; the clock reaches the window: the rest goes."""
    clock = Clock(MONDAY_0959)
    daemon = _daemon(any_broker, tmp_path, clock,
                     {"windows": ["Mon 10:00-11:00"], "timezone": "UTC"})
    try:
        daemon.start()
        assert daemon.link.wait_connected(10)
        _put(daemon, "t-1")
        _put(daemon, "t-2")
        wait_until(lambda: [d["code"] for d in daemon.agent.status().deferred]
                   == ["window_closed"], 10)
        _loops_pass(daemon)
        assert _changes(spy) == []
        [deferral] = daemon.agent.status().deferred
        assert deferral["until_ms"] == MONDAY_0959 + 30_000
        _put(daemon, "urgent", priority=100)
        wait_until(lambda: _changes(spy) == [3], 10)
        clock.ms = MONDAY_0959 + 31_000
        wait_until(lambda: sorted(_changes(spy)) == [1, 2, 3], 10)
        wait_until(lambda: daemon.agent.status().deferred == [], 10)
    finally:
        daemon.stop(drain_s=0.2)


def test_sync_now_opens_a_closed_window_for_a_while(any_broker: BrokerProcess,
                                                    spy: RecordingClient,
                                                    tmp_path: Path) -> None:
    """The app's sync now (another Agent handle, through the wake socket) sends at once;
    after policy.sync_now_s the window holds again."""
    clock = Clock(MONDAY_0959)
    daemon = _daemon(any_broker, tmp_path, clock, {
        "windows": ["Tue 10:00-11:00"], "timezone": "UTC", "sync_now_s": 60.0})
    try:
        daemon.start()
        assert daemon.link.wait_connected(10)
        _put(daemon, "t-1")
        wait_until(lambda: daemon.agent.status().deferred != [], 10)
        _loops_pass(daemon)
        assert _changes(spy) == []
        clock.ms += 1000
        req = daemon.agent.sync_now()
        assert req["by"] == "app"
        wait_until(lambda: _changes(spy) == [1], 10)
        wait_until(lambda: daemon.agent.status().sync_now_until_ms == req["t"] + 60_000, 10)
        clock.ms = req["t"] + 61_000  # sync now is over
        daemon.gate.sync_now(0)  # drops the cached decision, changes nothing else
        _put(daemon, "t-2")
        wait_until(lambda: daemon.agent.status().deferred != [], 10)
        _loops_pass(daemon)
        assert _changes(spy) == [1]
    finally:
        daemon.stop(drain_s=0.2)


def test_server_announcements_hostile_and_real(any_broker: BrokerProcess,
                                               spy: RecordingClient, tmp_path: Path) -> None:
    """Garbage, a wrong type, a mismatched server or group and an oversized payload on
    the announcement topic are counted as bad and change nothing; a real "offline"
    holds the outbox and the status says since when; another server of the group up:
    the outbox drains."""
    daemon = _daemon(any_broker, tmp_path, Clock(MONDAY_0959), {})
    try:
        daemon.start()
        assert daemon.link.wait_connected(10)
        assert daemon.link.wait_subscribed(daemon.server_filter, 10)
        bad = [
            b"\x00 not json",
            b'{"type":"status","v":1,"dev":"x","on":false}',
            orjson.dumps({"type": "server", "v": 1, "grp": "main", "srv": "other", "on": False}),
            orjson.dumps({"type": "server", "v": 1, "grp": "else", "srv": "server-1",
                          "on": False}),
            orjson.dumps({"type": "server", "v": 1, "grp": "main", "srv": "server-1",
                          "on": "no"}),
            b'{"type":"server","v":1,"grp":"main","srv":"server-1","on":false,"pad":"'
            + b"x" * (8 << 10) + b'"}',
        ]
        for payload in bad:
            spy.publish(STATE, payload)
        wait_until(lambda: daemon.stats.bad_messages >= len(bad), 15)
        assert daemon.gate.server.up is None
        _put(daemon, "t-1")
        wait_until(lambda: _changes(spy) == [1], 10)  # nothing announced: not held
        down_at = MONDAY_0959 - 5000
        spy.publish(STATE, orjson.dumps({"type": "server", "v": 1, "grp": "main",
                                         "srv": "server-1", "on": False, "t": down_at}),
                    retain=True)
        wait_until(lambda: [d["code"] for d in daemon.agent.status().deferred]
                   == ["server_unavailable"], 10)
        status = daemon.agent.status()
        assert status.deferred[0]["since_ms"] == down_at
        assert "server unavailable since" in status.summary()
        _put(daemon, "t-2", priority=500)  # not even high priority goes
        _loops_pass(daemon)
        assert 2 not in _changes(spy)
        spy.publish(f"{PREFIX}/_server/main/server-2/state", orjson.dumps(
            {"type": "server", "v": 1, "grp": "main", "srv": "server-2", "on": True}),
            retain=True)
        wait_until(lambda: 2 in _changes(spy), 10)
        spy.publish(f"{PREFIX}/_server/main/server-2/state", b"", retain=True)
        wait_until(lambda: daemon.gate.server.members.get("server-2") is None, 10)
        assert daemon.gate.server.up is False  # server-1 still said offline
    finally:
        daemon.stop(drain_s=0.2)


def test_bandwidth_cap_spaces_batches(any_broker: BrokerProcess, spy: RecordingClient,
                                      tmp_path: Path) -> None:
    """A 2 KB/s cap with a 1 s burst: 40 changes of ~300 B in batches of 5 go out over
    seconds, as the cap allows, not at once."""
    daemon = _daemon(any_broker, tmp_path, Clock(MONDAY_0959), {
        "bandwidth": {"records_bytes_per_s": 2000, "burst_s": 1.0}}, batch_max_changes=5,
        compress_over_bytes=False)  # uncompressed: the cap meets ~1.6 KB batches
    try:
        for i in range(40):
            daemon.agent.put("tasks", f"t-{i}", {"route": "route-42", "notes": "x" * 200})
        start = time.monotonic()
        daemon.start()
        assert daemon.link.wait_connected(10)
        wait_until(lambda: len(_changes(spy)) == 40, 60)
        elapsed = time.monotonic() - start
        sizes = [len(m.payload) for m in spy.received(f"{PREFIX}/{DEV}/up")
                 if orjson.loads(m.payload)["type"] == "changes"]
        assert len(sizes) == 8
        # The bucket starts with the 2000 B burst and may go one batch into debt: every
        # byte beyond those came at 2000 B/s at most.
        assert elapsed >= (sum(sizes) - 2000 - max(sizes)) / 2000 * 0.95, (sizes, elapsed)
    finally:
        daemon.stop(drain_s=0.2)


def _server_events(daemon: AgentDaemon) -> list[dict[str, Any]]:
    return [e.data for e in daemon.agent.feed_after(0) if e.kind == "server"]


def _announce(spy: RecordingClient, server: str, on: bool, t: int) -> None:
    spy.publish(f"{PREFIX}/_server/main/{server}/state", orjson.dumps(
        {"type": "server", "v": 1, "grp": "main", "srv": server, "on": on, "t": t}),
        retain=True)


def test_group_transitions_are_feed_events(any_broker: BrokerProcess, spy: RecordingClient,
                                           tmp_path: Path) -> None:
    """Each up/down transition of the group as the policy sees it is one `server` feed
    event {group, up, since_ms}: a second server coming up or one of two going down is
    none, a repeated announcement is none, and a restarted daemon that finds the group
    as it left it records none (meta server_told)."""
    t0 = MONDAY_0959 - 60_000
    _announce(spy, "server-1", True, t0)
    daemon = _daemon(any_broker, tmp_path, Clock(MONDAY_0959), {})
    try:
        daemon.start()
        wait_until(lambda: len(_server_events(daemon)) == 1, 15,
                   message=lambda: f"the group seen up: {_server_events(daemon)}")
        assert _server_events(daemon) == [{"group": "main", "up": True, "since_ms": t0}]
        _announce(spy, "server-2", True, t0 + 1000)   # still up: no transition
        _announce(spy, "server-1", False, t0 + 2000)  # server-2 still up
        _announce(spy, "server-1", False, t0 + 2500)  # a repeat
        wait_until(lambda: daemon.gate.server.members == {"server-1": False,
                                                          "server-2": True}, 10)
        _loops_pass(daemon)
        assert len(_server_events(daemon)) == 1
        _announce(spy, "server-2", False, t0 + 3000)
        wait_until(lambda: len(_server_events(daemon)) == 2, 10)
        _announce(spy, "server-2", False, t0 + 3500)
        _announce(spy, "server-1", True, t0 + 4000)
        wait_until(lambda: len(_server_events(daemon)) == 3, 10)
        _loops_pass(daemon)
        assert _server_events(daemon)[1:] == [
            {"group": "main", "up": False, "since_ms": t0 + 3000},
            {"group": "main", "up": True, "since_ms": t0 + 4000}]
        # the same transaction as the policy state the status shows
        status = daemon.agent.status()
        assert status.server is not None and status.server["up"] is True
    finally:
        daemon.stop(drain_s=0.2)
    again = _daemon(any_broker, tmp_path, Clock(MONDAY_0959), {})
    try:
        again.start()
        assert again.link.wait_connected(10)
        wait_until(lambda: again.gate.server.up is True, 10)
        _loops_pass(again)
        assert len(_server_events(again)) == 3
    finally:
        again.stop(drain_s=0.2)
        spy.publish(f"{PREFIX}/_server/main/server-2/state", b"", retain=True)
