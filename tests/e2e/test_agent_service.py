"""`waystation agent run` as a service: the local API outlives the sync process, one
service per store, CLI writes beside it (real processes, real broker, kill -9)."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.service.lock import service_pid
from tests.e2e.fleet import Fleet, waystation_argv
from tests.helpers import free_port, wait_until

S = "route-42"


def _service(fleet: Fleet, dev: str = "van-1") -> tuple[int, str, Path]:
    """Enrol `dev` with the API on a loopback port, issue a token; (port, token, config)."""
    port = free_port()
    path = fleet.add_device(dev, [S])
    fleet.edit_agent_config(dev, lambda d: d.update(api={"tcp_port": port}))
    out = fleet.cli("agent", "token", "add", "kiosk", "--write", "*", "--config", str(path))
    return port, out.stdout.splitlines()[0], path


def _call(port: int, token: str, method: str, target: str, body: Any = None
          ) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, target, body=None if body is None else orjson.dumps(body),
                     headers={"Authorization": f"Bearer {token}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    finally:
        conn.close()


def test_api_keeps_taking_writes_while_the_sync_process_is_killed(fleet: Fleet) -> None:
    """kill -9 of the sync process: the API answers every write (pending), the service
    restarts the sync process, and every write reaches the server."""
    port, token, _ = _service(fleet)
    proc = fleet.start_agent("van-1")
    first = proc.wait_event("sync_process_started")["pid"]
    assert _call(port, token, "PATCH", "/v1/collections/tasks/records/t-0",
                 {"fields": {"route": S, "status": "a"}})[0] == 202
    fleet.wait_drained("van-1")
    os.kill(first, signal.SIGKILL)
    for i in range(1, 21):
        status, body = _call(port, token, "PATCH", f"/v1/collections/tasks/records/t-{i}",
                             {"fields": {"route": S, "status": "b"}})
        assert status == 202 and body["state"] == "pending", body
    status, st = _call(port, token, "GET", "/v1/status")
    assert status == 200 and st["device_id"] == "van-1"  # the API answers meanwhile
    proc.wait_event("sync_process_started", where=lambda e: e["pid"] != first)
    fleet.wait_drained("van-1")
    fleet.wait_converged("van-1")
    assert fleet.value("tasks", "t-20", "status") == "b"
    assert _call(port, token, "GET", "/v1/status")[1]["sync_running"] is True


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_one_service_per_store_and_cli_writes_beside_it(fleet: Fleet) -> None:
    """A second `agent run` on the same store refuses naming the first one's PID;
    `service_pid` sees the running service; a CLI write beside it syncs.

    On the embedded fleet only: the service lock and the CLI beside the service are the
    device's own (its store and PID file); the broker and the server store only carry the
    write, as in every other sync test on both fleets. (The kill -9 test above stays on
    both: the restarted sync process's reconnect is where the brokers differ.)"""
    _, _, path = _service(fleet)
    proc = fleet.start_agent("van-1")
    data_dir = Path(fleet.agent_config("van-1").data_dir)
    assert service_pid(data_dir) == proc.pid
    second = subprocess.run(waystation_argv("agent", "run", "--config", str(path)),
                            cwd=fleet.root, capture_output=True, text=True, timeout=60,
                            check=False)
    assert second.returncode == 3, second.stderr
    assert f"PID {proc.pid}" in second.stderr and "already running" in second.stderr
    fleet.cli("agent", "put", "tasks", "t-cli", f"route={S}", "status=cli", "--config",
              str(path))
    fleet.wait_drained("van-1")
    fleet.wait_converged("van-1")
    assert fleet.value("tasks", "t-cli", "status") == "cli"
    fleet.stop_agent("van-1")
    wait_until(lambda: service_pid(data_dir) is None, timeout=30)
