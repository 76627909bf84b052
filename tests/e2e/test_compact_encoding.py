"""Capabilities zd1 and zd2 over the real broker and server (PROTOCOL.md §3, §11): a
current agent and a v1 device that offers no capabilities share a scope. The agent's
messages travel with the preset dictionary both ways once the server's welcome agreed to
it, its up messages with its schema's dictionary (zd2: the server holds the same schema,
so it agreed to the id the hello named); the v1
device, decoding with plain zlib and JSON as the protocol always allowed, receives only
what it can read, and each sees the other's changes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.fleet import Fleet
from tests.e2e.protocol_device import ProtocolDevice
from tests.helpers import wait_until

pytestmark = pytest.mark.e2e

ZD3_READ = 'waystation_server_zd3_streams_total{outcome="read"}'
ZD3_UNKNOWN = 'waystation_server_zd3_streams_total{outcome="unknown"}'


@pytest.fixture
def fleet_options() -> dict[str, Any]:
    """The `fleet` fixture's servers serve metrics (tests/e2e/conftest.py)."""
    return {"metrics": True}


def test_old_and_new_devices_side_by_side(fleet: Fleet) -> None:
    fleet.add_device("van-1", ["route-42"])
    fleet.add_device("van-2", ["route-42"])
    proc = fleet.start_agent("van-1")
    welcome = wait_until(lambda: proc.events("welcome"), 30, message="the agent's welcome")
    assert {"zd1", "zd2", "zd3"} <= set(welcome[-1]["caps"])

    old = ProtocolDevice("van-2", fleet.passwords["van-2"], port=fleet.port,
                         scopes=["route-42"])
    assert old.connect() == "Success", fleet.broker_log_tail()
    try:
        old.hello()  # a v1 hello: no caps
        old.sync_from_server()

        ag = fleet.agent("van-1")
        ag.put("tasks", "t-new", {"route": "route-42", "status": "out",
                                  "notes": "written by the current agent"})
        fleet.wait_drained("van-1")
        old.wait(lambda: any(r.get("k") == "t-new" for d in old.deltas
                             for r in d.get("d", [])), 30, "the agent's change as a delta")

        ch = old.change("tasks", "t-old", "route-42",
                        f={"route": "route-42", "status": "delivered"})
        old.send_changes([ch])
        old.wait_acked([ch["n"]])
        wait_until(lambda: ag.get("tasks", "t-old"), 30, message="the v1 change at the agent")
        assert old.undecodable == [], "the v1 device got something it cannot read"
    finally:
        old.close()


def test_a_device_whose_schema_copy_differs_keeps_zd1(fleet: Fleet) -> None:
    """Same schema version, one more field in the device's copy: its dictionary has
    another id, which the server does not hold, so it is not offered zd2 and syncs with
    zd1 as before (nothing refused, nothing lost)."""
    fleet.add_device("van-1", ["route-42"])
    original = fleet.agent_config("van-1").schema_path().read_text()
    assert "[collections.tasks.fields]\n" in original
    copy = fleet.root / "van-1-schema.toml"
    copy.write_text(original.replace("[collections.tasks.fields]\n",
                                     "[collections.tasks.fields]\nextra = { type = \"string\" }\n"))

    def use_copy(data: dict[str, Any]) -> None:
        data["schema_file"] = str(copy)

    fleet.edit_agent_config("van-1", use_copy)
    proc = fleet.start_agent("van-1")
    welcome = wait_until(lambda: proc.events("welcome"), 30, message="the agent's welcome")
    assert "zd1" in welcome[-1]["caps"] and "zd2" not in welcome[-1]["caps"]
    ag = fleet.agent("van-1")
    ag.put("tasks", "t-1", {"route": "route-42", "status": "out", "notes": "zd1 still"})
    fleet.wait_drained("van-1")
    assert proc.events("zd2_dropped") == []


def test_lone_changes_use_recent_traffic_and_survive_a_server_restart(fleet: Fleet) -> None:
    """zd3: on a quiet link each lone change after the first is compressed with the
    device's last answered ones and read by the server; a restarted server no longer
    holds them, refuses the next such stream (`dictionary_unknown`, no dead letter), and
    the agent sends it again at once with zd2: the change arrives, nothing is lost."""
    fleet.add_device("van-1", ["route-42"])
    proc = fleet.start_agent("van-1")
    welcome = wait_until(lambda: proc.events("welcome"), 30, message="the agent's welcome")
    assert "zd3" in welcome[-1]["caps"]
    ag = fleet.agent("van-1")
    for i in range(5):
        ag.put("tasks", f"t-{i}", {"route": "route-42", "status": "out",
                                   "notes": f"lone change {i} on a quiet link"})
        fleet.wait_drained("van-1")
    fleet.wait(lambda: fleet.metrics()[ZD3_READ] >= 4, 15, what="4 zd3 streams read")
    assert fleet.metrics()[ZD3_UNKNOWN] == 0

    fleet.kill_server()
    fleet.start_server()
    fleet.wait(lambda: len(proc.events("welcome")) >= 2, 60, what="a welcome from the new server")
    ag.put("tasks", "t-after", {"route": "route-42", "status": "out", "notes": "after"})
    fleet.wait_drained("van-1")
    fleet.wait(lambda: fleet.record("tasks", "t-after"), 30, what="the change at the server")
    assert proc.events("zd3_references_reset"), proc.log_tail()
    assert fleet.metrics()[ZD3_UNKNOWN] >= 1
    assert fleet.server_dead_letters() == []
