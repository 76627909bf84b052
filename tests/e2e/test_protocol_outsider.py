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
