"""Fault pairs: a disk full under the services the merge server leans on, PostgreSQL's
and the broker's (Mosquitto with persistence), mid-drain (the matrix of pairs and
faults: tests/e2e/fault_pairs.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.fault_pairs import (
    SCOPE,
    assert_exactly_once,
    needs_mosquitto,
    seed,
    write_backlog,
)
from tests.e2e.fleet import Fleet
from tests.pgserver import PgServer, unavailable_reason
from tests.small_disk import fill_disk, small_disk

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


# ------------------------------------------------------ server - PostgreSQL: disk full


@contextlib.contextmanager
def pg_on_small_disk(size: str, *, wal_only: bool) -> Iterator[tuple[PgServer, Path]]:
    """A started PgServer (durable settings) with its files on a tmpfs of `size`: all of
    them, or (`wal_only`) only its WAL, in 1 MiB segments, so that it needs a new file
    soon (a WAL volume of its own, as some operators mount). Yields it and the mount
    point. Everything is under the system temporary directory: PostgreSQL runs as
    `postgres`, which cannot enter pytest's root-private tmp dirs."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    parent = Path(tempfile.mkdtemp(prefix="waystation-pgdisk-"))
    os.chmod(parent, 0o755)
    try:
        with small_disk(parent / "disk", size) as mnt:
            if wal_only:
                pg = PgServer(parent / "pg", wal_segment_mb=1, wal_dir=mnt / "wal")
            else:
                pg = PgServer(mnt / "pg")
            try:
                pg.start()
                yield pg, mnt
            finally:
                pg.cleanup()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def store_failed(fleet: Fleet) -> dict[str, Any]:
    """The server's first logged store failure of this run (waited for)."""
    return fleet.wait(lambda: next(iter(fleet.server.events("store_failed")), None), 30,
                      what="the server logging its store's failure", interval=0.05)


def nothing_refused(fleet: Fleet, devs: tuple[str, ...], *, server: bool = True) -> None:
    """The failure was taken as transient: no change dead-lettered on the devices, nor
    on the server (when its store can be read: assert_exactly_once checks it later)."""
    for dev in devs:
        assert fleet.agent(dev).dead_letters() == []
    if server:
        assert fleet.server_dead_letters() == []


@pytest.mark.postgres
def test_postgres_disk_full_mid_drain(tmp_path: Path) -> None:
    """PostgreSQL's disk (data and WAL) fills up while two devices drain a backlog:
    PostgreSQL refuses to extend a table (SQLSTATE 53100, it keeps running); the merge
    server keeps running, logs a failure naming the disk, refuses nothing for good, and
    `server status` still answers; once there is room every increment is applied once."""
    with pg_on_small_disk("96m", wal_only=False) as (pg, mnt), \
            Fleet(tmp_path, "embedded", "postgres", pg.create_database("pairs")) as fleet:
        fleet.start()
        devs = ("van-1", "van-2")
        seed(fleet, devs)
        backlog = 150
        write_backlog(fleet, devs, backlog)
        fill_disk(mnt / "filler")
        left = sum(fleet.pending(dev) for dev in devs)
        print(f"\npostgres disk full with {left} changes pending")
        assert left > 0, "the drain had finished: the disk filled too late"
        failed = store_failed(fleet)["exception"][0]["exc_value"]
        print(failed)
        assert "No space left on device" in failed and "free disk space" in failed, failed
        assert pg.running, pg.log_tail()
        assert fleet.server.running, fleet.server.log_tail()
        nothing_refused(fleet, devs)
        # Reads still work on a full disk: status answers, and what it says is true: the
        # server runs but its store refuses its writes (the liveness row, a small write
        # PostgreSQL still takes, says so at the next tick).
        def refused() -> str | None:
            out = fleet.cli("server", "status", "--config", str(fleet.server_config)).stdout
            return out if "ITS STORE REFUSES ITS WRITES since" in out else None
        said = fleet.wait(refused, 30, what="server status saying the store refuses writes")
        assert "server-1 (group main" in said and ": running" in said, said
        assert "No space left on device" in said and "dead letters: 0" in said, said
        (mnt / "filler").unlink()
        assert_exactly_once(fleet, devs, 2 * backlog)
        assert fleet.server.running
        fleet.close()


@pytest.mark.postgres
def test_postgres_wal_disk_full_mid_drain(tmp_path: Path) -> None:
    """PostgreSQL's WAL disk fills up while two devices drain a backlog, and a bulk
    write of another database on the cluster needs a new WAL file: PostgreSQL PANICs,
    restarts its backends and, with no room for its end-of-recovery checkpoint, shuts
    down (or, with room, comes back by itself). The merge server rides it out: keeps
    running, says it cannot reach its store, refuses nothing for good; once there is room
    and PostgreSQL runs again (systemd restarts it; here the test) it reconnects and every
    increment is applied once."""
    with pg_on_small_disk("24m", wal_only=True) as (pg, mnt), \
            Fleet(tmp_path, "embedded", "postgres", pg.create_database("pairs")) as fleet:
        scratch = pg.create_database("scratch")
        fleet.start(server=False)
        # Reconnect attempts for 3 s (not 30) before a batch is reported failed.
        fleet.start_server(env={"WAYSTATION_SERVER__STORE__RECONNECT_S": "3"})
        devs = ("van-1", "van-2")
        seed(fleet, devs)
        backlog = 150
        write_backlog(fleet, devs, backlog)
        fill_disk(mnt / "filler")
        with pytest.raises(psycopg.Error), psycopg.connect(scratch, autocommit=True) as conn:
            conn.execute("CREATE TABLE bulk AS SELECT g, repeat('x', 200) AS t "
                         "FROM generate_series(1, 100000) g")
        left = sum(fleet.pending(dev) for dev in devs)
        print(f"\npostgres WAL disk full with {left} changes pending")
        assert left > 0, "the drain had finished: the disk filled too late"
        fleet.wait(lambda: "PANIC:  could not write to file" in pg.log_tail(200), 30,
                   what="postgres panicking on the full WAL disk")
        failed = store_failed(fleet)["exception"][0]["exc_value"]
        print(failed)
        assert "PostgreSQL store" in failed, failed
        assert fleet.server.running, fleet.server.log_tail()
        nothing_refused(fleet, devs, server=False)
        fleet.wait(lambda: not pg.running or _accepting(pg), 60,
                   what="postgres either shut down or back after its recovery")
        print(f"postgres after the PANIC: {'running' if pg.running else 'shut down'}")
        out = fleet.cli("server", "status", "--config", str(fleet.server_config),
                        check=False)
        if pg.running:   # it recovered: the store reads again, status says so
            assert out.returncode == 0 and ": running" in out.stdout, (out.stdout, out.stderr)
        else:
            assert out.returncode == 3, (out.stdout, out.stderr)
            assert "cannot connect to the PostgreSQL store" in out.stderr, out.stderr
        (mnt / "filler").unlink()
        if not pg.running:
            pg.start()
        assert_exactly_once(fleet, devs, 2 * backlog)
        assert fleet.server.running
        fleet.close()


def _accepting(pg: PgServer) -> bool:
    try:
        with psycopg.connect(pg.url, connect_timeout=5):
            return True
    except psycopg.Error:
        return False


# ------------------------------------------------- agent/server - Mosquitto: disk full


def _saves(fleet: Fleet) -> int:
    return fleet.broker_log_tail(100_000).count("Saving in-memory database")


def _save(fleet: Fleet) -> None:
    """Mosquitto's autosave, now: SIGUSR1 runs the same save; waited for in its log."""
    assert fleet.broker is not None and fleet.broker.proc is not None
    before = _saves(fleet)
    os.kill(fleet.broker.proc.pid, signal.SIGUSR1)
    fleet.wait(lambda: _saves(fleet) > before, 10, what="mosquitto saving its database")


@needs_mosquitto
@pytest.mark.mosquitto
def test_mosquitto_persistence_disk_full_mid_drain(tmp_path: Path) -> None:
    """Mosquitto's persistence disk (the shipped config: persistence on) fills up while
    two devices drain a backlog through it: its saves fail (Mosquitto 2.0.11 logs no
    error, and leaves an empty database file where its last good one was), it keeps
    serving; restarted (a clean stop, whose save fails too) it comes back without its
    sessions and queued messages. The devices and the server connect again, resubscribe
    and send again: every increment applied once, nothing dead-lettered, the devices
    converge. (The embedded broker persists nothing but its password files.)"""
    with Fleet(tmp_path, "mosquitto") as fleet:
        persist = fleet.broker_dir / "data"
        persist.rmdir()   # the config's persistence_location, mounted small here
        with small_disk(persist, "4m") as mnt:
            fleet.start()
            devs = ("van-1", "van-2")
            seed(fleet, devs)
            _save(fleet)   # a good save first: persistent sessions and subscriptions
            assert (mnt / "mosquitto.db").stat().st_size > 0
            backlog = 150
            write_backlog(fleet, devs, backlog)
            fill_disk(mnt / "filler")
            at_fill = fleet.scope_seq(SCOPE)
            _save(fleet)   # fails: the disk is full
            # Mosquitto 2.0 replaced its good file with an empty one (what the failed
            # save left): the disk is kept full past the room that freed.
            fill_disk(mnt / "filler-2")
            assert fleet.broker is not None and fleet.broker.running, fleet.broker_log_tail()
            # It serves on: the drain goes on through it.
            fleet.wait(lambda: fleet.scope_seq(SCOPE) > at_fill, 30,
                       what="the server applying changes through the broker meanwhile")
            left = sum(fleet.pending(dev) for dev in devs)
            print(f"\nmosquitto's disk full; restarting it with {left} changes pending")
            assert left > 0, "the drain had finished: the restart was not mid-stream"
            # A clean stop saves once more (fails), exit 0; its sessions are gone after.
            fleet.restart_broker(hard=False)
            print(fleet.broker_log_tail(8))
            for dev in devs:
                assert fleet.agent(dev).dead_letters() == []
            assert_exactly_once(fleet, devs, 2 * backlog)
            assert fleet.broker.running and fleet.server.running
            fleet.close()
