"""Scopes that change (issue 10 §2) with real processes on both fleets: `waystation
device scopes` takes effect without re-enrolment — the server stops sending a removed
scope at once, the device drops its records and catches up the added one, and the new
list survives a restart of the agent."""

from __future__ import annotations

import json

import pytest

from agent.errors import WriteRefused
from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _keys(fleet: Fleet, dev: str) -> set[str]:
    return {r.key for r in fleet.agent(dev).list("tasks")}


def test_scopes_added_and_removed_reach_a_running_device(fleet: Fleet) -> None:
    fleet.add_device("van-1", ["route-1"])
    fleet.add_device("van-2", ["route-1", "route-2"])
    fleet.start_agents("van-1", "van-2")
    other = fleet.agent("van-2")
    other.put("tasks", "t-1", {"route": "route-1", "notes": "one"})
    other.put("tasks", "t-2", {"route": "route-2", "notes": "two"})
    fleet.wait_drained("van-2")
    fleet.wait(lambda: _keys(fleet, "van-1") == {"t-1"} or None, what="van-1 has t-1")

    out = fleet.cli("device", "scopes", "van-1", "--add", "route-2", "--remove", "route-1",
                    "--json", "--config", str(fleet.server_config)).stdout
    doc = json.loads(out)
    assert doc["scopes"] == ["route-2"] and doc["device_speaks_scopes"] is True
    assert doc["command"].startswith("scopes-")
    fleet.scopes["van-1"] = ("route-2",)

    # The device drops route-1 and catches up route-2, no restart, no config edit.
    fleet.wait(lambda: _keys(fleet, "van-1") == {"t-2"} or None, timeout=60,
               what="van-1 follows route-2 only")
    # The server stops sending route-1: t-3 never arrives, t-4 (written after it) does.
    other.put("tasks", "t-3", {"route": "route-1", "notes": "not for van-1"})
    other.put("tasks", "t-4", {"route": "route-2", "notes": "for van-1"})
    fleet.wait(lambda: "t-4" in _keys(fleet, "van-1") or None, timeout=60, what="t-4")
    assert "t-3" not in _keys(fleet, "van-1")
    # Local writes follow the new list (this process shares the store with the daemon).
    with pytest.raises(WriteRefused) as refused:
        fleet.agent("van-1").put("tasks", "t-9", {"route": "route-1"})
    assert refused.value.code == "scope_denied"
    fleet.agent("van-1").put("tasks", "t-10", {"route": "route-2", "notes": "mine"})
    fleet.wait_converged("van-1")
    assert fleet.value("tasks", "t-10", "notes") == "mine"

    # The device reported the command done; the list survives a restart of the agent.
    rows = json.loads(fleet.cli("device", "list", "--json", "--config",
                                str(fleet.server_config)).stdout)
    assert next(r for r in rows if r["id"] == "van-1")["scopes"] == ["route-2"]
    assert fleet.stop_agent("van-1") == 0
    fleet.start_agent("van-1")
    other.put("tasks", "t-5", {"route": "route-2", "notes": "after restart"})
    other.put("tasks", "t-6", {"route": "route-1", "notes": "still not"})
    fleet.wait(lambda: "t-5" in _keys(fleet, "van-1") or None, timeout=60, what="t-5")
    fleet.wait_converged("van-1")
    assert "t-6" not in _keys(fleet, "van-1")


def test_bad_scope_changes_are_refused_with_a_reason(fleet: Fleet) -> None:
    fleet.add_device("van-1", ["route-1"])
    cfg = str(fleet.server_config)
    res = fleet.cli("device", "scopes", "van-1", "--remove", "route-1", "--config", cfg,
                    check=False)
    assert res.returncode != 0 and "would follow no scope" in res.stderr
    res = fleet.cli("device", "scopes", "van-1", "--remove", "route-9", "--config", cfg,
                    check=False)
    assert res.returncode != 0 and "does not follow route-9" in res.stderr
    res = fleet.cli("device", "scopes", "nobody", "--add", "route-1", "--config", cfg,
                    check=False)
    assert res.returncode != 0 and "not registered" in res.stderr
    res = fleet.cli("device", "scopes", "van-1", "--add", "bad scope!", "--config", cfg,
                    check=False)
    assert res.returncode == 2 and "not a valid scope" in res.stderr
    out = fleet.cli("device", "scopes", "van-1", "--config", cfg).stdout
    assert "follows: route-1" in out
