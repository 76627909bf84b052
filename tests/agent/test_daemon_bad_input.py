"""The agent daemon against bad messages on its down topic, over a real broker."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from agent.daemon import AgentDaemon
from schemas.collection import example_catalog_path, load_catalog
from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess, start_embedded
from tests.helpers import RecordingClient, wait_until
from waystation.config import AgentConfig

CATALOG = load_catalog(example_catalog_path())
DEV = "van-12"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    proc = start_embedded(tmp_path / "broker")
    yield proc
    proc.stop()


def test_daemon_survives_garbage_on_its_down_topic(broker: BrokerProcess, tmp_path: Path) -> None:
    """Malformed bytes, a zip bomb, unknown types, wrong shapes and a valid-looking ack
    for changes it never sent: the daemon counts each as a bad message (or ignores the
    stray ack), keeps its outbox intact, and still applies the next real message."""
    cfg = AgentConfig.model_validate({
        "device_id": DEV, "data_dir": str(tmp_path / "agent"), "scopes": ["route-42"],
        "mqtt": {"port": broker.port, "password": USERS[DEV]},
        "sync": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5}})
    daemon = AgentDaemon(cfg, CATALOG, env={})
    server = RecordingClient(broker.port, "test-server", SERVER_USER, USERS[SERVER_USER])
    try:
        daemon.start()
        assert daemon.link.wait_connected(10)
        server.connect()
        # The daemon is connected but no server answers: the write stays pending.
        daemon.agent.put("tasks", "t-1", {"route": "route-42", "status": "out"})
        down = f"{PREFIX}/{DEV}/down"
        bad = [
            b"\x00\x01 not json",
            b"[1, 2, 3]",
            b'{"type": "ack", "v": 2, "ok": []}',
            b'{"type": "hello", "v": 1, "dev": "van-12", "agent": "x", "sv": 1}',
            b'{"type": "nonsense", "v": 1}',
            b'{"type": "delta", "v": 1, "d": [{"c": "tasks"}]}',
            b'{"type": "page", "v": 1}',
            zlib.compress(b'{"type":"delta","v":1,"d":[' + b" " * (4 << 20) + b"]}"),
            b"\x78\x9c broken zlib",
        ]
        for payload in bad:
            server.publish(down, payload)
        assert wait_until(lambda: daemon.stats.bad_messages >= len(bad), 15), \
            daemon.stats.bad_messages
        stray = orjson.dumps({"type": "ack", "v": 1, "ok": [[999, "route-42", 5]]})
        server.publish(down, stray)
        assert daemon.sync.pending_count() == 1
        # A real delta still gets through and is applied.
        delta = {"type": "delta", "v": 1, "d": [{
            "c": "tasks", "k": "t-2", "s": "route-42", "q": 1,
            "f": {"route": "route-42", "status": "delivered"},
            "h": {"route": "0192f2a4c9b10000:van-7", "status": "0192f2a4c9b10000:van-7"}}]}
        server.publish(down, orjson.dumps(delta))

        def applied() -> bool:
            rec = daemon.agent.get("tasks", "t-2")
            return rec is not None and rec.fields.get("status") == "delivered"

        assert wait_until(applied, 10)
        assert daemon.sync.pending_count() == 1 and daemon.connected
    finally:
        server.abort()
        daemon.stop(drain_s=0.5)
