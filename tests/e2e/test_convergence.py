"""Several real agents converge on the server's view (DESIGN.md guarantees 2 and 3)."""

from __future__ import annotations

import time

import pytest

from tests.e2e.fleet import Fleet
from waystation.hlc import Stamp

pytestmark = pytest.mark.e2e

DEVS = ("van-1", "van-2", "van-3")
SCOPES = ("route-42", "depot-7")


def conflict_log(fleet: Fleet, c: str, k: str, field: str) -> list[dict[str, object]]:
    """The server's conflict-log entries (open or not) for one field of one record."""
    with fleet.store.read() as txn:
        rows = txn.conflicts(open_only=False, limit=10_000)
    return [{**r.entry, "open": r.open} for r in rows if (r.c, r.k, r.field) == (c, k, field)]


def test_three_devices_converge_after_concurrent_edits(fleet: Fleet) -> None:
    """Three devices editing the same records offline converge; every loser is logged."""
    for dev in DEVS:
        fleet.add_device(dev, SCOPES)
    fleet.start_agents(*DEVS)
    ag = {dev: fleet.agent(dev) for dev in DEVS}
    ag["van-1"].put("tasks", "t-1", {"route": "route-42", "customer": "Hendrikse Bakery",
                                     "status": "out", "address": "Keizersgracht 12"})
    ag["van-1"].add("tasks", "t-1", "labels", ["fragile"])
    ag["van-1"].put("tasks", "t-2", {"route": "route-42", "status": "out"})
    ag["van-1"].put("inventory", "sku-1", {"depot": "depot-7", "name": "Bread flour"})
    ag["van-1"].increment("inventory", "sku-1", "stock", 10)
    fleet.wait_converged(*DEVS, timeout=30)  # everyone holds the same starting point

    fleet.stop_agents(*DEVS)
    # Offline, all three edit the same records.
    statuses = {"van-1": "delivered", "van-2": "failed", "van-3": "returned"}
    stamps = {dev: Stamp.parse(ag[dev].put("tasks", "t-1", {"status": value}).stamp or "")
              for dev, value in statuses.items()}
    ag["van-1"].put("tasks", "t-1", {"address": "Keizersgracht 12, rear entrance"})  # manual
    ag["van-2"].put("tasks", "t-1", {"address": "Keizersgracht 14"})
    attempts = {"van-1": 1, "van-2": 2, "van-3": 3}
    stock = {"van-1": -3, "van-2": -2, "van-3": 5}
    for dev in DEVS:
        ag[dev].increment("tasks", "t-1", "attempts", attempts[dev])
        ag[dev].increment("inventory", "sku-1", "stock", stock[dev])
    ag["van-1"].remove("tasks", "t-1", "labels", ["fragile"])
    ag["van-1"].add("tasks", "t-1", "labels", ["heavy"])
    ag["van-2"].add("tasks", "t-1", "labels", ["fragile"])  # concurrent re-add: add wins
    ag["van-3"].add("tasks", "t-1", "labels", ["cold"])
    edit = ag["van-2"].put("tasks", "t-2", {"notes": "gate locked"})
    delete = ag["van-3"].delete("tasks", "t-2")
    assert Stamp.parse(delete.stamp or "") > Stamp.parse(edit.stamp or "")
    for dev in DEVS:
        assert ag[dev].status().pending > 0

    fleet.start_agents(*DEVS)
    fleet.wait_converged(*DEVS, timeout=60)

    t1 = fleet.record("tasks", "t-1")
    assert t1 is not None
    winner = max(DEVS, key=lambda d: stamps[d])
    assert t1["f"]["status"] == statuses[winner]
    lww = conflict_log(fleet, "tasks", "t-1", "status")
    losers = {e["loser"]["v"] for e in lww if e["kind"] == "lww"}  # type: ignore[index]
    assert losers == {v for d, v in statuses.items() if d != winner}, lww
    # The manual field: one value kept, the other an open conflict everywhere.
    assert "address" in t1.get("cf", {}), t1
    kept, candidates = t1["f"]["address"], [c["v"] for c in t1["cf"]["address"]]
    assert {kept, *candidates} == {"Keizersgracht 12, rear entrance", "Keizersgracht 14"}
    assert any(e["open"] and e["kind"] == "manual"
               for e in conflict_log(fleet, "tasks", "t-1", "address"))
    for dev in DEVS:
        rec = ag[dev].get("tasks", "t-1")
        assert rec is not None and "address" in rec.conflicts
        assert ag[dev].status().open_conflicts >= 1
    # Counters add up exactly; the set kept the concurrent re-add.
    assert t1["f"]["attempts"] == sum(attempts.values())
    assert fleet.value("inventory", "sku-1", "stock") == 10 + sum(stock.values())
    assert t1["f"]["labels"] == ["cold", "fragile", "heavy"]
    # The delete won over the edit it had not seen; the edit is in the log.
    t2 = fleet.record("tasks", "t-2")
    assert t2 is not None and t2.get("x"), t2
    lost = conflict_log(fleet, "tasks", "t-2", "notes")
    assert [e["loser"]["v"] for e in lost if e["kind"] == "delete"] == ["gate locked"]  # type: ignore[index]
    for dev in DEVS:
        assert ag[dev].get("tasks", "t-2") is None
        assert fleet.mismatches(dev) == []


CATCHUP_PAGE = 100
"""van-a's catch-up page size in the catch-up test: records / CATCHUP_PAGE = 5 pages."""


@pytest.mark.slow
def test_device_offline_for_many_changes_catches_up_in_pages(fleet: Fleet) -> None:
    """A device offline while another wrote 1,000 changes catches up (paged) to the server.

    The property is catch-up over several pages, not volume: van-a asks for pages of
    CATCHUP_PAGE records (its `sync.catchup_page`; 1000 by default), so 500 records (a
    put and an increment each) take 5 pages, as 5,000 records (10,000 changes) did at the
    default page size, for a tenth of the writing. Volume is measured in bench/catchup.py."""
    records = 500  # a put and an increment each: 1,000 changes
    fleet.add_device("van-a", ["depot-7"])
    fleet.edit_agent_config("van-a", lambda d: d.setdefault("sync", {}).update(
        catchup_page=CATCHUP_PAGE))
    fleet.add_device("van-b", ["depot-7"])
    fleet.start_agent("van-a")
    fleet.stop_agent("van-a")
    fleet.start_agent("van-b")
    b = fleet.agent("van-b")
    started = time.perf_counter()
    for i in range(records):
        key = f"sku-{i:05d}"
        b.put("inventory", key, {"depot": "depot-7", "sku": key})
        b.increment("inventory", key, "stock", i % 7 + 1)
    written = time.perf_counter() - started
    fleet.wait_drained("van-b", timeout=240)
    drained = time.perf_counter() - started
    assert fleet.scope_seq("depot-7") == 2 * records
    a = fleet.agent("van-a")
    assert a.checkpoints()["depot-7"].cp == 0 and a.list("inventory", limit=1) == []

    started = time.perf_counter()
    fleet.start_agent("van-a", wait=False)
    seen: set[int] = set()

    def caught_up() -> bool:
        cp = a.checkpoints()["depot-7"].cp
        seen.add(cp)
        return cp == 2 * records

    fleet.wait(caught_up, 120, what="van-a caught up to the server's sequence", interval=0.02)
    took = time.perf_counter() - started
    steps = sorted(seen - {0, 2 * records})
    print(f"\n{fleet.kind}: van-b wrote {2 * records} changes in {written:.1f} s, all acked "
          f"after {drained:.1f} s; van-a caught up on {records} records in {took:.2f} s "
          f"(process start included; checkpoints seen on the way: {steps})")
    assert len(a.list("inventory")) == records
    assert fleet.mismatches("van-a") == []
    last = records - 1
    assert a.get("inventory", f"sku-{last:05d}").fields["stock"] == last % 7 + 1  # type: ignore[union-attr]
    fleet.wait_converged("van-a", "van-b", timeout=60)
