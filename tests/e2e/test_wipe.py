"""Remote wipe with real processes on both fleets (issue 8 §2): an online enabled device, a
disabled one, an offline one; the data is gone from the device's disk, nothing comes back
until the operator enables the device, and the operator sees the wipe pending / done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.api import Agent
from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECRET = "gate-code-93117"


def _device_row(fleet: Fleet, dev: str) -> dict[str, object]:
    rows = json.loads(fleet.cli("device", "list", "--json", "--config",
                                str(fleet.server_config)).stdout)
    return next(r for r in rows if r["id"] == dev)


def _wipe_done(fleet: Fleet, dev: str) -> bool:
    """The operator's device list says the device's wipe is done."""
    wipe = _device_row(fleet, dev)["wipe"]
    return isinstance(wipe, dict) and bool(wipe.get("done"))


def _data_file(fleet: Fleet, dev: str) -> Path:
    return Path(fleet.agent_config(dev).data_dir) / "agent.lmdb" / "data.mdb"


def _holds(fleet: Fleet, dev: str, needle: str) -> bool:
    data = _data_file(fleet, dev)
    return data.exists() and needle.encode() in data.read_bytes()


def _fresh_records(fleet: Fleet, dev: str) -> int:
    """Records the device's (new) store holds, opened afresh in this process."""
    with Agent.open(fleet.agent_config(dev), fleet.catalog, env={}) as ag:
        return len(ag.list("tasks"))


def _prepare(fleet: Fleet) -> None:
    fleet.add_device("van-1", ["route-1"])
    fleet.add_device("van-2", ["route-1"])
    fleet.start_agents("van-1", "van-2")
    fleet.agent("van-2").put("tasks", "t-1", {"route": "route-1", "notes": SECRET})
    fleet.agent("van-1").put("tasks", "t-2", {"route": "route-1", "notes": "own " + SECRET})
    fleet.wait_drained("van-1", "van-2")
    fleet.wait_converged("van-1", "van-2")
    assert fleet.wait(lambda: _holds(fleet, "van-1", SECRET) or None)
    assert fleet.wait(lambda: _holds(fleet, "van-2", SECRET) or None)
    fleet.close_agents()


def test_wipe_of_an_online_and_of_a_disabled_offline_device(fleet: Fleet) -> None:
    """Both cases on one fleet (its start and the two devices' first sync are most of the
    time; each case has a device of its own): van-1 enabled and online, van-2 disabled
    and offline."""
    _prepare(fleet)
    _wipe_of_an_online_device(fleet, "van-1")
    _wipe_of_a_disabled_offline_device(fleet, "van-2")


def _wipe_of_an_online_device(fleet: Fleet, dev: str) -> None:
    """Enabled and online: wiped at once, stays empty (no re-download) until enabled."""
    fleet.cli("device", "wipe", dev, "--config", str(fleet.server_config))
    fleet.wait(lambda: _wipe_done(fleet, dev), timeout=60)
    assert str(_device_row(fleet, dev)["state"]).startswith("wiped at")
    assert not _holds(fleet, dev, SECRET)
    # it keeps asking for data (catch-up retries) and is refused: still nothing
    fleet.agents[dev].wait_event("message_rejected", timeout=60)
    assert _fresh_records(fleet, dev) == 0
    status = fleet.agent_status(dev)
    assert status["wiped"] is not None
    assert "device_disabled" in json.dumps(status["last_error"])
    # The new store has the running daemon's policy state too (it had none: `server`
    # null and no deferral shown until the policy next changed).
    assert status["server"] is not None and status["server"]["up"] is True, status
    fleet.cli("device", "enable", dev, "--config", str(fleet.server_config))
    fleet.wait(lambda: _fresh_records(fleet, dev) == 2 or None, timeout=60)


def _wipe_of_a_disabled_offline_device(fleet: Fleet, dev: str) -> None:
    """The reported failure: disable, then wipe, with the device offline. At its next
    connect the wipe is carried out before anything else reaches it."""
    fleet.cli("device", "disable", dev, "--config", str(fleet.server_config))
    assert fleet.stop_agent(dev) == 0
    fleet.cli("device", "wipe", dev, "--config", str(fleet.server_config))
    assert "wipe pending" in str(_device_row(fleet, dev)["state"])
    assert _holds(fleet, dev, SECRET)  # offline: nothing can happen yet
    fleet.start_agent(dev)
    fleet.wait(lambda: _wipe_done(fleet, dev), timeout=60)
    assert not _holds(fleet, dev, SECRET)
    wiped = fleet.agents[dev].wait_event("wiped")
    # nothing was applied from the server in this run before the wipe
    applied_before = [e for e in fleet.agents[dev].events()
                      if e.get("event") in ("catchup_behind", "snapshot_dropped_records")
                      and e["timestamp"] < wiped["timestamp"]]
    assert applied_before == []
    assert _fresh_records(fleet, dev) == 0
