"""Fetch by query with real processes on both fleets (issue 10 §3, PROTOCOL.md §7.14.1):
a running agent evicts delivered tasks; `waystation agent fetch tasks --where ...`
brings them back through the server, page by page (the limit, then the server's scan
budget stop the answer early and its cursor goes on); the records are held again, and
retention evicts them again once its period has passed since the fetch."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.fleet import Fleet
from tests.e2e.test_retention import _short_retention_schema

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DELIVERED = [f"d-{i}" for i in range(1, 7)]
OUT = [f"o-{i:03d}" for i in range(150)]
BUDGET = 100
AFTER_S = 6
"""Retention's period, counted from the sync, then from the fetch: the test waits for it
twice (~2 * AFTER_S). A fetched record must still be held when `agent fetch` reads it,
one 0.05 s poll after the daemon applied the answer: 6 s leaves room for a loaded
machine."""


def _keys(fleet: Fleet, dev: str) -> set[str]:
    return {r.key for r in fleet.agent(dev).list("tasks")}


def _fetch(fleet: Fleet, dev: str, *args: str) -> dict[str, Any]:
    out = fleet.cli("agent", "fetch", "tasks", "--where", '{"status": "delivered"}',
                    "--wait", "30", "--json", *args,
                    "--config", str(fleet.agent_config_path(dev))).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


def test_evict_then_fetch_back_by_query_in_pages(fleet: Fleet) -> None:
    fleet.stop_server()
    with fleet.server_config.open("a") as f:
        f.write(f"\n[merge]\nfetch_query_scan_budget = {BUDGET}\n")
    fleet.start_server()
    schema = _short_retention_schema(fleet.root, AFTER_S)
    fleet.add_device("van-1", ["route-1"])
    fleet.add_device("van-2", ["route-1", "route-2"])

    def retention(data: dict[str, Any]) -> None:
        data["schema_file"] = str(schema)
        data["retention"] = {"interval_s": 0.5, "batch": 200}

    fleet.edit_agent_config("van-1", retention)
    fleet.start_agents("van-1", "van-2")
    other = fleet.agent("van-2")
    for k in DELIVERED:
        other.put("tasks", k, {"route": "route-1", "status": "delivered", "notes": k})
    # A delivered task of a scope van-1 does not follow: never sent to it.
    other.put("tasks", "d-0", {"route": "route-2", "status": "delivered"})
    for k in OUT:
        other.put("tasks", k, {"route": "route-1", "status": "out"})
    fleet.wait_drained("van-2")
    fleet.wait(lambda: set(OUT) <= _keys(fleet, "van-1") or None, timeout=120,
               what="van-1 has the out tasks")
    fleet.wait(lambda: not (set(DELIVERED) & _keys(fleet, "van-1")) or None, timeout=120,
               what="van-1 evicts the delivered tasks")
    assert set(DELIVERED) <= set(fleet.agent("van-1").evicted_keys("tasks"))

    # Page 1: the limit stops it.
    first = _fetch(fleet, "van-1", "--limit", "4")
    assert first["state"] == "done", first
    assert [r["key"] for r in first["records"]] == DELIVERED[:4]
    assert first["stop"] == "limit" and first["next"] == DELIVERED[3]
    assert first["records"][0]["fields"] == {"route": "route-1", "status": "delivered",
                                             "notes": "d-1"}
    # Page 2: the rest of the matches, then the server's scan budget stops it.
    second = _fetch(fleet, "van-1", "--limit", "100", "--after", first["next"])
    assert [r["key"] for r in second["records"]] == DELIVERED[4:]
    assert second["stop"] == "budget" and second["scanned"] == BUDGET
    assert second["next"] is not None and second["next"].startswith("o-")
    # Page 3: the end of the collection; nothing more matches.
    third = _fetch(fleet, "van-1", "--limit", "100", "--after", second["next"])
    assert third["state"] == "done" and third["records"] == [] and third["next"] is None
    # The records came back (each answer lists what the device held once it was applied;
    # the feed says so too), and the device never saw the other scope's. They may be
    # evicted again by now on a slow machine: retention counts from the fetch.
    fetched = {e.key for e in fleet.agent("van-1").feed_after(0, limit=5000)
               if e.kind == "fetched"}
    assert set(DELIVERED) <= fetched and "d-0" not in fetched
    assert "d-0" not in _keys(fleet, "van-1")
    fleet.wait_converged("van-1")

    # A filter the server cannot evaluate fails plainly (the device's schema knows the
    # field; here the type is wrong, refused locally before anything is queued).
    bad = fleet.cli("agent", "fetch", "tasks", "--where", '{"eta": "soon"}',
                    "--config", str(fleet.agent_config_path("van-1")), check=False)
    assert bad.returncode != 0 and "eta" in bad.stderr
    assert fleet.agent_status("van-1")["fetch_queries"] == 0

    # Fetched records count as synced at the fetch: retention takes them again later.
    fleet.wait(lambda: not (set(DELIVERED) & _keys(fleet, "van-1")) or None, timeout=120,
               what="van-1 evicts the fetched tasks again")
