"""A device the server counted offline while its connection stayed up (a stale last will,
a broker that misjudged its session) is shown what it missed once its status says
online again, though it neither reconnects nor asks (PROTOCOL.md §7.6): through the real
brokers, with a real agent writing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.fleet import Fleet
from tests.e2e.protocol_device import ProtocolDevice

pytestmark = pytest.mark.e2e

SCOPE = "depot-7"


@pytest.fixture
def fleet_options() -> dict[str, Any]:
    """The `fleet` fixture's servers wait 2 s (not 10) for a catch-up before a nudge."""
    return {"merge": {"missed_grace_ms": 2000}}


def _online(fleet: Fleet, dev: str) -> bool:
    out = fleet.cli("server", "devices", "--json", "--config", str(fleet.server_config)).stdout
    rows: list[dict[str, Any]] = json.loads(out)
    return any(r["id"] == dev and r["online"] for r in rows)


def test_a_device_counted_offline_while_connected_is_shown_the_gap(fleet: Fleet) -> None:
    fleet.add_device("van-1", [SCOPE])
    fleet.add_device("pd-1", [SCOPE])
    fleet.start_agent("van-1")
    van = fleet.agent("van-1")
    pd = ProtocolDevice("pd-1", fleet.passwords["pd-1"], port=fleet.port, scopes=[SCOPE])
    try:
        assert pd.connect() == "Success", fleet.broker_log_tail()
        pd.hello()
        pd.sync_from_server()
        van.put("inventory", "sku-1", {"depot": SCOPE, "sku": "sku-1"})
        fleet.wait(lambda: ("inventory", "sku-1") in pd.records, 30, what="a live delta")
        seen = max(r["q"] for m in pd.deltas for r in m["d"])

        pd.say_online(False)  # as a stale will would: the connection stays up
        fleet.wait(lambda: not _online(fleet, "pd-1"), 30, what="pd-1 counted offline")
        van.put("inventory", "sku-2", {"depot": SCOPE, "sku": "sku-2"})
        van.put("inventory", "sku-3", {"depot": SCOPE, "sku": "sku-3"})
        fleet.wait_drained("van-1")
        deltas_before = len(pd.deltas)

        pd.say_online(True)  # its periodic status: no hello, no catch-up
        fleet.wait(lambda: ("inventory", "sku-3") in pd.records, 60,
                   what="the missed record shown after the grace")
        nudge = pd.deltas[deltas_before:]
        recs = [r for m in nudge for r in m["d"]]
        # One record: the scope's last, at the sequence after the one it missed, so a
        # device tracking its checkpoint (§9.4) sees the gap and catches up.
        assert [(r["k"], r["q"]) for r in recs] == [("sku-3", seen + 2)], recs
        assert ("inventory", "sku-2") not in pd.records
        req = pd.catchup()
        fleet.wait(lambda: pd.caught_up(req), 30, what="the catch-up the gap calls for")
        assert ("inventory", "sku-2") in pd.records
    finally:
        pd.close()


def test_a_device_enabled_again_while_online_gets_what_it_missed(fleet: Fleet) -> None:
    """Disabled, an online agent gets no deltas; `device enable` sends it a `sync`
    command, which it answers with a hello but no catch-up. Without being shown the gap it
    would hold the records written meanwhile only after its next reconnect."""
    fleet.add_device("van-1", ["route-1"])
    fleet.add_device("van-2", ["route-1"])
    fleet.start_agents("van-1", "van-2")
    fleet.agent("van-1").put("tasks", "t-1", {"route": "route-1", "status": "out"})
    fleet.wait_drained("van-1")
    fleet.wait(lambda: fleet.agent("van-2").get("tasks", "t-1"), 30, what="t-1 on van-2")

    fleet.cli("device", "disable", "van-2", "--config", str(fleet.server_config))
    fleet.agent("van-1").put("tasks", "t-2", {"route": "route-1", "status": "out"})
    fleet.wait_drained("van-1")
    fleet.cli("device", "enable", "van-2", "--config", str(fleet.server_config))
    fleet.wait(lambda: fleet.agent("van-2").get("tasks", "t-2"), 60,
               what="t-2 on van-2 after it was enabled again")
