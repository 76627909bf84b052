"""Language neutrality: the JavaScript example client (Node.js built-ins only) writes
offline, sees the feed say pending, and sees it say synced once the server is up."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import Fleet
from tests.helpers import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None and not __import__("os").environ.get("CI"),
                    reason="node is not installed (scripts/test.sh installs nodejs)")
@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_js_client_sees_pending_then_synced(fleet: Fleet) -> None:
    """Offline write -> "pending" on the feed; server started -> "server" up, "synced".

    On the embedded fleet only: what is under test is the agent's local API as another
    language uses it (feed states, write answers); the broker and the server store only
    carry the write, as in every sync test on both fleets (test_js_txn, where the server
    refuses a transaction, stays on both)."""
    assert NODE is not None, "node is required in CI (scripts/test.sh installs it)"
    port = free_port()
    path = fleet.add_device("van-1", ["route-42"])
    fleet.edit_agent_config("van-1", lambda d: d.update(api={"tcp_port": port}))
    token = fleet.cli("agent", "token", "add", "kiosk", "--write", "tasks", "--config",
                      str(path)).stdout.splitlines()[0]
    fleet.stop_server()
    fleet.start_agent("van-1")
    proc = subprocess.Popen([NODE, str(ROOT / "examples/js/sync-status.mjs"), "--port",
                             str(port), "--token", token, "--key", "t-js"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(s["step"] == "pending" for s in lines), timeout=60,
                   message=lambda: f"pending on the feed; got {lines}")
        assert not any(s["step"] == "synced" for s in lines), "synced before a server ran"
        written = next(s for s in lines if s["step"] == "written")
        assert written["state"] == "pending" and "pending sync" in written["message"]
        fleet.start_server()
        assert proc.wait(timeout=120) == 0, proc.stderr.read() if proc.stderr else ""
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    synced = next(s for s in lines if s["step"] == "synced")
    assert synced["sync"] == {"route": "synced", "status": "synced"}
    # The started server's announcement reached the app as a `server` event (recorded
    # before the daemon sent anything to it), not as a connectivity one.
    ups = [i for i, s in enumerate(lines) if s["step"] == "server" and s["up"] is True]
    assert ups and ups[0] < lines.index(synced), lines
    assert not any(s["step"] == "link" and s["kind"] not in ("online", "offline", "retrying")
                   for s in lines), lines
    assert fleet.value("tasks", "t-js", "status") == "delivered"
