"""A merge server killed with SIGKILL reads as gone at once on its own host.

Its liveness row says "running" until it is 30 s old (`broker.server.liveness`): the
operator who has just seen the server die, and asks, must not be told it runs. On the
server's host the CLI checks the process the row names (`process_identity`)."""

from __future__ import annotations

import json
from typing import Any

from tests.e2e.fleet import Fleet


def _cfg(fleet: Fleet) -> tuple[str, str]:
    return "--config", str(fleet.server_config)


def _status(fleet: Fleet) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(fleet.cli("server", "status", "--json", *_cfg(fleet)).stdout)
    return doc


def test_a_killed_server_is_gone_at_once_and_can_be_forgotten(fleet: Fleet) -> None:
    fleet.add_device("van-1", ["depot-7"])
    fleet.wait(lambda: _status(fleet)["server_running"], 30,
               what="the server recorded itself running")
    (srv,) = _status(fleet)["servers"]
    assert srv["state"] == "running" and srv["process_ended"] is False
    # a running server cannot be forgotten (its process is alive, not only its row)
    refused = fleet.cli("server", "forget", srv["id"], *_cfg(fleet), check=False)
    assert refused.returncode == 1 and "is running" in refused.stderr

    fleet.kill_server(srv["id"])
    doc = _status(fleet)
    (gone,) = doc["servers"]
    assert gone["state"] == "gone" and gone["process_ended"] is True, gone
    assert gone["seen_s_ago"] < 30, "gone before its row went stale: the process told"
    assert not doc["server_running"]
    text = fleet.cli("server", "status", *_cfg(fleet)).stdout
    assert f"merge server {srv['id']} (group " in text
    assert "has ended without stopping cleanly: crashed or killed" in text
    assert "NO MERGE SERVER IS RUNNING" in text and "systemctl start waystation-server" in text
    devices = fleet.cli("server", "devices", *_cfg(fleet)).stdout
    assert "NO MERGE SERVER IS RUNNING" in devices and "van-1" in devices
    forgot = json.loads(fleet.cli("server", "forget", srv["id"], "--json", *_cfg(fleet)).stdout)
    assert forgot["forgotten"]["state"] == "gone"
    assert _status(fleet)["servers"] == []
