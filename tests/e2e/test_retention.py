"""Retention with real processes on both fleets (issue 10 §3): a running agent evicts
delivered tasks the schema declares evictable, never one with a pending write; the
server's later changes and the catch-up after a restart do not re-create them stale;
`waystation agent fetch` brings one back through the server (capability `fetch`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from schemas.collection import example_catalog_path
from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

AFTER_S = 4


def _short_retention_schema(root: Path, after_s: int = AFTER_S) -> Path:
    """The example fleet schema with tasks evicted `after_s` seconds after sync."""
    text = example_catalog_path().read_text()
    text, count = re.subn(r'retention = \{ after = "7d"', f'retention = {{ after = "{after_s}s"',
                          text)
    assert count == 1
    path = root / "fleet-retention.toml"
    path.write_text(text)
    return path


def _keys(fleet: Fleet, dev: str) -> set[str]:
    return {r.key for r in fleet.agent(dev).list("tasks")}


def test_evict_then_fetch_back(fleet: Fleet) -> None:
    schema = _short_retention_schema(fleet.root)
    fleet.add_device("van-1", ["route-1"])
    fleet.add_device("van-2", ["route-1"])

    def retention(data: dict[str, Any]) -> None:
        data["schema_file"] = str(schema)
        data["retention"] = {"interval_s": 0.5, "batch": 50}

    fleet.edit_agent_config("van-1", retention)
    fleet.start_agents("van-1", "van-2")
    other, mine = fleet.agent("van-2"), fleet.agent("van-1")
    other.put("tasks", "t-done", {"route": "route-1", "status": "delivered", "notes": "signed"})
    other.put("tasks", "t-out", {"route": "route-1", "status": "out"})
    other.put("tasks", "t-pend", {"route": "route-1", "status": "delivered"})
    fleet.wait_drained("van-2")
    fleet.wait(lambda: _keys(fleet, "van-1") >= {"t-done", "t-out", "t-pend"} or None,
               what="van-1 has the three tasks")
    # A pending write holds t-pend: with the server down it stays pending, and
    # eviction (which runs offline too) leaves it.
    fleet.stop_server()
    mine.put("tasks", "t-pend", {"notes": "not yet sent"})
    fleet.wait(lambda: "t-done" not in _keys(fleet, "van-1") or None, timeout=60,
               what="van-1 evicts t-done")
    assert {"t-out", "t-pend"} <= _keys(fleet, "van-1")
    status = fleet.agent_status("van-1")
    assert status["evicted"] == 1 and status["pending"] == 1
    fleet.start_server()

    # The server's later change to the evicted record (a partial delta) does not re-create
    # it half-known on the device; the catch-up after a restart does not either.
    other.put("tasks", "t-done", {"notes": "countersigned"})
    fleet.wait_drained("van-2", "van-1")
    fleet.stop_agent("van-1")
    fleet.start_agent("van-1")
    fleet.wait(lambda: fleet.agent_status("van-1")["pending"] == 0 or None,
               what="van-1 drained")
    assert "t-done" not in _keys(fleet, "van-1")
    assert "t-done" in mine.evicted_keys("tasks")
    assert fleet.mismatches("van-1") == []

    # Fetched back through the server, whole and current, by the CLI beside the daemon.
    out = fleet.cli("agent", "fetch", "tasks", "t-done", "t-nobody", "--wait", "30", "--json",
                    "--config", str(fleet.agent_config_path("van-1"))).stdout
    doc = json.loads(out)
    assert doc["waiting"] == [] and doc["missing"] == ["t-nobody"]
    (record,) = doc["records"]
    assert record["key"] == "t-done"
    assert record["fields"] == {"route": "route-1", "status": "delivered",
                                "notes": "countersigned"}
    fleet.wait_converged("van-1")
    # t-pend was acked after the restart: from then on it goes like any other.
    fleet.wait(lambda: "t-pend" not in _keys(fleet, "van-1") or None, timeout=60,
               what="van-1 evicts t-pend once acked")
    assert fleet.value("tasks", "t-pend", "notes") == "not yet sent"
    # Deleted while evicted, like any other write on it (it was refused: "no record").
    assert mine.delete("tasks", "t-pend").state == "pending"
    fleet.wait_drained("van-1")
    fleet.wait(lambda: (fleet.record("tasks", "t-pend") or {}).get("x") or None,
               what="the server deletes t-pend")
    assert fleet.mismatches("van-1") == []


def test_server_expiry_reaches_every_device(fleet: Fleet) -> None:
    """Records the server lets expire are deleted by the server: an online device drops
    them at once (delta), one that was offline on its catch-up; the others stay."""
    fleet.stop_server()
    with fleet.server_config.open("a") as f:
        f.write('\n[retention]\ninterval_s = 1\n\n[retention.collections.tasks]\n'
                'after = "3s"\nwhen = { status = ["delivered"] }\n')
    fleet.start_server()
    fleet.add_device("van-1", ["route-1"])
    fleet.add_device("van-2", ["route-1"])
    fleet.start_agents("van-1", "van-2")
    other = fleet.agent("van-2")
    other.put("tasks", "t-done", {"route": "route-1", "status": "delivered"})
    other.put("tasks", "t-out", {"route": "route-1", "status": "out"})
    fleet.wait_drained("van-2")
    fleet.wait(lambda: _keys(fleet, "van-1") >= {"t-done", "t-out"} or None,
               what="van-1 has both tasks")
    fleet.stop_agent("van-2")  # offline while the record expires
    fleet.wait(lambda: "t-done" not in _keys(fleet, "van-1") or None, timeout=60,
               what="the server's expiry reaches the online van-1")
    rec = fleet.record("tasks", "t-done")
    assert rec is not None and rec.get("x") is True
    assert fleet.record("tasks", "t-out") is not None
    assert not fleet.record("tasks", "t-out").get("x")  # type: ignore[union-attr]
    assert fleet.server.wait_event("records_expired")["count"] >= 1
    fleet.start_agent("van-2")
    fleet.wait(lambda: "t-done" not in _keys(fleet, "van-2") or None, timeout=60,
               what="van-2 learns the expiry by catch-up")
    assert "t-out" in _keys(fleet, "van-2")
    fleet.wait_converged("van-1", "van-2")
