"""Fault pairs: the merge server and PostgreSQL (frozen, restarted, a silent link; the
matrix of pairs and faults: tests/e2e/fault_pairs.py)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.e2e.fault_pairs import (
    assert_exactly_once,
    frozen,
    needs_mosquitto,
    process_tree,
    seed,
    write_backlog,
)
from tests.e2e.fleet import Fleet
from tests.helpers import wait_until
from tests.pgserver import PgServer
from tests.silent_link import SilentLink
from tests.silent_link import unavailable_reason as silent_link_unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


# ------------------------------------------------------------ server - PostgreSQL



@pytest.fixture
def pg_fleet(tmp_path: Path, own_pg_server: PgServer) -> Iterator[tuple[Fleet, PgServer]]:
    url = own_pg_server.create_database("pairs")
    with Fleet(tmp_path, "mosquitto", "postgres", url) as fleet:
        fleet.start()
        yield fleet, own_pg_server


@needs_mosquitto
@pytest.mark.mosquitto
@pytest.mark.postgres
def test_postgres_frozen_mid_batch_then_resumed(pg_fleet: tuple[Fleet, PgServer]) -> None:
    """PostgreSQL stopped dead (SIGSTOP) while the server applies the devices' batches,
    for longer than the devices' ack timeout (so they send again): once resumed, every
    increment is applied once; meanwhile the devices say their changes are pending."""
    fleet, pg = pg_fleet
    devs = ("van-1", "van-2")
    seed(fleet, devs)
    writes = 200
    write_backlog(fleet, devs, writes)
    with frozen(pg.processes()):
        left = sum(fleet.pending(dev) for dev in devs)
        assert left > 0, "the drain had finished: the freeze was not mid-stream"
        # Long enough for the devices' resends (ack timeout 2 s) to reach the server.
        st = fleet.wait_agent_status(
            "van-1", lambda s: (s["oldest_pending_age_s"] or 0) > 6, 30,
            what="van-1's changes waiting past three ack timeouts")
        assert st["pending"] > 0 and "pending" in st["summary"], st
        print(f"\nfroze postgres with {left} changes pending; van-1: {st['summary']}")
        # The operator's view: the store cannot be reached, said plainly (exit 3 after
        # the connect timeout), not a hang.
        out = fleet.cli("server", "status", "--config", str(fleet.server_config),
                        check=False, timeout=60)
        assert out.returncode == 3 and "cannot connect to the PostgreSQL store" in out.stderr, \
            (out.returncode, out.stdout, out.stderr)
        t_resume = time.monotonic()
    fleet.wait_drained(*devs, timeout=60)
    print(f"drained {time.monotonic() - t_resume:.1f} s after postgres was resumed")
    assert_exactly_once(fleet, devs, 2 * writes)
    assert fleet.server.running


@needs_mosquitto
@pytest.mark.mosquitto
@pytest.mark.postgres
def test_postgres_restarted_mid_batch(pg_fleet: tuple[Fleet, PgServer]) -> None:
    """PostgreSQL restarted (fast shutdown: every session ended, then a start) while the
    server applies the devices' batches: every increment applied once, the server keeps
    running and the devices converge."""
    fleet, pg = pg_fleet
    devs = ("van-1", "van-2")
    seed(fleet, devs)
    writes = 200
    write_backlog(fleet, devs, writes)
    pg.restart()
    left = sum(fleet.pending(dev) for dev in devs)
    print(f"\nrestarted postgres with {left} changes pending")
    assert left > 0, "the drain had finished: the restart was not mid-stream"
    assert_exactly_once(fleet, devs, 2 * writes)
    assert fleet.server.running


# ------------------------------------------- server - PostgreSQL: a silent link


@contextlib.contextmanager
def server_behind_silent_link(tmp_path: Path, url: str) -> Iterator[tuple[Fleet, SilentLink]]:
    """A fleet whose merge server (in a network namespace of its own) reaches PostgreSQL
    and the broker through two veth paths; yields it with the PostgreSQL one."""
    reason = silent_link_unavailable()
    if reason is not None:
        pytest.skip(reason)
    parts = urlsplit(url)
    assert parts.port is not None
    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(Fleet(tmp_path, "embedded", "postgres", url))
        to_pg = stack.enter_context(SilentLink(parts.port))
        to_broker = stack.enter_context(SilentLink(fleet.port, namespace=to_pg.namespace))
        fleet.start(server=False)
        user = parts.netloc.rsplit("@", 1)[0]
        # The product's bound on unacknowledged data (25 s) lowered to 2 s, through the
        # URL as an operator would.
        through = urlunsplit(parts._replace(netloc=f"{user}@{to_pg.address}:{to_pg.port}",
                                            query="tcp_user_timeout=2000"))
        fleet.server.argv = ["ip", "netns", "exec", to_pg.namespace, *fleet.server.argv]
        fleet.start_server(env={"WAYSTATION_SERVER__STORE__URL": json.dumps(through),
                                "WAYSTATION_SERVER__STORE__RECONNECT_S": "3",
                                "WAYSTATION_SERVER__MQTT__HOST": json.dumps(to_broker.address),
                                "WAYSTATION_SERVER__MQTT__PORT": str(to_broker.port)})
        stack.callback(fleet.stop_server)   # before the links go
        yield fleet, to_pg


_HOLDING = ("SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
            "WHERE a.datname = current_database() AND a.state = 'idle in transaction' "
            "AND l.relation = 'waystation.scope_seq'::regclass AND l.mode = 'RowShareLock'")
"""The backends whose transaction holds scope rows (FOR UPDATE) and waits for the
client's next statement."""


def cut_mid_transaction(link: SilentLink, url: str, server_pid: int,
                        drained: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Cut `link` while a write transaction of the server holds its scope locks and has
    acknowledged everything the database sent it: the server is frozen for the moment
    of the cut (a CPU stall between two statements), so its next statement vanishes and,
    after the heal, nothing of that connection crosses the link: its backend never
    learns that its client gave up (as with a real host whose kernel forgot it).
    False when the drain ended (`drained()`) before such a moment was caught: on a
    loaded host the moments between two statements are few and short."""
    with psycopg.connect(url, autocommit=True) as admin:
        def cut_if_holding() -> bool:
            if not admin.execute(_HOLDING).fetchall():
                return False  # (not frozen for nothing: the drain goes on meanwhile)
            with frozen(process_tree(server_pid)):
                if not admin.execute(_HOLDING).fetchall():
                    return False
                try:  # the namespace's kernel acknowledges even while the server stands
                    wait_until(lambda: link.unacknowledged() == 0, 1, interval=0.002)
                except AssertionError:
                    return False
                link.cut()
                return True
        deadline = time.monotonic() + timeout
        next_look = 0.0
        while time.monotonic() < deadline:
            if cut_if_holding():
                return True
            if time.monotonic() >= next_look:
                if drained():
                    return False
                next_look = time.monotonic() + 0.2
            time.sleep(0.001)
        raise AssertionError(f"timed out after {timeout} s waiting for a write transaction "
                             "holding its scope locks (the drain went on all along)")


@pytest.mark.postgres
def test_postgres_link_silent_mid_transaction(tmp_path: Path, pg_database: str) -> None:
    """The merge server reaches PostgreSQL through a path that goes silent (packets
    vanish, no reset) mid-drain, so commits in flight end with their outcome unknown to
    the server. It notices within its TCP bound, says so, keeps running; healed, every
    increment is applied once (a commit whose answer was lost is not applied again on
    the resend). The cut lands while a write transaction holds its scope locks: that
    transaction's backend, which the database keeps until its idle timeout (60 s), is
    ended when the server reconnects (broker.server.store.postgres.orphans), so the
    drain resumes within seconds of the heal."""
    with server_behind_silent_link(tmp_path, pg_database) as (fleet, to_pg):
        devs = ("van-1", "van-2")
        seed(fleet, devs)
        writes = 0
        for _ in range(4):  # another drain when one ended before a moment was caught
            write_backlog(fleet, devs, 150)
            writes += 150
            assert fleet.server.proc is not None
            if cut_mid_transaction(to_pg, pg_database, fleet.server.proc.pid,
                                   lambda: sum(fleet.pending(dev) for dev in devs) == 0):
                break
        else:
            pytest.fail("four drains ended without a write transaction caught holding "
                        "its scope locks")
        left = sum(fleet.pending(dev) for dev in devs)
        print(f"\nthe link to postgres went silent with {left} changes pending")
        assert left > 0, "the drain had finished: the cut was not mid-stream"
        fleet.server.wait_event("store_failed", timeout=40)
        assert fleet.server.running, fleet.server.log_tail()
        for dev in devs:
            assert fleet.agent(dev).dead_letters() == []
        waiting = sum(fleet.pending(dev) for dev in devs)
        to_pg.heal()
        healed = time.monotonic()
        # The drain resumes within seconds of the heal, not once the database's idle
        # timeout ends the lost transaction (60 s after the cut).
        fleet.wait(lambda: sum(fleet.pending(dev) for dev in devs) < waiting, 30,
                   what="the drain resumed after the heal", interval=0.2)
        print(f"the drain resumed {time.monotonic() - healed:.1f} s after the heal")
        assert_exactly_once(fleet, devs, 2 * writes)
        assert fleet.server.running


@pytest.mark.postgres
def test_server_stops_promptly_while_its_postgres_link_is_silent(
        tmp_path: Path, pg_database: str) -> None:
    """SIGTERM while the server's path to PostgreSQL is silent and the devices keep
    sending: the server exits 0 within the harness's stop bound (20 s), not after
    pushing every queued message through a store it cannot reach. What it did not
    answer, the devices send again to the next server."""
    with server_behind_silent_link(tmp_path, pg_database) as (fleet, to_pg):
        devs = ("van-1", "van-2")
        seed(fleet, devs)
        write_backlog(fleet, devs, 150)
        to_pg.cut()
        fleet.server.wait_event("store_failed", timeout=40)
        # The devices' resends (ack timeout 2 s) queue up at the server meanwhile.
        fleet.wait_agent_status("van-1", lambda s: (s["oldest_pending_age_s"] or 0) > 6, 30,
                                what="van-1's changes waiting past three ack timeouts")
        started = time.monotonic()
        assert fleet.stop_server() == 0
        print(f"\nstopped {time.monotonic() - started:.1f} s after SIGTERM")
