"""What an outside tester found running a device written from docs/PROTOCOL.md alone
against the real broker and server (tests/e2e/protocol_device.py is that device)."""

from __future__ import annotations

import time

import pytest

from tests.e2e.fleet import Fleet
from tests.e2e.protocol_device import ProtocolDevice

pytestmark = pytest.mark.e2e


def test_split_ack_names_each_restamped_change_beside_its_ok(fleet: Fleet) -> None:
    """§7.4: a large answer is split into several `ack` messages, each read on its own
    (and any of them can be lost). A re-stamped change's `rs` entry travels in the part
    that carries its `ok` entry and its `fx` state; every `rs` went in the first part."""
    fleet.add_device("pd-rs", ["route-42"])
    pd = ProtocolDevice("pd-rs", fleet.passwords["pd-rs"], port=fleet.port)
    assert pd.connect() == "Success", fleet.broker_log_tail()
    pd.hello()
    ahead = f"{time.time_ns() // 1_000_000 + 86_400_000:012x}"
    # 2 KB of notes each: the fx states carrying the new stamps need several acks
    changes = [pd.change("tasks", f"t-{i}", "route-42", h=f"{ahead}{i:04x}",
                         f={"route": "route-42", "notes": f"{i:04d}" * 480})
               for i in range(300)]
    pd.send(pd.changes_message(changes), compress=True)
    pd.wait_acked([ch["n"] for ch in changes], timeout=30)
    acks = [m for m in pd.messages if m.get("type") == "ack"]
    assert len(acks) > 1, "the answer was not split: make the changes larger"
    for ack in acks:
        oks = {n for n, _s, _q in ack["ok"]}
        assert set(ack.get("rs", [])) == oks, (sorted(oks)[:3], ack.get("rs", [])[:3])
    assert pd.restamped == {ch["n"] for ch in changes}
    pd.close()


def test_fresh_device_after_a_purge_gets_each_page_once(fleet: Fleet) -> None:
    """§9.5: a device from checkpoint 0 paging through a scope whose tombstones were
    purged (every scope after a restore, when every device resyncs from 0) is sent each
    page once. Its first page said no `reset`; its continuation, below the purge
    horizon, was answered with a reset from 0: the first page (up to 192 KiB) came
    twice, for every such device and scope."""
    fleet.stop_server()
    fleet.start_server(env={"WAYSTATION_SERVER__MERGE__TOMBSTONE_RETENTION_S": "1"})
    for dev in ("pd-writer", "pd-fresh"):
        fleet.add_device(dev, ["route-42"])
    writer = ProtocolDevice("pd-writer", fleet.passwords["pd-writer"], port=fleet.port)
    assert writer.connect() == "Success", fleet.broker_log_tail()
    writes = [writer.change("tasks", f"t-{i}", "route-42", f={"route": "route-42"})
              for i in range(6)]
    writer.send_changes(writes)
    gone = writer.change("tasks", "t-1", "route-42", op="del")
    writer.send_changes([gone])
    writer.wait_acked([ch["n"] for ch in [*writes, gone]])

    def purged() -> bool:
        with fleet.store.read() as txn:
            return txn.purge_horizon("route-42") > 3
    fleet.wait(purged, 30, what="the t-1 tombstone purged", interval=0.1)

    fresh = ProtocolDevice("pd-fresh", fleet.passwords["pd-fresh"], port=fleet.port,
                           scopes=["route-42"])
    assert fresh.connect() == "Success", fleet.broker_log_tail()
    fresh.sync_from_server(lim=2)
    starts = [p["from"] for p in fresh.pages]
    assert len(starts) == len(set(starts)), starts
    keys = [r["k"] for p in fresh.pages for r in p["recs"]]
    assert sorted(keys) == ["t-0", "t-2", "t-3", "t-4", "t-5"], keys
    assert fresh.snap == set()  # the checkpoint ended the snapshot
    writer.close()
    fresh.close()
