"""The agent's side of the `schema` capability (PROTOCOL.md §11): told by the server's
welcome that it is too old, it says "upgrade needed" and holds its changes; once
upgraded, its changes written under a version the server no longer reads are sent as
the oldest one it does."""

from __future__ import annotations

import tomllib
from pathlib import Path

from agent.api import Agent
from schemas import wire
from schemas.collection import parse_catalog
from tests.agent.agentkit import FakeClock, make_cfg
from tests.schema_versions import V2


def test_too_old_device_says_upgrade_needed_and_keeps_its_writes(
        agent: Agent) -> None:
    agent.put("tasks", "t-1", {"route": "route-42", "notes": "n"})
    caps = agent.sync.apply_welcome(wire.Welcome(caps=["schema"], sv=4, sv_min=2))
    assert caps == frozenset({"schema"}) and agent.sync.upgrade_needed
    status = agent.status()
    assert status.last_error is not None and status.last_error["code"] == "schema_version"
    assert "upgrade needed" in status.summary()
    assert "runs schema version 1" in status.last_error["reason"]
    assert status.pending == 1 and [e["sv"] for e in agent.pending()] == [1]


def test_welcome_without_the_schema_cap_or_floor_changes_nothing(agent: Agent) -> None:
    agent.put("tasks", "t-1", {"route": "route-42"})
    agent.sync.apply_welcome(wire.Welcome(caps=[], sv=4, sv_min=2))
    assert not agent.sync.upgrade_needed and agent.status().last_error is None
    agent.sync.apply_welcome(wire.Welcome(caps=["schema"], sv=4))
    assert not agent.sync.upgrade_needed and agent.status().last_error is None


def test_after_the_upgrade_old_writes_are_sent_as_the_oldest_served_version(
        tmp_path: Path, catalog: object) -> None:
    cfg = make_cfg(tmp_path / "data")
    clock = FakeClock()
    old = Agent.open(cfg, catalog, now_ms=clock)  # type: ignore[arg-type]
    old.put("tasks", "t-1", {"route": "route-42", "notes": "written on v1"})
    old.sync.apply_welcome(wire.Welcome(caps=["schema"], sv=4, sv_min=2))
    assert old.sync.upgrade_needed
    old.close()

    upgraded = Agent.open(cfg, parse_catalog(tomllib.loads(V2)), now_ms=clock)
    try:
        upgraded.put("tasks", "t-2", {"route": "route-42", "floor": 3})
        assert not upgraded.sync.apply_welcome(
            wire.Welcome(caps=["schema"], sv=4, sv_min=2)).isdisjoint({"schema"})
        assert not upgraded.sync.upgrade_needed
        assert upgraded.status().last_error is None
        assert [e["sv"] for e in upgraded.pending()] == [2, 2]
        batch = upgraded.sync.next_batch()
        assert batch.sv == 2 and len(batch) == 2
    finally:
        upgraded.close()
