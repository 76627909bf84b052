"""Fault pairs: a part hung (SIGSTOP) while the parts next to it go on: the agent's sync
process alone, for good (the service replaces it); one merge server of two, in the
middle of a write transaction on their shared PostgreSQL (the matrix of pairs and
faults: tests/e2e/fault_pairs.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from tests.e2e.test_fault_pairs_postgres import _HOLDING
from tests.pgserver import _children

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

def _sync_process(service: int) -> int | None:
    """The agent service's sync process: not just any child of it (the store check a
    starting agent runs in a child of its own exits within a second: a freeze aimed at it
    found no process)."""
    for pid in _children(service):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent.service.child" in argv:
            return pid
    return None


PACED = {"batch_max_changes": 1, "max_inflight_changes": 2}
"""One change per batch: the backlog takes seconds to drain, so the freeze lands in it."""

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
    hung = fleet.wait(lambda: _sync_process(service.pid), 30,
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
