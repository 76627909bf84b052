"""tests/pgserver.py: a private PostgreSQL that starts, serves, survives kill -9 and restarts."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tests.pgserver import PgServer, PgServerError, unavailable_reason

_UNAVAILABLE = unavailable_reason()
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or ""),
]


@pytest.fixture
def own_server() -> Iterator[PgServer]:
    """A PgServer of this test's own (durable settings), removed afterwards."""
    server = PgServer()
    try:
        yield server
    finally:
        server.cleanup()


def test_session_server_accepts_connections(pg_server: PgServer) -> None:
    """The session server runs on 127.0.0.1 at its own port and psycopg connects."""
    assert pg_server.url == f"postgresql://postgres@127.0.0.1:{pg_server.port}/postgres"
    assert pg_server.port != 5432
    with psycopg.connect(pg_server.url) as conn:
        row = conn.execute("SELECT current_user, inet_server_addr()::text, "
                           "current_setting('fsync')").fetchone()
    assert row == ("postgres", "127.0.0.1/32", "on")


def test_create_database_gives_a_usable_url(pg_server: PgServer) -> None:
    """create_database returns the URL of a new, empty database."""
    url = pg_server.create_database("pgserver_selftest")
    try:
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("pgserver_selftest",)
            conn.execute("CREATE TABLE t (x int)")
        with pytest.raises(psycopg.errors.DuplicateDatabase):
            pg_server.create_database("pgserver_selftest")
    finally:
        pg_server.drop_database("pgserver_selftest")
    with pytest.raises(ValueError):
        pg_server.create_database('x"; DROP DATABASE postgres; --')


def test_pg_database_fixture_is_fresh(pg_database: str) -> None:
    """pg_database is an empty database of its own."""
    with psycopg.connect(pg_database) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables.fetchone() == (0,)


def test_unix_socket_lives_in_the_server_directory(own_server: PgServer) -> None:
    """The server's unix socket is in its own directory, not /var/run/postgresql."""
    own_server.start()
    assert (own_server.socket_dir / f".s.PGSQL.{own_server.port}").exists()
    with psycopg.connect(host=str(own_server.socket_dir), port=own_server.port,
                         user="postgres", dbname="postgres") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_kill_9_then_restart_keeps_committed_rows(own_server: PgServer) -> None:
    """After kill -9 of every postgres process, start() recovers every committed row."""
    own_server.start()
    with psycopg.connect(own_server.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int PRIMARY KEY)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 1000)")
    idle = psycopg.connect(own_server.url)   # a backend that is alive at the crash
    port, pid = own_server.port, own_server.pid
    own_server.kill()
    assert not own_server.running
    with pytest.raises(psycopg.OperationalError):
        idle.execute("SELECT 1")
    idle.close()
    own_server.start()
    assert own_server.port == port and own_server.pid != pid
    with psycopg.connect(own_server.url) as conn:
        assert conn.execute("SELECT count(*), sum(x) FROM t").fetchone() == (1000, 500500)
    assert "database system was interrupted" in own_server.log_path.read_text()


def test_restart_is_a_clean_stop_and_start(own_server: PgServer) -> None:
    """restart() shuts down cleanly (no recovery needed) and serves the same data."""
    own_server.start()
    with psycopg.connect(own_server.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t AS SELECT 42 AS answer")
    own_server.restart()
    with psycopg.connect(own_server.url) as conn:
        assert conn.execute("SELECT answer FROM t").fetchone() == (42,)
    assert "database system was shut down at" in own_server.log_path.read_text()
    own_server.stop()
    assert not own_server.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(own_server.url, connect_timeout=2)


def test_fast_option_turns_durability_off() -> None:
    """PgServer(fast=True) runs with fsync and synchronous_commit off; the default keeps them."""
    with PgServer(fast=True) as fast, psycopg.connect(fast.url) as conn:
        settings = conn.execute("SELECT current_setting('fsync'), "
                                "current_setting('synchronous_commit')").fetchone()
    assert settings == ("off", "off")


def test_start_twice_is_an_error(own_server: PgServer) -> None:
    """Starting a running server raises instead of starting a second postmaster."""
    own_server.start()
    with pytest.raises(PgServerError):
        own_server.start()
