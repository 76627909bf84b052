"""Encryption at rest switched on for a fleet in service, with real processes on both
fleets (issue 10 §4): a device's store encrypted in place keeps its offline writes and
syncs on without a resync; its key is rotated (rekey) and it syncs on; the server's LMDB
store is encrypted in place the same way, and the PostgreSQL fleet refuses with what to
do instead."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECRET = "door-code-55102"


def _key(fleet: Fleet, name: str) -> Path:
    path = fleet.root / name
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def _device_file(fleet: Fleet, dev: str) -> bytes:
    return (Path(fleet.agent_config(dev).data_dir) / "agent.lmdb" / "data.mdb").read_bytes()


def _use_key(fleet: Fleet, dev: str, key: Path) -> None:
    def edit(data: dict[str, Any]) -> None:
        data.setdefault("storage", {})["encryption_key_file"] = str(key)
    fleet.edit_agent_config(dev, edit)


def _arrives(fleet: Fleet, dev: str, key: str) -> bool | None:
    return fleet.agent(dev).get("tasks", key) is not None or None


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_device_encrypted_in_place_then_rekeyed_keeps_syncing(fleet: Fleet) -> None:
    """encrypt with the daemon stopped: the offline write made before it is sent after
    the restart, the other device's writes arrive; the same after a rekey.

    On the embedded fleet only: encryption at rest here is the device's store's (the
    server store's has its own test below, on both fleets); the broker and the server
    store only carry the writes, as in every sync test on both fleets."""
    fleet.add_device("van-1", ["route-1"])
    fleet.add_device("van-2", ["route-1"])
    fleet.start_agents("van-1", "van-2")
    fleet.agent("van-1").put("tasks", "t-1", {"route": "route-1", "notes": SECRET})
    fleet.wait_converged("van-1", "van-2")
    assert fleet.stop_agent("van-1") == 0
    fleet.agent("van-1").put("tasks", "t-2", {"route": "route-1", "notes": "offline " + SECRET})
    fleet.close_agents()
    assert SECRET.encode() in _device_file(fleet, "van-1")
    config = str(fleet.agent_config_path("van-1"))
    key = _key(fleet, "van-1.key")
    out = json.loads(fleet.cli("agent", "encrypt", "--config", config, "--key-file", str(key),
                               "--json").stdout)
    assert out["before"] == "plain" and out["after"] == "envelope" and out["values"] > 0
    assert SECRET.encode() not in _device_file(fleet, "van-1")
    # the agent refuses the encrypted store until the key is configured
    refused = fleet.cli("agent", "status", "--config", config, check=False)
    assert refused.returncode == 2 and "encryption_key_file" in refused.stderr
    _use_key(fleet, "van-1", key)
    assert fleet.pending("van-1") == 1  # the offline write survived the conversion
    fleet.close_agents()
    fleet.start_agent("van-1")
    fleet.agent("van-2").put("tasks", "t-3", {"route": "route-1", "notes": "from van-2"})
    fleet.wait(lambda: _arrives(fleet, "van-2", "t-2"), what="van-1's offline write at van-2")
    fleet.wait(lambda: _arrives(fleet, "van-1", "t-3"), what="van-2's write at van-1")
    fleet.wait_converged("van-1", "van-2")
    assert fleet.agent_status("van-1")["pending"] == 0

    # rotation: the daemon stopped, the data key re-wrapped, the config pointed at the
    # new key; running again, the device syncs on
    assert fleet.stop_agent("van-1") == 0
    fleet.close_agents()
    new = _key(fleet, "van-1.new.key")
    running = fleet.agents["van-2"]
    assert running.running
    out = json.loads(fleet.cli("agent", "rekey", "--config", config, "--new-key-file",
                               str(new), "--json").stdout)
    assert out["command"] == "rekey" and out["values"] == 0
    stale = fleet.cli("agent", "status", "--config", config, check=False)
    assert stale.returncode == 2 and str(key) in stale.stderr  # names the key that failed
    _use_key(fleet, "van-1", new)
    fleet.start_agent("van-1")
    fleet.agent("van-2").put("tasks", "t-4", {"route": "route-1", "notes": "after rekey"})
    fleet.wait(lambda: _arrives(fleet, "van-1", "t-4"), what="t-4 at van-1 after the rekey")
    fleet.wait_converged("van-1", "van-2")


def test_server_store_encrypted_in_place(fleet: Fleet) -> None:
    """LMDB fleet: the server stopped, its store encrypted in place, the key configured,
    and the fleet syncs on (nothing resent, nothing lost). PostgreSQL fleet: the command
    refuses, pointing at volume encryption."""
    fleet.add_device("van-1", ["route-1"])
    fleet.start_agent("van-1")
    fleet.agent("van-1").put("tasks", "t-1", {"route": "route-1", "notes": SECRET})
    fleet.wait_converged("van-1")
    key = _key(fleet, "server.key")
    config = str(fleet.server_config)
    if fleet.store_kind == "postgres":
        refused = fleet.cli("server", "encrypt", "--config", config, "--key-file", str(key),
                            check=False)
        assert refused.returncode == 2 and "volume" in refused.stderr
        return
    assert fleet.stop_server() == 0
    fleet.close_store()
    store_file = fleet.server_data / "store" / "data.mdb"
    assert SECRET.encode() in store_file.read_bytes()
    out = json.loads(fleet.cli("server", "encrypt", "--config", config, "--key-file",
                               str(key), "--json").stdout)
    assert out["after"] == "envelope" and out["values"] > 0
    assert SECRET.encode() not in store_file.read_bytes()
    refused = fleet.cli("server", "status", "--config", config, check=False)
    assert refused.returncode == 2 and "encryption_key_file" in refused.stderr
    with fleet.server_config.open("a") as fh:
        fh.write(f"\n[store]\nencryption_key_file = {json.dumps(str(key))}\n")
    fleet.start_server()
    fleet.agent("van-1").put("tasks", "t-2", {"route": "route-1", "notes": "after"})
    fleet.wait_converged("van-1")
    assert fleet.value("tasks", "t-1", "notes") == SECRET
    assert fleet.value("tasks", "t-2", "notes") == "after"
    status = json.loads(fleet.cli("server", "status", "--config", config, "--json").stdout)
    assert status["store"]["encrypted"] is True and status["records"] == 2
    assert status["server_running"] is True and status["presence_as_of"] is None
    assert [(s["id"], s["state"]) for s in status["servers"]] == [("server-1", "running")]
