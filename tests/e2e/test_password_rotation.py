"""Broker password rotation (issue 10 §4) with real processes on both fleets (embedded
amqtt + LMDB, Mosquitto + PostgreSQL): `waystation device rotate-password` reaches a
running device, which stores the new password and logs in with it, without a lost
session or a moment without a working password; the old one is retired only then (or at
the operator's deadline); a device offline at the time, or whose agent fails to save the
password, keeps the old one working and finishes the rotation later."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.creds import FILE_NAME
from tests.e2e.fleet import Fleet
from tests.helpers import RecordingClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _rotation(fleet: Fleet, dev: str) -> dict[str, Any] | None:
    rows = json.loads(fleet.cli("device", "list", "--json", "--config",
                                str(fleet.server_config)).stdout)
    doc: dict[str, Any] | None = next(r for r in rows if r["id"] == dev)["password_rotation"]
    return doc


def _rotate(fleet: Fleet, dev: str, *extra: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(fleet.cli(
        "device", "rotate-password", dev, "--json", *extra,
        "--config", str(fleet.server_config)).stdout)
    return doc


def _creds_file(fleet: Fleet, dev: str) -> Path:
    return Path(fleet.agent_config(dev).data_dir) / FILE_NAME


def _login(fleet: Fleet, dev: str, password: str) -> str:
    """A plain client's CONNACK for `dev` (run while its agent is stopped: same client id)."""
    client = RecordingClient(fleet.port, dev, dev, password)
    try:
        return client.connect(timeout=10)
    finally:
        client.close()


def _retired(fleet: Fleet, dev: str) -> dict[str, Any] | None:
    rot = _rotation(fleet, dev)
    return rot if rot is not None and rot["stage"] == "retired" else None


def test_a_running_device_gets_its_new_password_without_lockout(fleet: Fleet) -> None:
    """Online device: stored (0600), logged in with the new one, old retired by that
    login; sync goes on throughout; a restarted agent uses the stored password although
    its config still holds the old one; the broker then refuses the old one."""
    fleet.add_device("van-1", ["route-1"])
    fleet.add_device("van-2", ["route-1"])
    fleet.start_agents("van-1", "van-2")
    old = fleet.passwords["van-1"]
    fleet.agent("van-1").put("tasks", "t-1", {"route": "route-1", "notes": "before"})
    fleet.wait_drained("van-1")

    doc = _rotate(fleet, "van-1")
    assert doc["device_speaks_creds"] is True and doc["rotation"].startswith("r-")
    new = doc["password"]
    assert new != old
    # Writes on both sides during the rotation still travel.
    fleet.agent("van-1").put("tasks", "t-2", {"route": "route-1", "notes": "during"})
    fleet.agent("van-2").put("tasks", "t-3", {"route": "route-1", "notes": "from van-2"})
    rot = fleet.wait(lambda: _retired(fleet, "van-1"), timeout=90, what="rotation retired")
    assert rot["id"] == doc["rotation"] and rot["retired_by"] == "login"
    assert rot["stored"] and rot["login_with_new"] and rot["switched"]
    path = _creds_file(fleet, "van-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored["current"] == {"id": doc["rotation"], "t": stored["current"]["t"], "pw": new}
    assert stored["pending"] == []
    fleet.wait_converged("van-1", "van-2")
    assert fleet.value("tasks", "t-2", "notes") == "during"
    assert {r.key for r in fleet.agent("van-1").list("tasks")} >= {"t-1", "t-2", "t-3"}
    status = json.loads(fleet.cli("server", "status", "--json", "--config",
                                  str(fleet.server_config)).stdout)
    assert status["password_rotations"] == {}
    events = [e["event"] for e in fleet.agents["van-1"].events()]
    assert "broker_password_received" in events and "broker_password_rotated" in events

    # The agent config still says the old password: the stored one is used.
    assert fleet.stop_agent("van-1") == 0
    assert fleet.agent_config("van-1").mqtt.password.get_secret_value() == old  # type: ignore[union-attr]
    fleet.start_agent("van-1")
    fleet.agent("van-2").put("tasks", "t-4", {"route": "route-1", "notes": "after restart"})
    fleet.wait_converged("van-1", "van-2")
    assert fleet.stop_agent("van-1") == 0
    assert _login(fleet, "van-1", new) == "Success"
    assert _login(fleet, "van-1", old) != "Success"


def test_an_offline_device_and_a_failed_save_keep_the_old_password(fleet: Fleet) -> None:
    """Rotated while offline: status says "sent", the old password still logs it in.
    The agent cannot save the new password (its file's place is taken): the command is
    not reported done and the old password keeps working; once saving works again (a
    restart, as after a crash) the rotation completes."""
    fleet.add_device("van-1", ["route-1"])
    doc = _rotate(fleet, "van-1")
    assert doc["device_speaks_creds"] is False  # never connected: capabilities unknown
    rows = json.loads(fleet.cli("device", "list", "--json", "--config",
                                str(fleet.server_config)).stdout)
    assert rows[0]["password_rotation"]["stage"] == "sent"
    assert "password rotation: sent" in rows[0]["state"]
    status = json.loads(fleet.cli("server", "status", "--json", "--config",
                                  str(fleet.server_config)).stdout)
    assert status["password_rotations"]["van-1"]["stage"] == "sent"

    blocker = _creds_file(fleet, "van-1")
    blocker.mkdir(parents=True)  # writing the file fails: as a crash before the save
    fleet.start_agent("van-1")  # logs in with the old password
    fleet.agents["van-1"].wait_event("broker_password_not_saved", timeout=60)
    fleet.agent("van-1").put("tasks", "t-1", {"route": "route-1", "notes": "old pw"})
    fleet.wait_drained("van-1")
    assert _rotation(fleet, "van-1")["stage"] == "sent"  # type: ignore[index]

    assert fleet.stop_agent("van-1") == 0
    os.rmdir(blocker)
    fleet.start_agent("van-1")
    rot = fleet.wait(lambda: _retired(fleet, "van-1"), timeout=90, what="rotation retired")
    assert rot["retired_by"] == "login"
    fleet.agent("van-1").put("tasks", "t-2", {"route": "route-1", "notes": "new pw"})
    fleet.wait_drained("van-1")


def test_the_deadline_retires_the_old_password_and_the_operator_configures_by_hand(
        fleet: Fleet) -> None:
    """--retire-after: a device that never picked up its new password loses the old one
    at the deadline; the operator writes the printed password into its config (the way
    for an agent without the capability) and it syncs again."""
    fleet.add_device("van-1", ["route-1"])
    fleet.start_agent("van-1")
    fleet.wait_drained("van-1")
    assert fleet.stop_agent("van-1") == 0
    old = fleet.passwords["van-1"]
    doc = _rotate(fleet, "van-1", "--retire-after", "2s")
    assert doc["retire_at"]
    rot = fleet.wait(lambda: _retired(fleet, "van-1"), timeout=60, what="deadline")
    assert rot["retired_by"] == "deadline" and not rot["stored"]
    assert _login(fleet, "van-1", old) != "Success"

    def set_password(data: dict[str, Any]) -> None:
        data["mqtt"]["password"] = doc["password"]

    fleet.edit_agent_config("van-1", set_password)
    shutil.rmtree(_creds_file(fleet, "van-1"), ignore_errors=True)
    fleet.start_agent("van-1")
    fleet.agent("van-1").put("tasks", "t-1", {"route": "route-1", "notes": "by hand"})
    fleet.wait_drained("van-1")


def test_bad_rotation_requests_are_refused_with_a_reason(fleet: Fleet) -> None:
    """Unknown device, malformed or out-of-range deadline."""
    fleet.add_device("van-1", ["route-1"])
    cfg = str(fleet.server_config)
    res = fleet.cli("device", "rotate-password", "nobody", "--config", cfg, check=False)
    assert res.returncode != 0 and "not registered" in res.stderr
    res = fleet.cli("device", "rotate-password", "van-1", "--retire-after", "soon",
                    "--config", cfg, check=False)
    assert res.returncode == 2 and "not a duration" in res.stderr
    res = fleet.cli("device", "rotate-password", "van-1", "--retire-after", "400d",
                    "--config", cfg, check=False)
    assert res.returncode != 0 and "between 0 s and" in res.stderr
    assert _rotation(fleet, "van-1") is None


def test_a_v1_device_is_never_sent_the_password_and_is_configured_by_hand(
        fleet: Fleet) -> None:
    """A device speaking protocol v1 only (no capabilities) syncs on with its old
    password and gets no `creds` command; after the deadline the operator's new password
    (printed by the CLI) logs it in and it syncs again."""
    from tests.e2e.protocol_device import ProtocolDevice

    fleet.add_device("pd-1", ["route-1"])
    old = fleet.passwords["pd-1"]
    doc = _rotate(fleet, "pd-1", "--retire-after", "8s")
    assert doc["device_speaks_creds"] is False and doc["password"]
    pd = ProtocolDevice("pd-1", old, port=fleet.port, scopes=["route-1"])
    try:
        assert pd.connect() == "Success"
        pd.hello()
        ch = pd.change("tasks", "t-1", "route-1", f={"route": "route-1", "notes": "v1"})
        pd.send_changes([ch])
        pd.wait_acked([ch["n"]])
        assert [m for m in pd.messages if m.get("type") == "command"] == []
    finally:
        pd.close()
    rot = fleet.wait(lambda: _retired(fleet, "pd-1"), timeout=60, what="deadline")
    assert rot["retired_by"] == "deadline"
    assert _login(fleet, "pd-1", old) != "Success"
    pd = ProtocolDevice("pd-1", doc["password"], port=fleet.port, scopes=["route-1"])
    pd.next_n = 2
    try:
        assert pd.connect() == "Success"
        pd.hello()
        ch = pd.change("tasks", "t-2", "route-1", f={"route": "route-1", "notes": "by hand"})
        pd.send_changes([ch])
        pd.wait_acked([ch["n"]])
        assert [m for m in pd.messages if m.get("type") == "command"] == []
    finally:
        pd.close()
