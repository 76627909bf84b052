"""The agent daemon and the `schema` message (PROTOCOL.md §7.13), over a real broker with
a scripted server (a plain paho client): taken only once a `welcome` agreed
`schema_push`, then announced in a `hello` with the new `sv`; a message the device
cannot use changes nothing and brings no hello."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.daemon import AgentDaemon
from schemas.collection import example_catalog_path, load_catalog
from tests.fixtures_brokers import PREFIX, USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_until
from tests.schema_versions import V2, V4
from waystation.config import AgentConfig

CATALOG = load_catalog(example_catalog_path())
DEV = "van-12"
UP, DOWN = f"{PREFIX}/{DEV}/up", f"{PREFIX}/{DEV}/down"




@pytest.fixture
def daemon(broker: BrokerProcess, tmp_path: Path) -> Iterator[AgentDaemon]:
    cfg = AgentConfig.model_validate({
        "device_id": DEV, "data_dir": str(tmp_path / "agent"), "scopes": ["depot-7"],
        "mqtt": {"port": broker.port, "password": USERS[DEV]},
        "sync": {"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "ack_timeout_s": 0.4}})
    d = AgentDaemon(cfg, CATALOG, env={})
    d.start()
    yield d
    d.stop()


def hellos(server: RecordingClient) -> list[dict[str, Any]]:
    msgs = [orjson.loads(m.payload) for m in server.received(UP)]
    return [m for m in msgs if m["type"] == "hello"]


def send(server: RecordingClient, msg: dict[str, Any]) -> None:
    server.publish(DOWN, orjson.dumps({"v": 1, **msg}))


def welcome(server: RecordingClient, caps: list[str]) -> None:
    send(server, {"type": "welcome", "caps": caps, "srv": "test/1", "sv": 2, "sv_min": 1})


def test_schema_after_an_agreement_is_taken_and_announced(server: RecordingClient,
                                                          daemon: AgentDaemon) -> None:
    wait_until(lambda: hellos(server), 15, message="first hello")
    first = hellos(server)[0]
    assert first["sv"] == 1 and "schema_push" in first["caps"]
    welcome(server, ["schema", "schema_push"])
    send(server, {"type": "schema", "sv": 2, "text": V2})
    wait_until(lambda: any(h["sv"] == 2 for h in hellos(server)), 10,
               message="hello with sv 2")
    assert daemon.agent.status().schema_version == 2


def test_schema_without_agreement_or_unusable_changes_nothing(server: RecordingClient,
                                                               daemon: AgentDaemon) -> None:
    wait_until(lambda: hellos(server), 15, message="first hello")
    welcome(server, ["schema"])  # schema_push not agreed on this connection
    send(server, {"type": "schema", "sv": 2, "text": V2})
    welcome(server, ["schema", "schema_push"])
    send(server, {"type": "schema", "sv": 4, "text": V4})  # cannot follow 1: notes is gone
    send(server, {"type": "schema", "sv": 2, "text": "x" * 70_000})  # over the bound
    before = len(hellos(server))
    wait_until(lambda: daemon.stats.bad_messages >= 1, 10, message="oversized refused")
    time.sleep(1.0)  # a negative claim: give a wrongly sent hello the time to arrive
    assert len(hellos(server)) == before and all(h["sv"] == 1 for h in hellos(server))
    status = daemon.agent.status()
    assert status.schema_version == 1
    assert status.last_error is not None and status.last_error["code"] == "schema_refused"
