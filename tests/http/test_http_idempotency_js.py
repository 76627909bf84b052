"""The JavaScript example client (examples/js/waystation.mjs) sends writes with an
Idempotency-Key and, when the answer is lost, sends them again with the same key: the
stock moves once. Against the real agent API over loopback TCP, through a relay that
drops the first answer."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.api import Agent
from schemas.collection import Catalog
from tests.http.httpkit import issue, running_api
from tests.ports import free_port
from tests.tcp_relay import close_both, pump, relay_pairs
from waystation.config import AgentConfig

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None and not os.environ.get("CI"),
                                reason="node is not installed (scripts/test.sh installs it)")

MOVE = """
import { Waystation } from %(lib)s;
const ws = new Waystation({ port: %(port)d, token: %(token)s, timeoutMs: 5000 });
const ops = [
  { op: "increment", collection: "inventory", key: "bin-a", field: "stock", amount: -2 },
  { op: "increment", collection: "inventory", key: "bin-b", field: "stock", amount: 2 },
];
const first = await ws.transaction(ops, 0, { key: "move-1" });
const again = await ws.transaction(ops, 0, { key: "move-1" });
console.log(JSON.stringify({ first, again }));
"""


def _drop_first_answer(listener: socket.socket, target: tuple[str, int],
                       dropped: threading.Event) -> None:
    """Relay to `target`; the first connection's answer is read and thrown away, and the
    connection closed: the request was made, its answer lost."""
    for client, upstream in relay_pairs(listener, target):
        if dropped.is_set():
            threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
            continue
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        with contextlib.suppress(OSError):
            upstream.recv(65536)  # the agent answered: the write was made
        dropped.set()
        close_both(client, upstream)


@pytest.fixture
def relay(cfg: AgentConfig) -> Iterator[tuple[int, int, threading.Event]]:
    api_port = free_port()
    listener = socket.create_server(("127.0.0.1", 0))
    dropped = threading.Event()
    thread = threading.Thread(target=_drop_first_answer,
                              args=(listener, ("127.0.0.1", api_port), dropped), daemon=True)
    thread.start()
    try:
        yield api_port, listener.getsockname()[1], dropped
    finally:
        listener.close()
        thread.join(5)


def _run(port: int, token: str) -> dict[str, Any]:
    assert NODE is not None, "node is required in CI (scripts/test.sh installs it)"
    script = MOVE % {"lib": json.dumps(str(ROOT / "examples/js/waystation.mjs")),
                     "port": port, "token": json.dumps(token)}
    proc = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc


def test_js_client_resends_a_lost_answer_with_its_key(
        cfg: AgentConfig, catalog: Catalog, relay: tuple[int, int, threading.Event]) -> None:
    """The first answer is lost: the client sends the move again with its key and gets
    the first answer replayed; sent a third time, replayed again; the stock moved once."""
    api_port, relay_port, dropped = relay
    agent = Agent.open(cfg, catalog)
    try:
        for key in ("bin-a", "bin-b"):
            agent.put("inventory", key, {"depot": "depot-7", "sku": "A"})
        token = issue(Path(cfg.data_dir))
        with running_api(cfg, catalog, tcp_port=api_port, agent=agent):
            doc = _run(relay_port, token)
        assert dropped.is_set()
        first, again = doc["first"], doc["again"]
        assert first["replayed"] is True  # its own answer was lost: this is the resend's
        assert again == first and len(first["change_ids"]) == 2
        moves = [e for e in agent.pending() if e["ch"].get("i")]
        assert len(moves) == 2  # one transaction of two changes, not two transactions
        a = agent.get("inventory", "bin-a")
        assert a is not None and a.fields["stock"] == -2
    finally:
        agent.close()
