"""A device offline longer than the server keeps tombstones resyncs by snapshot and keeps
its outbox (PROTOCOL.md, catch-up and snapshots).

The server runs with a one-second tombstone retention, so a delete made while the device
is away is purged before it comes back: its checkpoint is then older than the scope's
purge horizon and the log cannot tell it about the delete. The server answers its
catch-up with a snapshot; the device drops what the snapshot does not hold (the deleted
record) and keeps every write it made offline on top, which then syncs exactly once.
"""

from __future__ import annotations

import pytest

from tests.e2e.fleet import Fleet

pytestmark = pytest.mark.e2e

SCOPE = "depot-7"
RETENTION_ENV = {"WAYSTATION_SERVER__MERGE__TOMBSTONE_RETENTION_S": "1"}


def test_device_back_after_tombstone_purge_takes_snapshot_and_keeps_outbox(
        fleet: Fleet) -> None:
    fleet.stop_server()
    fleet.start_server(env=RETENTION_ENV)
    for dev in ("van-1", "van-2"):
        fleet.add_device(dev, [SCOPE])
    fleet.start_agents("van-1", "van-2")
    one, two = fleet.agent("van-1"), fleet.agent("van-2")
    for key in ("sku-a", "sku-b", "sku-c"):
        one.put("inventory", key, {"depot": SCOPE, "sku": key, "bin": "A-1"})
        one.increment("inventory", key, "stock", 10)
    fleet.wait_converged("van-1", "van-2", timeout=30)
    assert two.get("inventory", "sku-b") is not None

    # van-2 goes away and keeps working.
    assert fleet.stop_agent("van-2") == 0
    cp_before = two.status().checkpoints[SCOPE]
    two.put("inventory", "sku-a", {"bin": "B-7"})
    two.increment("inventory", "sku-c", "stock", 5)
    two.put("inventory", "sku-d", {"depot": SCOPE, "sku": "sku-d", "bin": "C-2"})
    two.increment("inventory", "sku-d", "stock", 3)
    offline_writes = 4
    assert fleet.pending("van-2") == offline_writes

    # Meanwhile van-1 deletes a record and edits another; the tombstone is purged.
    one.delete("inventory", "sku-b")
    one.increment("inventory", "sku-c", "stock", 1)
    fleet.wait_drained("van-1", timeout=30)
    seq_before = fleet.scope_seq(SCOPE)

    def purged_past_checkpoint() -> bool:
        with fleet.store.read() as txn:
            return txn.purge_horizon(SCOPE) > cp_before

    fleet.wait(purged_past_checkpoint, 30, what="the sku-b tombstone purged", interval=0.1)
    assert fleet.record("inventory", "sku-b") is None   # gone, not even a tombstone
    assert two.get("inventory", "sku-b") is not None    # van-2 never heard of the delete

    # Back: a snapshot, not a catch-up from the log, and the outbox survives it.
    agent = fleet.start_agent("van-2")
    dropped = agent.wait_event("snapshot_dropped_records", timeout=30)
    assert dropped["count"] >= 1, dropped
    fleet.wait_drained("van-2", timeout=30)
    fleet.wait_converged("van-1", "van-2", timeout=30)

    assert two.get("inventory", "sku-b", include_deleted=True) is None
    assert sorted(r.key for r in two.list("inventory")) == ["sku-a", "sku-c", "sku-d"]
    assert fleet.value("inventory", "sku-a", "bin") == "B-7"
    assert fleet.value("inventory", "sku-c", "stock") == 10 + 5 + 1
    assert fleet.value("inventory", "sku-d", "stock") == 3
    assert fleet.scope_seq(SCOPE) == seq_before + offline_writes   # each applied once
    assert two.dead_letters() == []
    status = fleet.agent_status("van-2")
    assert status["pending"] == 0 and status["snapshots"] == []
