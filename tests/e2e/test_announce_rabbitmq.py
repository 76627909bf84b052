"""A merge server consuming over AMQP (`[amqp] nodes`, RabbitMQ) announces itself
(PROTOCOL.md §7.12) over a small MQTT link of its own to RabbitMQ's MQTT listener
(broker/server/announcer.py), as the MQTT server does on its broker link:

- two servers announced up, the agent connected after (RabbitMQ gives its `+`
  subscription no retained announcement); one killed (kill -9): the other answers its
  last will with its own announcement and the agent keeps draining; both killed: the
  last will tells the agent, which publishes no `changes` (its outbox holds them) and
  says "server unavailable since T"; one restarted: the agent drains, every write
  applied exactly once (one sequence each);
- a clean stop announces `on: false` (live to `+` subscribers, retained for the exact
  topic); `announce = false` clears the retained announcement;
- RabbitMQ's MQTT listener unreachable: the server still merges over AMQP, logs once
  why and what to do, retries, and announces once the listener is reachable.

One RabbitMQ node (the announcement, not clustering, is under test; retained messages
are per node, so with one node an exact-topic subscriber sees what the server
retained); two servers share a PostgreSQL store, one alone keeps LMDB. "Nothing sent"
is checked as in tests/e2e/test_sync_policy.py: a spy on the device's up topic and two
status heartbeats published after the writes.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.e2e.fleet import SERVER_USER
from tests.e2e.rabbit_fleet import PREFIX, RabbitFleet
from tests.e2e.test_sync_policy import _codes, _held_by_the_daemon, _put, _spy
from tests.helpers import RecordingClient, free_port, wait_until
from tests.rabbitmq_cluster import RabbitCluster, running_cluster
from tests.tcp_relay import pump, relay_pairs

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.rabbitmq]

DEV = "van-1"
SCOPE = "depot-7"
STATE = f"{PREFIX}/_server/main/server-1/state"
GROUP = f"{PREFIX}/_server/main/+/state"
MARKER = b"marker"
ANNOUNCING = "waystation_server_announce_connected"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    yield from running_cluster(tmp_path_factory.mktemp("rabbit"), size=1)


class OneNodeFleet(RabbitFleet):
    """A RabbitFleet on the one node (its server's `[amqp] nodes` name only that one)."""

    def _write_server_config(self, server_id: str) -> None:
        self.node_orders[server_id] = [0]
        super()._write_server_config(server_id)


@pytest.fixture
def fleet(tmp_path: Path, cluster: RabbitCluster) -> Iterator[RabbitFleet]:
    """Broker logins loaded, no server started yet (each test starts it when it needs)."""
    cluster.ensure_ready()
    with OneNodeFleet(tmp_path, cluster, None, metrics=True) as f:
        f.start(server=False)
        yield f


def _watch(fleet: RabbitFleet, topic: str, name: str) -> RecordingClient:
    """A client with the server's login subscribed to `topic` (on the one node)."""
    spy = RecordingClient(fleet.port, name, SERVER_USER, fleet.server_password)
    assert spy.connect() == "Success"
    assert spy.subscribe(topic) == 1
    return spy


def _decode(payload: bytes) -> bool | None:
    return orjson.loads(payload)["on"] if payload else None


def _live(spy: RecordingClient) -> list[bool | None]:
    """`on` of each announcement the spy got (None: an empty one, clearing), markers
    (`_retained`) left out."""
    return [_decode(m.payload) for m in spy.received(STATE) if m.payload != MARKER]


def _retained(fleet: RabbitFleet, name: str) -> list[tuple[bool | None, bool]]:
    """What RabbitMQ retains on the server's state topic, as (`on`, retain flag): a fresh
    exact-topic subscriber gets it on subscribe, before a marker published after the
    SUBACK."""
    spy = _watch(fleet, STATE, name)
    try:
        spy.publish(STATE, MARKER)
        spy.wait_for(STATE, MARKER)
        out: list[tuple[bool | None, bool]] = []
        for m in spy.received(STATE):
            if m.payload == MARKER:
                return out
            out.append((_decode(m.payload), m.retain))
        return out
    finally:
        spy.close()


@pytest.mark.postgres
def test_killed_amqp_servers_hold_devices_until_one_is_back(
        tmp_path: Path, cluster: RabbitCluster, pg_database: str) -> None:
    """Two servers over AMQP, the agent connected after both announced (RabbitMQ gave it
    no retained announcement). kill -9 of one: the other answers its will, the agent
    keeps draining. kill -9 of the other: its will reaches the agent, which holds its
    writes and says "server unavailable since T"; one restarted, the agent drains, each
    write applied once."""
    cluster.ensure_ready()
    with OneNodeFleet(tmp_path, cluster, pg_database, metrics=False) as fleet:
        fleet.start()
        fleet.add_server("server-2")
        fleet.start_server("server-2")
        for sid in ("server-1", "server-2"):
            fleet.servers[sid].wait_event("announce_link_connected", timeout=30)
        fleet.add_device(DEV, [SCOPE])
        fleet.start_agent(DEV)
        ag = fleet.agent(DEV)
        _put(ag, "before")
        fleet.wait_drained(DEV)
        assert (ag.status().server or {}).get("up") is None  # no retained ones on RabbitMQ

        fleet.kill_server("server-2")
        fleet.servers["server-1"].wait_event("announce_repeated", timeout=20)
        fleet.wait(lambda: (ag.status().server or {}).get("up") is True, timeout=20,
                   what="server group up: server-1 answered server-2's last will")
        _put(ag, "one-down")
        fleet.wait_drained(DEV, timeout=30)

        spy = _spy(fleet)
        try:
            killed_at = int(time.time() * 1000)
            fleet.kill_server("server-1")
            fleet.wait(lambda: "server_unavailable" in _codes(ag), timeout=20,
                       what="status: server unavailable (the last server's will)")
            [deferral] = ag.status().deferred
            assert deferral["since_ms"] >= killed_at - 1000
            assert "server unavailable since" in ag.status().summary()
            for i in range(3):
                _put(ag, f"while-down-{i}")
            _held_by_the_daemon(fleet, spy, 3)
            assert ag.status().pending == 3
            fleet.start_server("server-1")
            fleet.wait_drained(DEV, timeout=60)
            assert all(fleet.record("inventory", f"while-down-{i}") is not None
                       for i in range(3))
            # exactly once: one sequence per write in the scope, none for a duplicate
            assert fleet.scope_seq(SCOPE) == 5
            fleet.wait(lambda: ag.status().deferred == [], timeout=10, what="no deferral")
        finally:
            spy.close()


def test_clean_stop_announces_down_and_announce_false_clears(fleet: RabbitFleet) -> None:
    """Up after connecting (retained); a clean stop: `on: false`, live and retained;
    `announce = false`: the retained announcement is cleared (an empty retained
    message, live to the group's subscribers)."""
    group = _watch(fleet, GROUP, "group-watch")
    try:
        fleet.start_server()
        fleet.servers["server-1"].wait_event("announce_link_connected", timeout=30)
        wait_until(lambda: True in _live(group), 20,
                   message=lambda: f"live on:true, got {_live(group)}")
        assert _retained(fleet, "exact-1") == [(True, True)]

        fleet.stop_server()
        wait_until(lambda: _live(group)[-1:] == [False], 20,
                   message=lambda: f"live on:false after the clean stop, got {_live(group)}")
        assert _retained(fleet, "exact-2") == [(False, True)]

        path = fleet.server_configs["server-1"]
        path.write_text("announce = false\n" + path.read_text())
        fleet.start_server()
        wait_until(lambda: _live(group)[-1:] == [None], 20,
                   message=lambda: f"live clearing, got {_live(group)}")
        assert _retained(fleet, "exact-3") == []
    finally:
        group.close()


class _LateListener:
    """A port where nothing listens until `open()`, then relays to RabbitMQ's MQTT."""

    def __init__(self, target: int) -> None:
        self.port = free_port()
        self.target = target
        self._sock: socket.socket | None = None

    def open(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._sock is not None
        for client, upstream in relay_pairs(self._sock, ("127.0.0.1", self.target)):
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def test_unreachable_mqtt_listener_does_not_stop_merging(
        fleet: RabbitFleet, cluster: RabbitCluster) -> None:
    """Nothing at the [mqtt] port: the server merges over AMQP all the same, logs once
    why it cannot announce and what to do (its metric says it does not announce), and
    announces once the listener is there."""
    fleet.add_device(DEV, [SCOPE])  # the agent's config names the real MQTT listener
    late = _LateListener(cluster.mqtt_port(0))
    path = fleet.server_configs["server-1"]
    text = path.read_text()
    assert f"port = {fleet.port}\n" in text
    path.write_text(text.replace(f"port = {fleet.port}\n", f"port = {late.port}\n"))
    server = fleet.start_server()   # waits for `server_connected` (AMQP)
    try:
        failed = server.wait_event("announce_link_failed", timeout=30)
        assert failed["problem"] == "connection_refused", failed
        assert "[mqtt] host and port" in failed["hint"], failed
        assert "announce = false" in failed["hint"], failed
        fleet.start_agent(DEV)
        ag = fleet.agent(DEV)
        for i in range(3):
            _put(ag, f"sku-{i}")
        fleet.wait_drained(DEV, timeout=60)
        assert fleet.scope_seq(SCOPE) == 3
        assert len(server.events("announce_link_failed")) == 1  # once, not per attempt
        assert not server.events("announce_link_connected")
        assert fleet.metrics()[ANNOUNCING] == 0

        late.open()  # the link retries by itself (backoff) and announces
        connected = server.wait_event("announce_link_connected", timeout=25)
        assert connected["after_failure"] is True, connected
        assert _retained(fleet, "exact-late") == [(True, True)]
        assert fleet.metrics()[ANNOUNCING] == 1
    finally:
        late.close()
