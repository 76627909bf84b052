"""The change feed tells apps what they otherwise had to poll for, and a long outage does
not push their data events out of it: real broker (embedded amqtt), merge server and
agent daemon processes, LMDB stores; one fleet for the module (each test its device).

- no broker at the device's port, the agent retrying fast: `GET /v1/status`'s link follows
  every retry while the feed holds one `retrying` event, and the app's `local` event
  from before the outage is still there;
- the merge server killed (its last will) and started again: one `server` event each
  way, with the state the status shows;
- a schema version published while the device is online: a `schema` event {from, to},
  after which the records read in the new version's names.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.api import Agent
from agent.models import FeedEvent
from tests.e2e.fleet import Fleet
from tests.helpers import free_port
from tests.schema_versions import V1, V2, V3

pytestmark = pytest.mark.e2e

SCOPE = "route-42"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One started fleet (embedded broker, LMDB server store) for the module."""
    f = Fleet(tmp_path_factory.mktemp("feed-events"), "embedded", "lmdb")
    try:
        f.start()
        yield f
    finally:
        f.close()


def _device_wide(ag: Agent, since: int, kind: str) -> list[FeedEvent]:
    return [e for e in ag.feed_after(since, limit=10_000) if e.kind == kind]


def test_an_outage_retried_fast_is_one_feed_event(fleet: Fleet) -> None:
    """Backoff 0.1-1 s with nothing listening at the broker's port: 15 retries reach the
    status (meta link, each with its own time), one `retrying` event reaches the feed
    (the old agent recorded one per retry), and the app's `local` event written before
    the outage reads back after it with nothing truncated."""
    dev = "van-retry"
    fleet.add_device(dev, [SCOPE])
    # No broker at its port: refused at once, and no login guard on the broker's side
    # to slow the retries down or change their code.
    fleet.edit_agent_config(dev, lambda d: d["mqtt"].update(port=free_port()))
    ag = fleet.agent(dev)
    before = ag.feed_position()
    written = ag.put("tasks", "t-1", {"route": SCOPE, "status": "out"})
    fleet.start_agent(dev, wait=False)
    try:
        _outage(fleet, ag, before, written.change_id)
    finally:
        assert fleet.stop_agent(dev) == 0


def _outage(fleet: Fleet, ag: Agent, before: int, change_id: str) -> None:
    seen: set[int] = set()

    def retried() -> bool | None:
        link = ag.status().link
        if link is not None and link["code"] == "connection_refused":
            seen.add(link["t"])
        return len(seen) >= 15 or None

    fleet.wait(retried, timeout=90, what="15 retries in the status")
    events = ag.feed_after(before, limit=10_000)
    kinds = [e.kind for e in events]
    assert kinds[0] == "local" and events[0].data == {"change_ids": [change_id]}
    assert "truncated" not in kinds
    retrying = [e for e in events if e.kind == "retrying"]
    assert [e.data["code"] for e in retrying] == ["connection_refused"], kinds


def test_server_down_and_up_are_one_feed_event_each(fleet: Fleet) -> None:
    """The merge server killed: its last will takes the group down, one `server` event
    up: false (since when); started again, one `server` event up: true. The status (the
    CLI, another process) says the same."""
    dev = "van-server"
    fleet.add_device(dev, [SCOPE])
    fleet.start_agent(dev)
    ag = fleet.agent(dev)
    fleet.wait(lambda: _device_wide(ag, 0, "server") or None, timeout=30,
               what="the group seen up")
    [up] = _device_wide(ag, 0, "server")
    assert (up.collection, up.key) == ("", "")
    group = fleet.agent_config(dev).policy.server_group
    assert up.data["group"] == group and up.data["up"] is True
    pos = ag.feed_position()
    killed_at = int(time.time() * 1000)
    fleet.kill_server()
    fleet.wait(lambda: _device_wide(ag, pos, "server") or None, timeout=60,
               what="a server event after the kill")
    assert fleet.agent_status(dev)["server"]["up"] is False
    fleet.start_server()
    fleet.wait(lambda: len(_device_wide(ag, pos, "server")) >= 2 or None, timeout=60,
               what="a server event after the restart")
    ag.put("tasks", "t-after", {"route": SCOPE, "status": "out"})
    fleet.wait_drained(dev)
    down, again = (e.data for e in _device_wide(ag, pos, "server"))
    assert down["group"] == group and down["up"] is False
    assert down["since_ms"] >= killed_at - 1000
    assert again["up"] is True and again["since_ms"] >= down["since_ms"]
    assert len(_device_wide(ag, pos, "server")) == 2  # once each way, not per message
    assert fleet.agent_status(dev)["server"]["up"] is True
    assert fleet.stop_agent(dev) == 0


def _publish(fleet: Fleet, tmp_path: Path, version: int, text: str) -> None:
    path = tmp_path / f"fleet-v{version}.toml"
    path.write_text(text)
    fleet.cli("schema", "publish", str(path), "--config", str(fleet.server_config))


def test_a_published_version_is_a_schema_event(fleet: Fleet, tmp_path: Path) -> None:
    """Online, the device takes version 2 then 3 (`notes` renamed `note`) as they are
    published: a `schema` event each, and a record read after the second is in the new
    names."""
    dev = "van-schema"
    _publish(fleet, tmp_path, 1, V1)
    fleet.add_device(dev, [SCOPE])
    fleet.start_agent(dev)
    ag = fleet.agent(dev)
    ag.put("tasks", "t-1", {"route": SCOPE, "notes": "gate 4"})
    fleet.wait_drained(dev)
    pos = ag.feed_position()
    for version, text in ((2, V2), (3, V3)):
        _publish(fleet, tmp_path, version, text)
        fleet.wait(lambda v=version: [  # type: ignore[misc]
            e.data for e in _device_wide(ag, pos, "schema")][-1:] == [
            {"from": v - 1, "to": v}] or None, timeout=60, what=f"a schema event to {version}")
    got: list[dict[str, Any]] = [e.data for e in _device_wide(ag, pos, "schema")]
    assert got == [{"from": 1, "to": 2}, {"from": 2, "to": 3}]
    fields = ag.get("tasks", "t-1").fields
    assert fields["note"] == "gate 4" and "notes" not in fields
    assert fleet.stop_agent(dev) == 0
