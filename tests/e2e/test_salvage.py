"""`agent salvage` end to end: the pending writes of a damaged, moved-aside device store
reach the merge server from the fresh store, merged as the late writes they are.

The damaged store is a copy of the device's store taken while it held five pending
changes, two of which it then sent and had applied (their acks are not in the copy:
what a power loss does to the non-durable ack commits), with both its meta pages
overwritten (LMDB cannot open it: only the raw pages still give its changes).
Meanwhile another device wrote one of the same fields later. Before: no such command;
the three never-sent writes were lost for the user.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from agent.store import ENV_DIRNAME
from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PAGE = 4096


def _conflicts(fleet: Fleet, c: str, k: str, field: str) -> list[dict[str, object]]:
    with fleet.store.read() as txn:
        rows = txn.conflicts(open_only=False, limit=10_000)
    return [dict(r.entry) for r in rows if (r.c, r.k, r.field) == (c, k, field)]


def test_salvaged_writes_reach_the_server_without_overwriting_newer_data(
        fleet: Fleet, tmp_path: Path) -> None:
    fleet.add_device("van-13", ["route-1"])
    fleet.add_device("van-14", ["route-1"])
    fleet.start_agents("van-13", "van-14")
    fleet.agent("van-13").put("tasks", "t-1", {"route": "route-1", "notes": "first"})
    fleet.wait_drained("van-13")
    fleet.wait_converged("van-14")
    assert fleet.stop_agent("van-13") == 0

    ag = fleet.agent("van-13")  # offline: saved locally, pending
    ag.put("tasks", "t-2", {"route": "route-1", "status": "written offline"})
    ag.put("tasks", "t-1", {"notes": "van-13, older"})
    fleet.close_agents()
    data_dir = Path(fleet.agent_config("van-13").data_dir)
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)  # t-2 and t-1 pending in it, their acks never come

    fleet.start_agent("van-13")  # sends both: applied on the server
    fleet.wait_drained("van-13")
    assert fleet.stop_agent("van-13") == 0
    fleet.close_agents()
    fleet.agent("van-14").put("tasks", "t-1", {"notes": "van-14, newer"})
    fleet.wait_drained("van-14")
    fleet.close_agents()

    # The copy gets three more writes that never leave it, then loses its last page.
    cfg = fleet.agent_config_path("van-13")
    for args in (("put", "tasks", "t-3", "route=route-1", "status=never sent"),
                 ("incr", "tasks", "t-3", "attempts", "1"),
                 ("add", "tasks", "t-3", "labels", "fragile")):
        fleet.cli("agent", *args, "--config", str(cfg), env={"WAYSTATION_AGENT__DATA_DIR":
                                                              f'"{copy}"'})
    old = data_dir / "agent.lmdb.damaged"
    shutil.rmtree(data_dir / ENV_DIRNAME)  # the store that was in use is gone
    shutil.move(str(copy / ENV_DIRNAME), str(old))
    data = old / "data.mdb"
    with data.open("r+b") as f:  # both meta pages overwritten: LMDB cannot open it
        f.write(os.urandom(2 * PAGE))
    before = data.read_bytes()

    fleet.start_agent("van-13")  # a fresh store: a new incarnation, catches up
    fleet.wait_converged("van-13")
    report = json.loads(fleet.cli("agent", "salvage", str(old), "--apply", "--json",
                                  "--config", str(cfg)).stdout)
    by_key = {(i["collection"], i["key"]): i for i in report["recovered"]}
    synced = {(i["collection"], i["key"]) for i in report["already_synced"]}
    assert ("tasks", "t-2") in synced  # its stamp is on the server: not sent again
    assert {k for _, k in by_key} == {"t-1", "t-3"}, report
    assert all(i.get("from_pages") for i in report["recovered"])
    fleet.wait_drained("van-13")
    fleet.wait_converged("van-13", "van-14")

    assert fleet.value("tasks", "t-3", "status") == "never sent"
    assert fleet.value("tasks", "t-3", "attempts") == 1
    assert fleet.value("tasks", "t-3", "labels") == ["fragile"]
    assert fleet.value("tasks", "t-2", "status") == "written offline"
    # The salvaged t-1 write keeps its old stamp: the newer value stays, the salvaged
    # one is logged as the loser (never overwritten silently).
    assert fleet.value("tasks", "t-1", "notes") == "van-14, newer"
    assert any("van-13, older" in json.dumps(e) for e in _conflicts(fleet, "tasks", "t-1",
                                                                   "notes"))
    assert fleet.agent("van-14").get("tasks", "t-3") is not None
    fleet.close_agents()

    again = json.loads(fleet.cli("agent", "salvage", str(old), "--apply", "--json",
                                 "--config", str(cfg)).stdout)
    assert again["counts"]["recovered"] == 0
    assert again["counts"]["already_salvaged"] == len(report["recovered"])
    assert fleet.pending("van-13") == 0
    assert data.read_bytes() == before  # never written
