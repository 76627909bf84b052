"""A connection that hears nothing is dropped and made again (agent.daemon_deaf): over a
real broker through a relay that keeps the broker's PUBLISH packets from the device's
first connection, and the rule itself on a clock of the test's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from agent.daemon import AgentDaemon
from agent.daemon_deaf import DEAF_AFTER_MAX_S, DOWN_FACTOR, DeafHooks
from agent.link_progress import PROGRESS_BYTES, LinkProgress
from agent.policy.server import ServerWatch
from schemas.collection import example_catalog_path, load_catalog
from tests.deaf_relay import DeafRelay
from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_until
from waystation.config import AgentConfig

CATALOG = load_catalog(example_catalog_path())
DEV = "van-12"
UP, DOWN, STATUS = (f"{PREFIX}/{DEV}/{t}" for t in ("up", "down", "status"))


@pytest.fixture
def server(broker: BrokerProcess) -> Iterator[RecordingClient]:
    """A scripted merge server (plain paho) that reads the device's up and status topics."""
    srv = RecordingClient(broker.port, "test-server", SERVER_USER, USERS[SERVER_USER])
    assert srv.connect() == "Success"
    assert srv.subscribe(UP) == 1 and srv.subscribe(STATUS) == 1
    yield srv
    srv.close()


def _catchups(server: RecordingClient) -> list[dict[str, Any]]:
    msgs = [orjson.loads(m.payload) for m in server.received(UP)]
    return [m for m in msgs if m["type"] == "catchup"]


def _answer(server: RecordingClient, req: dict[str, Any]) -> None:
    server.publish(DOWN, orjson.dumps({"v": 1, "type": "checkpoint", "req": req["req"],
                                       "cp": dict.fromkeys(req["cp"], 0)}))


def test_a_deaf_connection_is_made_again_and_then_hears(
        broker: BrokerProcess, server: RecordingClient, tmp_path: Path) -> None:
    """The broker delivers nothing on the device's first connection (its catch-up's answer
    never arrives, pings and acks do): after `deaf_after_s` the agent reconnects cleanly
    (no will: the server never reads it offline), and the new connection's catch-up is
    answered."""
    with DeafRelay(broker.port, deaf_connections={1}) as relay:
        cfg = AgentConfig.model_validate({
            "device_id": DEV, "data_dir": str(tmp_path / "agent"), "scopes": ["route-42"],
            "mqtt": {"port": relay.port, "password": USERS[DEV]},
            "sync": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "deaf_after_s": 1,
                     "ack_timeout_s": 120.0}})  # no catch-up retry: one request per link
        daemon = AgentDaemon(cfg, CATALOG, env={})
        daemon.start()
        try:
            first = wait_until(lambda: _catchups(server), 15, message="the first catch-up")[0]
            _answer(server, first)
            wait_until(lambda: relay.dropped >= 1, 10, message="the answer kept back")
            second = wait_until(lambda: _catchups(server)[1:], 15,
                                message="a catch-up on a new connection")[0]
            assert relay.connections == 2 and daemon.deaf_reconnects == 1
            _answer(server, second)
            wait_until(lambda: daemon._catchup is None, 10, message="the catch-up answered")
            assert daemon.connected and daemon.stats.connects == 2
            statuses = [orjson.loads(m.payload) for m in server.received(STATUS)]
            assert statuses and all(s["on"] for s in statuses)
        finally:
            daemon.stop(drain_s=0.5)


def _answer_changes(server: RecordingClient, answered: set[int]) -> None:
    """Ack every `changes` message seen on the up topic and not answered yet (by its
    place in what the server received: a resend is answered again), as the merge does."""
    for i, m in enumerate(server.received(UP)):
        msg = orjson.loads(m.payload)
        if msg["type"] != "changes" or i in answered:
            continue
        answered.add(i)
        server.publish(DOWN, orjson.dumps({"v": 1, "type": "ack", "ok": [
            [ch["n"], "route-42", ch["n"]] for ch in msg["ch"]]}))


def test_a_link_gone_deaf_mid_connection_is_healed_by_its_unanswered_changes(
        broker: BrokerProcess, server: RecordingClient, tmp_path: Path) -> None:
    """The link hears the catch-up's answer, then goes deaf: a change written now gets no
    ack (the server's ack is kept back), no catch-up is outstanding, and the unanswered
    batch alone makes the agent reconnect; the change is resent and acked."""
    with DeafRelay(broker.port, deaf_connections=set()) as relay:
        cfg = AgentConfig.model_validate({
            "device_id": DEV, "data_dir": str(tmp_path / "agent"), "scopes": ["route-42"],
            "mqtt": {"port": relay.port, "password": USERS[DEV]},
            "sync": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "deaf_after_s": 1,
                     "ack_timeout_s": 120.0}})
        daemon = AgentDaemon(cfg, CATALOG, env={})
        daemon.start()
        answered: set[int] = set()
        try:
            first = wait_until(lambda: _catchups(server), 15, message="the first catch-up")[0]
            _answer(server, first)
            wait_until(lambda: daemon._catchup is None, 10, message="the catch-up answered")
            relay.deafen_current()
            daemon.agent.put("tasks", "t-1", {"route": "route-42", "status": "out"})
            daemon.wake()

            def acked() -> bool:
                _answer_changes(server, answered)
                for req in _catchups(server)[1:]:
                    _answer(server, req)
                return daemon.sync.pending_count() == 0

            wait_until(acked, 30, message="the change acked over a new connection")
            assert relay.connections == 2 and daemon.deaf_reconnects == 1
            assert relay.dropped >= 1
        finally:
            daemon.stop(drain_s=0.5)


class _Link:
    def __init__(self) -> None:
        self.relogins = 0

    def relogin(self) -> None:
        self.relogins += 1


class _Daemon(DeafHooks):
    def __init__(self, tmp_path: Path, *, wait_for_server: bool = True) -> None:
        self.cfg = AgentConfig.model_validate({
            "device_id": DEV, "data_dir": str(tmp_path), "scopes": ["route-42"],
            "sync": {"deaf_after_s": 10}, "policy": {"wait_for_server": wait_for_server}})
        self.dev = DEV
        self.watch = ServerWatch()
        self.gate = SimpleNamespace(server=self.watch)  # type: ignore[assignment]
        self.link = self.fake = _Link()  # type: ignore[assignment]
        self.progress = LinkProgress()
        self._connected = True


def test_the_wait_starts_at_the_first_unanswered_request_and_doubles(tmp_path: Path) -> None:
    d = _Daemon(tmp_path)
    d._asked(0.0)
    d._asked(5.0)  # a retry: the wait still counts from the first request
    d._deaf_check(9.9)
    assert d.fake.relogins == 0
    d._deaf_check(10.0)
    assert d.fake.relogins == 1
    d._link_changed()
    d._asked(11.0)
    d._deaf_check(30.9)
    assert d.fake.relogins == 1  # 20 s now: the reconnect healed nothing
    d._deaf_check(31.0)
    assert d.fake.relogins == 2
    d._heard()  # an answer: back to the configured wait
    d._asked(40.0)
    d._deaf_check(50.0)
    assert d.fake.relogins == 3


def test_a_link_still_delivering_bytes_is_not_deaf(tmp_path: Path) -> None:
    # A catch-up page of 192 KiB takes ~80 s over 20 kbit/s, and arrives in one piece:
    # the bytes coming in meanwhile are the answer on its way, not silence.
    d = _Daemon(tmp_path)
    d._asked(0.0)
    for t in range(1, 80):
        d.progress.observe(float(t), t * 2500)
        d._deaf_check(float(t))
    assert d.fake.relogins == 0
    d._deaf_check(79.0 + 9.9)
    assert d.fake.relogins == 0
    d._deaf_check(79.0 + 10.0)  # then silence as long as the wait: deaf
    assert d.fake.relogins == 1
    assert PROGRESS_BYTES < 2500


def test_an_answer_a_closed_link_or_a_server_announced_down_keeps_the_link(
        tmp_path: Path) -> None:
    d = _Daemon(tmp_path)
    d._asked(0.0)
    d._heard()
    d._deaf_check(100.0)
    d._asked(100.0)
    d._connected = False
    d._deaf_check(200.0)
    d._connected = True
    d.watch.on_state("srv-1", False, 0)
    d._deaf_check(200.0)
    assert d.fake.relogins == 0
    d.watch.on_state("srv-1", True, 0)
    d._deaf_check(200.0)
    assert d.fake.relogins == 1


def test_a_server_announced_down_for_long_is_heard_afresh(tmp_path: Path) -> None:
    """The "down" may be the last thing a deaf link delivered (the "up" that followed
    never came): after DOWN_FACTOR waits unanswered the agent reconnects once to hear the
    server's state again, instead of waiting for ever."""
    d = _Daemon(tmp_path)   # deaf_after_s = 10
    d.watch.on_state("srv-1", False, 0)
    d._asked(0.0)
    d._deaf_check(10.0 * DOWN_FACTOR - 1)
    assert d.fake.relogins == 0
    d._deaf_check(10.0 * DOWN_FACTOR)
    assert d.fake.relogins == 1


def test_without_waiting_for_a_server_its_state_is_not_asked(tmp_path: Path) -> None:
    d = _Daemon(tmp_path, wait_for_server=False)
    d.watch.on_state("srv-1", False, 0)
    d._asked(0.0)
    d._deaf_check(10.0)
    assert d.fake.relogins == 1


def test_the_wait_stops_doubling_at_its_cap(tmp_path: Path) -> None:
    d = _Daemon(tmp_path)
    now = 0.0
    waits = []
    for _ in range(10):
        d._asked(now)
        start = now
        while d.fake.relogins == len(waits):
            now += 1.0
            d._deaf_check(now)
        waits.append(now - start)
        d._link_changed()
    assert waits[:4] == [10, 20, 40, 80] and max(waits) == DEAF_AFTER_MAX_S
