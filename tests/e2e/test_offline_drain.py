"""Writes made while the device is offline reach the server exactly once when it returns."""

from __future__ import annotations

import pytest

from tests.e2e.fleet import Fleet

pytestmark = pytest.mark.e2e

RECORDS = 10
WRITES = 200


def applied_outcomes(fleet: Fleet, dev: str, count: int) -> dict[int, tuple[str, int]]:
    """change number -> (scope, q) of every applied change 1..count of `dev`."""
    out: dict[int, tuple[str, int]] = {}
    ns = fleet.outcome_ns(dev)
    with fleet.store.read() as txn:
        for n in range(1, count + 1):
            row = txn.get_outcome(ns, n)
            assert row is not None and row.applied, f"{dev}:{n} has outcome {row}"
            out[n] = (row.scope, row.q)
    return out


def test_offline_writes_drain_on_reconnect(fleet: Fleet) -> None:
    """200 writes saved while the agent is down are each applied exactly once after it starts."""
    fleet.add_device("van-1", ["depot-7"])
    ag = fleet.agent("van-1")
    for j in range(RECORDS):
        ag.put("inventory", f"sku-{j}", {"depot": "depot-7", "sku": f"sku-{j}"})
    expected_stock = dict.fromkeys(range(RECORDS), 0)
    expected_bin: dict[int, str] = {}
    for i in range(WRITES):
        j = (i // 2) % RECORDS
        if i % 2 == 0:
            ag.increment("inventory", f"sku-{j}", "stock", 1)
            expected_stock[j] += 1
        else:
            ag.put("inventory", f"sku-{j}", {"bin": f"bin-{i}"})
            expected_bin[j] = f"bin-{i}"
    total = RECORDS + WRITES

    status = ag.status()
    assert not status.online
    assert status.pending == total == len(ag.pending())
    assert "waiting for connection" in status.summary()
    assert fleet.scope_seq("depot-7") == 0

    fleet.start_agent("van-1")
    fleet.wait_drained("van-1", timeout=60)

    for j in range(RECORDS):
        rec = fleet.record("inventory", f"sku-{j}")
        assert rec is not None
        assert rec["f"]["stock"] == expected_stock[j] == WRITES // RECORDS // 2
        assert rec["f"]["bin"] == expected_bin[j]
    # Exactly once: every change has one outcome, and the scope's log grew by exactly
    # one sequence number per change (a second apply would have taken another q).
    outcomes = applied_outcomes(fleet, "van-1", total)
    assert sorted(q for _, q in outcomes.values()) == list(range(1, total + 1))
    assert fleet.scope_seq("depot-7") == total
    assert ag.dead_letters() == []
    fleet.wait_converged("van-1", timeout=30)
    assert fleet.mismatches("van-1") == []


def test_high_priority_change_overtaking_its_records_creation(fleet: Fleet) -> None:
    """A high-priority increment drained before the put that created its record is applied."""
    fleet.add_device("van-1", ["depot-7"])
    ag = fleet.agent("van-1")
    ag.put("inventory", "sku-1", {"depot": "depot-7", "name": "Bread flour"})
    ag.increment("inventory", "sku-1", "stock", 5, priority=9)  # drains first
    ag.add("inventory", "sku-1", "tags", ["urgent"], priority=5)
    fleet.start_agent("van-1")
    fleet.wait_drained("van-1")
    assert ag.dead_letters() == []
    rec = fleet.record("inventory", "sku-1")
    assert rec is not None
    assert rec["f"] == {"depot": "depot-7", "name": "Bread flour", "stock": 5,
                        "tags": ["urgent"]}
    fleet.wait_converged("van-1")
