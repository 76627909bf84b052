"""Fault pairs: a part hung (SIGSTOP, then SIGCONT) while the parts next to it go on: the
agent's sync process alone while the app writes through the local HTTP API; one merge
server of two, in the middle of a write transaction on their shared PostgreSQL (the
matrix of pairs and faults: tests/e2e/fault_pairs.py)."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from tests.e2e.fault_pairs import (
    FAST_KEEPALIVE,
    KEY,
    SCOPE,
    assert_exactly_once,
    frozen,
    needs_mosquitto,
    process_tree,
    seed,
    write_backlog,
)
from tests.e2e.fleet import Fleet
from tests.e2e.test_fault_pairs_agent import _api
from tests.e2e.test_fault_pairs_postgres import _HOLDING
from tests.pgserver import _children

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PACED = {"batch_max_changes": 1, "max_inflight_changes": 2}
"""One change per batch: the backlog takes seconds to drain, so the freeze lands in it."""

WRITE_TRIES = 3
"""Freezes tried until one catches the sync process outside a write transaction."""


def _call(port: int, token: str, method: str, path: str, body: dict[str, Any] | None = None,
          *, key: str | None = None, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """One request to the agent's local API: (status, JSON answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        conn.request(method, path, body=None if body is None else orjson.dumps(body),
                     headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _increment(port: int, token: str, i: int, *, timeout: float = 30) -> int:
    """The app adds 1 to the stock (Idempotency-Key `inc-i`, so a retry is the same
    write); returns the HTTP status."""
    status, _ = _call(port, token, "POST", f"/v1/collections/inventory/records/{KEY}/increment",
                      {"field": "stock", "amount": 1}, key=f"inc-{i}", timeout=timeout)
    return status


def _api_up(port: int, token: str) -> bool:
    try:
        return _call(port, token, "GET", "/v1/status", timeout=5)[0] == 200
    except ConnectionRefusedError:
        return False


def _server_device(fleet: Fleet, dev: str) -> dict[str, Any]:
    rows = json.loads(fleet.cli("server", "devices", "--json", "--config",
                                str(fleet.server_config)).stdout)
    row: dict[str, Any] = next(r for r in rows if r["id"] == dev)
    return row


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_sync_process_hung_while_the_app_writes(fleet: Fleet) -> None:
    """Only the agent's sync process stopped dead (SIGSTOP) mid-drain, for longer than
    its keepalive and its heartbeat timeout, while the service beside it stays up and
    the app keeps writing through the local HTTP API: every write is saved locally
    (202), the API's status says the device is not online and why (no heartbeat) and
    counts every pending change, the server sees the device offline; continued, the
    sync process reconnects by itself and every increment is applied once."""
    devs = ("van-1", "van-2")
    for dev in devs:
        fleet.add_device(dev, [SCOPE], sync=PACED)

        def quick(d: dict[str, Any]) -> None:
            d["mqtt"].update(keepalive_s=FAST_KEEPALIVE)
            # heartbeat timeout: 2 x 1 + 5 = 7 s
            d["sync"].update(deaf_after_s=2.0, status_interval_s=1.0)
        fleet.edit_agent_config(dev, quick)
    port, token = _api(fleet, "van-1")
    fleet.agent("van-1").put("inventory", KEY, {"depot": SCOPE, "sku": KEY})
    fleet.start_agents(*devs)
    fleet.wait_drained(*devs, timeout=30)
    fleet.wait_converged(*devs, timeout=30)

    backlog, live, keys = 0, 30, 0
    waited: list[int] = []   # writes that waited on a frozen writer (their keys)
    service = fleet.agents["van-1"]
    for attempt in range(1, WRITE_TRIES + 1):
        write_backlog(fleet, ("van-1",), 150)
        backlog += 150
        sync_pid = fleet.wait(lambda: (_children(service.pid) or [None])[0], 30,
                              what="the service's sync process")
        fleet.wait(lambda: _api_up(port, token), 30, what="the local API up again")
        with frozen([sync_pid]):
            left = fleet.pending("van-1")
            assert left > 0, "the drain had finished: the freeze was not mid-stream"
            keys += 1
            try:
                status = _increment(port, token, keys, timeout=3)
            except TimeoutError:
                # Caught inside a write transaction (it holds LMDB's one writer lock):
                # the app's write waits for it. Not the fault under test; the app sends
                # it again (same key) once the sync process runs again.
                print(f"\nattempt {attempt}: the sync process froze holding the writer lock")
                waited.append(keys)
                continue
            assert status == 202
            for _ in range(live - 1):
                keys += 1
                assert _increment(port, token, keys) == 202
            code, st = _call(port, token, "GET", "/v1/status")
            assert code == 200 and st["pending"] == left + live, st
            st = fleet.wait(lambda: (s if (s := _call(port, token, "GET", "/v1/status")[1])
                                     ["link"] and s["link"]["code"] == "not_responding"
                                     else None), 30,
                            what="the API's status says the sync process does not respond")
            print(f"\nsync process frozen with {left} pending: {st['summary']}")
            assert not st["online"] and st["pending"] == left + live, st
            fleet.wait(lambda: _server_device(fleet, "van-1")["online"] is False or None,
                       30, what="the server sees the device offline")
            assert fleet.agent_status("van-2")["online"]
            break
    else:
        pytest.fail(f"the sync process froze inside a write transaction {WRITE_TRIES} times")
    for key in waited:   # the app's retries: saved once, whichever request did it
        assert _increment(port, token, key) == 202
    assert_exactly_once(fleet, devs, backlog + live + len(waited))
    fleet.wait(lambda: _server_device(fleet, "van-1")["online"] or None, 30,
               what="the server sees it online again")
    code, st = _call(port, token, "GET", "/v1/status")
    assert code == 200 and st["online"] and st["link"] is None, st


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_sync_process_hung_for_good_is_replaced(fleet: Fleet) -> None:
    """The agent's sync process stopped dead mid-drain and never continued (stuck for
    good, as on a dead disk): the service, alive beside it, kills it once it has been
    silent for `sync.hung_after_s` and starts another, which drains every increment
    once. (Without that, nothing restarted it: the service kept feeding systemd's
    watchdog, and the device never synced again until a person restarted it.)"""
    devs = ("van-1", "van-2")
    for dev in devs:
        fleet.add_device(dev, [SCOPE], sync=PACED)
    fleet.edit_agent_config("van-1", lambda d: d["sync"].update(hung_after_s=5.0))
    fleet.agent("van-1").put("inventory", KEY, {"depot": SCOPE, "sku": KEY})
    fleet.start_agents(*devs)
    fleet.wait_drained(*devs, timeout=30)
    write_backlog(fleet, ("van-1",), 150)
    service = fleet.agents["van-1"]
    hung = fleet.wait(lambda: (_children(service.pid) or [None])[0], 30,
                      what="the service's sync process")
    with frozen([hung]):
        left = fleet.pending("van-1")
        assert left > 0, "the drain had finished: the freeze was not mid-stream"
        event = service.wait_event("sync_process_hung", timeout=30)
        assert event["pid"] == hung and event["silent_s"] >= 5.0, event
        service.wait_event("sync_process_started", where=lambda e: e["pid"] != hung)
        print(f"\nsync process hung with {left} pending: replaced after "
              f"{event['silent_s']} s")
    assert_exactly_once(fleet, devs, 150)
    assert not Path(f"/proc/{hung}").exists()


# ------------------------------------------- one merge server of several hung


SHARE = {"batch_max_changes": 20, "max_inflight_changes": 40, "ack_timeout_s": 3.0}


def _freeze_holding(fleet: Fleet, admin: psycopg.Connection[Any], sid: str,
                    drained: Callable[[], bool]) -> contextlib.ExitStack | None:
    """Freeze `sid` (SIGSTOP) at a moment its write transaction holds scope locks and
    waits for its next statement; the freeze, entered, or None when the drain ended
    before such a moment was caught."""
    pid = fleet.servers[sid].pid
    mine = ("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) "
            "AND state = 'idle in transaction'")
    while not drained():
        if not admin.execute(_HOLDING).fetchall():
            continue
        stack = contextlib.ExitStack()
        stack.enter_context(frozen(process_tree(pid)))
        # Only a frozen client's transaction stays idle that long: it is `sid`'s.
        time.sleep(0.5)
        holders = [int(r[0]) for r in admin.execute(_HOLDING).fetchall()]
        if holders and admin.execute(mine, (holders,)).fetchone()[0]:
            return stack
        stack.close()
    return None


@needs_mosquitto
@pytest.mark.mosquitto
@pytest.mark.postgres
def test_one_server_of_two_hung_holding_a_scope(tmp_path: Path, pg_database: str) -> None:
    """Two merge servers share the devices' messages on one database; one is stopped dead
    (SIGSTOP) in the middle of a write transaction, holding its scopes' locks. The
    other goes on serving them: the drain finishes while the hung one is still stopped
    (the database would keep the hung transaction's locks for its idle timeout, 60 s:
    the server waiting behind them ends it, broker.server.store.postgres.orphans), the
    devices never say the server is unavailable; continued, the hung server finds its
    transaction gone, goes on, and every increment is applied once."""
    env = {"WAYSTATION_SERVER__MQTT__KEEPALIVE_S": str(FAST_KEEPALIVE)}
    with Fleet(tmp_path, "mosquitto", "postgres", pg_database) as fleet, \
            psycopg.connect(pg_database, autocommit=True) as admin:
        fleet.start(server=False)
        fleet.start_server(env=env)
        fleet.add_server("server-2")
        fleet.start_server("server-2", env=env)
        devs = ("van-1", "van-2")
        seed(fleet, devs, sync=SHARE)
        writes = 0

        def drained() -> bool:
            return sum(fleet.pending(dev) for dev in devs) == 0
        for _ in range(4):  # another drain when one ended before a moment was caught
            write_backlog(fleet, devs, 150)
            writes += 300
            freeze = _freeze_holding(fleet, admin, "server-2", drained)
            if freeze is not None:
                break
        else:
            pytest.fail("four drains ended without server-2 caught holding scope locks")
        with freeze:
            left = sum(fleet.pending(dev) for dev in devs)
            print(f"\nserver-2 hung holding scope locks, {left} changes pending")
            assert left > 0, "the drain had finished: the freeze was not mid-stream"
            hung = time.monotonic()
            # HUNG_IDLE_S (10 s) and a lock wait round (2 s), then the devices' resends
            # (ack timeout 3 s) of what the hung server had taken; 60 s without the fix.
            fleet.wait_drained(*devs, timeout=40)
            print(f"drained by server-1 {time.monotonic() - hung:.1f} s into the hang")
            fleet.servers["server-1"].wait_event("store_hung_backend_ended", timeout=5)
            for dev in devs:
                st = fleet.agent_status(dev)
                assert not st["deferred"] and st["online"], st["summary"]
        assert_exactly_once(fleet, devs, writes)
        assert fleet.servers["server-2"].running, fleet.servers["server-2"].log_tail()
