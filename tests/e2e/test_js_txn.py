"""Transactions from another language: the JavaScript example (Node.js built-ins only)
moves stock between two bins as one transaction through the local API, on both fleets;
one move is synced whole, one the server refuses is rolled back whole."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import Fleet
from tests.helpers import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")


def _move(port: int, token: str, *args: str) -> tuple[int, list[dict[str, Any]]]:
    assert NODE is not None
    proc = subprocess.run([NODE, str(ROOT / "examples/js/stock-move.mjs"), "--port",
                           str(port), "--token", token, *args],
                          capture_output=True, text=True, timeout=120, check=False)
    steps = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert proc.returncode in (0, 2), (proc.returncode, proc.stderr, steps)
    return proc.returncode, steps


@pytest.mark.skipif(NODE is None and not os.environ.get("CI"),
                    reason="node is not installed (scripts/test.sh installs nodejs)")
def test_js_stock_move_is_one_transaction(fleet: Fleet) -> None:
    assert NODE is not None, "node is required in CI (scripts/test.sh installs it)"
    port = free_port()
    path = fleet.add_device("van-1", ["depot-7", "route-42"])
    fleet.edit_agent_config("van-1", lambda d: d.update(api={"tcp_port": port}))
    token = fleet.cli("agent", "token", "add", "picker", "--write", "inventory",
                      "--write", "tasks", "--config", str(path)).stdout.splitlines()[0]
    ag = fleet.agent("van-1")
    for key in ("bin-a", "bin-b"):
        ag.put("inventory", key, {"depot": "depot-7", "sku": "A"})
    ag.increment("inventory", "bin-a", "stock", 5)
    fleet.start_agent("van-1")
    fleet.wait_drained("van-1", timeout=60)

    code, steps = _move(port, token, "--from", "bin-a", "--to", "bin-b", "--qty", "2",
                        "--order", "o-js")
    assert code == 0, steps
    written = steps[0]
    assert len(written["change_ids"]) == 4 and "one transaction" in written["message"]
    assert steps[-1] == {"step": "synced", "stock": {"bin-a": 3, "bin-b": 2}}
    assert fleet.value("inventory", "bin-a", "stock") == 3
    assert fleet.value("tasks", "o-js", "status") == "ordered"

    code, steps = _move(port, token, "--from", "bin-a", "--to", "bin-b", "--qty", "9")
    assert code == 2, steps
    ids = steps[0]["change_ids"]
    final = steps[-1]
    assert final["step"] == "rejected"
    assert final["codes"] == {ids[0]: "rule_rejected", ids[1]: "txn_aborted"}
    assert final["stock"] == {"bin-a": 3, "bin-b": 2}  # both rolled back: never twice
    rolled = [s for s in steps if s["step"] == "rolled_back"]
    assert {s["transaction"] for s in rolled} == {ids[0]}
    assert fleet.value("inventory", "bin-a", "stock") == 3
    assert fleet.value("inventory", "bin-b", "stock") == 2
