"""Fault pairs: a disk full under the services the merge server leans on, PostgreSQL's
and the broker's (Mosquitto with persistence), mid-drain (the matrix of pairs and
faults: tests/e2e/fault_pairs.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fault_pairs import (
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
def pg_on_small_disk(size: str) -> Iterator[tuple[PgServer, Path]]:
    """A started PgServer (durable settings) whose whole directory, data and WAL, is on
    a tmpfs of `size`; yields it and the mount point. The mount is under the system
    temporary directory: PostgreSQL runs as `postgres`, which cannot enter pytest's
    root-private tmp dirs."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    parent = Path(tempfile.mkdtemp(prefix="waystation-pgdisk-"))
    os.chmod(parent, 0o755)
    try:
        with small_disk(parent / "disk", size) as mnt:
            pg = PgServer(mnt / "pg")
            try:
                pg.start()
                yield pg, mnt
            finally:
                pg.cleanup()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.postgres
def test_postgres_disk_full_mid_drain(tmp_path: Path) -> None:
    """PostgreSQL's disk fills up while two devices drain a backlog."""
    with pg_on_small_disk("96m") as (pg, mnt), \
            Fleet(tmp_path, "embedded", "postgres", pg.create_database("pairs")) as fleet:
        fleet.start()
        devs = ("van-1", "van-2")
        seed(fleet, devs)
        backlog = 150
        write_backlog(fleet, devs, backlog)
        fill_disk(mnt / "filler")
        left = sum(fleet.pending(dev) for dev in devs)
        print(f"\npostgres disk full with {left} changes pending")
        failed = fleet.wait(lambda: next(iter(fleet.server.events("store_failed")), None), 60,
                            what="the server's store refusing a commit", interval=0.05)
        print(failed)
        print(pg.log_tail())
        out = fleet.cli("server", "status", "--config", str(fleet.server_config),
                        check=False, timeout=60)
        print(out.returncode, out.stdout, out.stderr)
        print("pg running", pg.running)
        (mnt / "filler").unlink()
        if not pg.running:
            pg.start()
        assert_exactly_once(fleet, devs, 2 * backlog)
        print(pg.log_tail())
        assert fleet.server.running
        fleet.close()
