"""Fault pairs: an app's connection to the agent cut mid-transaction, the agent's sync
process killed between publish and ack (the matrix of pairs and faults:
tests/e2e/fault_pairs.py)."""

from __future__ import annotations

import os
import signal
import socket
import struct

import orjson
import pytest

from tests.e2e.fault_pairs import (
    KEY,
    SCOPE,
    THROTTLED,
    assert_exactly_once,
)
from tests.e2e.fleet import Fleet
from tests.helpers import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


# ------------------------------------------------------------------- app - agent


def _api(fleet: Fleet, dev: str) -> tuple[int, str]:
    """Give `dev` a loopback API port and an app token: (port, token)."""
    port = free_port()
    fleet.edit_agent_config(dev, lambda d: d.update(api={"tcp_port": port}))
    out = fleet.cli("agent", "token", "add", "kiosk", "--write", "*", "--config",
                    str(fleet.agent_config_path(dev)))
    return port, out.stdout.splitlines()[0]


def _txn_request(token: str, key: str) -> bytes:
    """POST /v1/txn moving one unit of stock from bin-a to bin-b, with `key`."""
    body = orjson.dumps({"ops": [
        {"op": "increment", "collection": "inventory", "key": "bin-a", "field": "stock",
         "amount": -1},
        {"op": "increment", "collection": "inventory", "key": "bin-b", "field": "stock",
         "amount": 1}]})
    head = (f"POST /v1/txn HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nIdempotency-Key: {key}\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def _cut(port: int, data: bytes) -> None:
    """Send `data` and reset the connection at once, reading nothing (an app killed or
    its link cut mid-request)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(data)
    sock.close()


def _send(port: int, data: bytes) -> tuple[int, bytes]:
    """Send `data` and read the whole answer: (status, raw answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_app_connection_cut_mid_transaction(fleet: Fleet) -> None:
    """The app's connection to the local API is reset mid-request (half a body) or right
    after the request (the answer never read), while the sync process drains: the app
    sends again with its Idempotency-Key; each transaction moves the stock once, on the
    device and on the server, and the API keeps serving."""
    for dev in ("van-1", "van-2"):
        fleet.add_device(dev, [SCOPE])
    port, token = _api(fleet, "van-1")
    ag = fleet.agent("van-1")
    moves = 40
    for k in ("bin-a", "bin-b"):
        ag.put("inventory", k, {"depot": SCOPE, "sku": k})
    ag.increment("inventory", "bin-a", "stock", moves)   # stock may not go below zero
    fleet.start_agents("van-1", "van-2")
    for i in range(moves):
        request = _txn_request(token, f"move-{i}")
        _cut(port, request[:len(request) - 7] if i % 2 else request)
        status, answer = _send(port, request)   # the app's retry, same key
        assert status in (200, 202), answer
    status, answer = _send(port, _txn_request(token, "move-0"))
    assert status == 202 and b"Idempotent-Replayed: true" in answer, answer
    assert ag.get("inventory", "bin-b").fields["stock"] == moves  # type: ignore[union-attr]
    fleet.wait_drained("van-1")
    assert fleet.value("inventory", "bin-a", "stock") == 0
    assert fleet.value("inventory", "bin-b", "stock") == moves
    assert fleet.scope_seq(SCOPE) == 3 + 2 * moves
    assert ag.dead_letters() == []
    fleet.wait_converged("van-1", "van-2", timeout=30)


# ------------------------------------------------------- agent: sync process alone


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_sync_process_killed_between_publish_and_ack(fleet: Fleet) -> None:
    """Only the agent's sync process is SIGKILLed mid-drain (changes published, their
    acks not yet applied) while the app keeps writing: the service restarts it and every
    increment is applied once."""
    devs = ("van-1",)
    fleet.add_device("van-1", [SCOPE], sync=THROTTLED)
    ag = fleet.agent("van-1")
    ag.put("inventory", KEY, {"depot": SCOPE, "sku": KEY})
    backlog, live = 150, 30
    for _ in range(backlog):
        ag.increment("inventory", KEY, "stock", 1)
    proc = fleet.start_agent("van-1", wait=False)
    first = proc.wait_event("sync_process_started")["pid"]
    fleet.wait(lambda: fleet.scope_seq(SCOPE) > 1 + backlog // 10 or None, 30,
               what="the drain under way", interval=0.005)
    os.kill(first, signal.SIGKILL)
    left = fleet.pending("van-1")
    print(f"\nkilled the sync process with {left} changes pending")
    assert left > 0, "the drain had finished: the kill was not mid-stream"
    for _ in range(live):
        ag.increment("inventory", KEY, "stock", 1)
    proc.wait_event("sync_process_started", where=lambda e: e["pid"] != first)
    assert_exactly_once(fleet, devs, backlog + live)


