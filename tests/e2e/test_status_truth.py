"""Every figure means what its label says (issue 8 §4), with real processes on both
fleets: why a device is offline, a killed agent, the server's view of a device."""

from __future__ import annotations

import json

import pytest

from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _server_device(fleet: Fleet, dev: str) -> dict[str, object]:
    rows = json.loads(fleet.cli("server", "devices", "--json", "--config",
                                str(fleet.server_config)).stdout)
    return next(r for r in rows if r["id"] == dev)


def test_offline_says_why(fleet: Fleet) -> None:
    """A refused password, then a broker that is gone: status names each, then clears."""
    fleet.add_device("van-1", ["route-1"])
    good = fleet.passwords["van-1"]
    fleet.edit_agent_config("van-1", lambda d: d["mqtt"].update(password="wrong-" + good))
    fleet.start_agent("van-1", wait=False)
    fleet.agents["van-1"].wait_event("link_problem")
    fleet.wait(lambda: (fleet.agent_status("van-1").get("link") or {}).get("code")
               == "login_refused" or None, 60, what="status says the login was refused")
    status = fleet.agent_status("van-1")
    assert not status["online"] and "refused the login" in status["summary"]
    assert fleet.stop_agent("van-1") == 0
    fleet.edit_agent_config("van-1", lambda d: d["mqtt"].update(password=good))
    fleet.start_agent("van-1")
    fleet.wait(lambda: fleet.agent_status("van-1")["online"] or None, 60, what="online")
    assert fleet.agent_status("van-1")["link"] is None
    fleet.stop_broker()
    fleet.wait(lambda: (fleet.agent_status("van-1").get("link") or {}).get("code")
               == "connection_refused" or None, 60, what="status says nothing listens")
    assert "is the broker running" in fleet.agent_status("van-1")["summary"]
    fleet.start_broker()
    fleet.wait(lambda: fleet.agent_status("van-1")["online"] or None, 60, what="online")


def test_a_killed_agent_is_offline_at_once(fleet: Fleet) -> None:
    """kill -9: `agent status` says the daemon is not running right away (not after a
    heartbeat timeout), and the server's view turns offline (the last will)."""
    fleet.add_device("van-1", ["route-1"])
    fleet.start_agent("van-1")
    fleet.wait(lambda: fleet.agent_status("van-1")["online"] or None, 60, what="online")
    # ... and it is live: a merge server runs (no "as of" time on the presence)
    fleet.wait(lambda: ((row := _server_device(fleet, "van-1"))["online"]
                        and row["presence_as_of"] is None) or None, 60,
               what="the server sees it online, presence live")
    fleet.kill_agent("van-1")
    # The service's sync process dies with it (a moment later): well before the 65 s a
    # stale heartbeat would have been believed.
    status = fleet.wait(lambda: ((st := fleet.agent_status("van-1"))["agent_running"] is False
                        and st) or None, 10, what="status says the agent is not running")
    assert status["online"] is False and "not running" in status["summary"]
    fleet.wait(lambda: _server_device(fleet, "van-1")["online"] is False or None, 30,
               what="the server sees it offline")


def test_server_devices_reports_what_the_device_has(fleet: Fleet) -> None:
    """Reported checkpoints come from the device after its catch-up; last sync is the
    last ack or completed catch-up; PENDING falls to 0 right after the device's changes
    are synced, not at its next periodic status (30 s here, the default)."""
    fleet.add_device("van-1", ["route-1"])
    fleet.add_device("van-2", ["route-1"], sync={"status_interval_s": 30.0})
    for i in range(30):
        fleet.agent("van-2").put("tasks", f"t-{i}", {"route": "route-1"})
    fleet.start_agent("van-2")  # its status at the connect says 30 pending
    fleet.wait_drained("van-2")
    fleet.wait(lambda: _server_device(fleet, "van-2")["pending"] == 0 or None, 10,
               what="server devices shows van-2's outbox drained")
    fleet.start_agent("van-1")
    fleet.wait_converged("van-1")
    seq = fleet.scope_seq("route-1")

    def reported() -> dict[str, object] | None:
        row = _server_device(fleet, "van-1")
        cps = row["checkpoints"]
        assert isinstance(cps, dict)
        return row if cps["route-1"]["reported"] == seq else None

    row = fleet.wait(reported, 60, what="van-1 reports its checkpoint")
    assert row["checkpoints"]["route-1"]["behind"] == 0  # type: ignore[index]
    assert row["last_sync"]
