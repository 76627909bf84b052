"""The merge server's Prometheus endpoint (`metrics_port`) against what really happened."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.fleet import Fleet

pytestmark = pytest.mark.e2e

APPLIED = 'waystation_server_changes_total{outcome="applied"}'
REJECTED = 'waystation_server_changes_total{outcome="rejected"}'
ONLINE = 'waystation_server_devices{state="online"}'
REGISTERED = 'waystation_server_devices{state="registered"}'
CONNECTED = "waystation_server_broker_connected"


@pytest.fixture
def fleet_options() -> dict[str, Any]:
    """The `fleet` fixture's servers serve metrics (tests/e2e/conftest.py)."""
    return {"metrics": True}


def online_in_registry(fleet: Fleet) -> set[str]:
    """Devices the server's registry (what `waystation server devices` lists) holds as
    online; the server flushes presence to it about once a second."""
    with fleet.store.read() as txn:
        return {row.id for row in txn.devices() if row.online}


def wait_online(fleet: Fleet, expected: set[str]) -> None:
    """Until the endpoint's online gauge and the registry both show exactly `expected`."""
    fleet.wait(lambda: fleet.metrics()[ONLINE] == len(expected)
               and online_in_registry(fleet) == expected, 30,
               what=f"online: {sorted(expected)}", interval=0.1)


def test_metrics_count_applied_changes_and_follow_presence(fleet: Fleet) -> None:
    """changes_total{applied} equals the changes in the store; devices{online} follows
    the devices coming, leaving cleanly and dying."""
    devs = ("van-1", "van-2", "van-3")
    for dev in devs:
        fleet.add_device(dev, ["depot-7"])
    fleet.wait(lambda: fleet.metrics()[REGISTERED] == 3, 30, what="3 devices registered")
    first = fleet.metrics()
    assert (first[ONLINE], first[APPLIED], first[REJECTED], first[CONNECTED]) == (0, 0, 0, 1)

    fleet.start_agents("van-1", "van-2")        # van-3 stays away
    wait_online(fleet, {"van-1", "van-2"})

    one, two = fleet.agent("van-1"), fleet.agent("van-2")
    one.put("inventory", "sku-1", {"depot": "depot-7", "name": "Bread flour"})
    for _ in range(30):
        one.increment("inventory", "sku-1", "stock", 1)
    two.put("inventory", "sku-2", {"depot": "depot-7"})
    for i in range(10):
        two.put("inventory", "sku-2", {"bin": f"B-{i}"})
    refused = two.increment("inventory", "sku-2", "stock", -5)   # stock may not go below 0
    fleet.wait_drained("van-1", "van-2")
    assert [d.n for d in two.dead_letters()] == [refused.n]

    applied = 31 + 11
    assert fleet.scope_seq("depot-7") == applied   # one q per applied change
    namespaces = {dev: fleet.outcome_ns(dev) for dev in ("van-1", "van-2")}
    with fleet.store.read() as txn:
        outcomes = [txn.get_outcome(namespaces[dev], n)
                    for dev, last in (("van-1", 31), ("van-2", 12))
                    for n in range(1, last + 1)]
    assert sum(1 for o in outcomes if o is not None and o.applied) == applied
    # The counters move after the commit and its answers: wait for the numbers, then
    # check that they stay exact.
    fleet.wait(lambda: fleet.metrics()[APPLIED] == applied, 15, what=f"{applied} applied")
    m = fleet.metrics()
    assert (m[APPLIED], m[REJECTED]) == (applied, 1)

    fleet.stop_agent("van-2")        # clean shutdown: it says it is offline
    wait_online(fleet, {"van-1"})
    fleet.kill_agent("van-1")        # kill -9: the broker publishes its last will
    wait_online(fleet, set())
    fleet.start_agent("van-3")
    wait_online(fleet, {"van-3"})
    assert fleet.metrics()[APPLIED] == applied
