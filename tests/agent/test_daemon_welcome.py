"""When the agent daemon marks transactions (PROTOCOL.md §7.11, §11): only after a
`welcome` agreed to `txn`; a server that is down or restarting is waited for, and a
server is taken for one from before capabilities only on evidence (it answers other
messages while two hellos get no welcome). Over a real broker, with a scripted server
(a plain paho client).

The bug this guards: a server SIGKILLed between reading a hello and sending its welcome
left the agent without one; after `ack_timeout_s` it sent its transactions as plain
changes to the restarted server, which applied one change of a transaction and refused
the other.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson

from agent.daemon import AgentDaemon
from schemas.collection import example_catalog_path, load_catalog
from tests.fixtures_brokers import PREFIX, USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_until
from waystation.config import AgentConfig

CATALOG = load_catalog(example_catalog_path())
DEV = "van-12"
D = "depot-7"
UP, DOWN = f"{PREFIX}/{DEV}/up", f"{PREFIX}/{DEV}/down"
STATE = f"{PREFIX}/_server/main/server-1/state"
ACK_TIMEOUT = 0.4




def _daemon(broker: BrokerProcess, tmp_path: Path) -> AgentDaemon:
    cfg = AgentConfig.model_validate({
        "device_id": DEV, "data_dir": str(tmp_path / "agent"), "scopes": [D],
        "mqtt": {"port": broker.port, "password": USERS[DEV]},
        "sync": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5,
                 "ack_timeout_s": ACK_TIMEOUT}})
    return AgentDaemon(cfg, CATALOG, env={})


def _up(server: RecordingClient, kind: str) -> list[dict[str, Any]]:
    msgs = [orjson.loads(m.payload) for m in server.received(UP)]
    return [m for m in msgs if m["type"] == kind]


def _announce(server: RecordingClient, on: bool) -> None:
    server.publish(STATE, orjson.dumps({"type": "server", "v": 1, "grp": "main",
                                        "srv": "server-1", "on": on,
                                        "t": int(time.time() * 1000)}), retain=True)


def _send(server: RecordingClient, msg: dict[str, Any]) -> None:
    server.publish(DOWN, orjson.dumps({"v": 1, **msg}))


def _transaction(daemon: AgentDaemon) -> list[int]:
    with daemon.agent.transaction() as tx:
        tx.put("inventory", "bin-a", {"depot": D, "sku": "A"})
        tx.put("inventory", "bin-b", {"depot": D, "sku": "A"})
    return [r.n or 0 for r in tx.results]


def _sent_changes(server: RecordingClient) -> list[dict[str, Any]]:
    return [ch for m in _up(server, "changes") for ch in m["ch"]]


def _wait_quiet(daemon: AgentDaemon, factor: float) -> None:
    """Let `factor` ack timeouts pass since the daemon's latest hello: a negative claim
    ("nothing was sent") needs the time in which the old code did send."""
    wait_until(lambda: time.monotonic() - daemon._hello_at > factor * ACK_TIMEOUT,
               10 + factor * ACK_TIMEOUT)


def test_a_restarted_server_is_greeted_again_and_transactions_wait_for_it(
        broker: BrokerProcess, server: RecordingClient, tmp_path: Path) -> None:
    _announce(server, True)
    daemon = _daemon(broker, tmp_path)
    try:
        daemon.start()
        wait_until(lambda: len(_up(server, "hello")) >= 1, 15, message="first hello")
        _announce(server, False)  # killed before its welcome went out
        wait_until(lambda: daemon.gate.server.up is False, 10, message="server seen down")
        numbers = _transaction(daemon)
        _wait_quiet(daemon, 4)
        assert _sent_changes(server) == []  # no welcome, server down: held back
        hellos = len(_up(server, "hello"))
        _announce(server, True)  # restarted
        wait_until(lambda: len(_up(server, "hello")) > hellos, 10, message="hello again")
        _wait_quiet(daemon, 4)  # a server that does not answer at all is waited for too
        assert _sent_changes(server) == []
        _send(server, {"type": "welcome", "caps": ["txn"], "srv": "test/1"})
        sent = wait_until(lambda: _sent_changes(server) or None, 10, message="changes")
        assert sorted(ch["n"] for ch in sent) == numbers
        assert all(ch["tx"] == [numbers[0], 2] for ch in sent)
    finally:
        daemon.stop(drain_s=0.5)


def test_a_server_from_before_capabilities_gets_plain_changes_after_two_hellos(
        broker: BrokerProcess, server: RecordingClient, tmp_path: Path) -> None:
    """A server that answers the catch-up but never sends a welcome (and announces
    nothing): after a second hello, also unanswered by a welcome, the transaction goes
    as plain changes (TRANSACTIONS.md, "Atomicity against an old server")."""
    daemon = _daemon(broker, tmp_path)
    try:
        daemon.start()
        [req] = wait_until(lambda: _up(server, "catchup") or None, 15, message="catch-up")
        numbers = _transaction(daemon)
        _wait_quiet(daemon, 3)
        assert _sent_changes(server) == []  # silence alone proves nothing
        _send(server, {"type": "checkpoint", "req": req["req"], "cp": {D: 0}})
        wait_until(lambda: len(_up(server, "hello")) >= 2, 10, message="second hello")
        sent = wait_until(lambda: _sent_changes(server) or None, 10, message="changes")
        assert sorted(ch["n"] for ch in sent) == numbers
        assert all("tx" not in ch for ch in sent)
        assert len(_up(server, "hello")) == 2
    finally:
        daemon.stop(drain_s=0.5)
