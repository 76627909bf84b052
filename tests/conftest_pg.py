"""pytest fixtures for a private PostgreSQL server (tests/pgserver.py).

    pg_server     session-scoped PgServer, durable settings, started once, removed at the end
    pg_database   a fresh, uniquely named database on it for one test; yields its URL
    own_pg_server a started PgServer of one test's own, which it may kill or restart
    server_cli_env the environment a server CLI command gets, once on an LMDB store and
                  once on a fresh PostgreSQL database (parametrized "lmdb", "postgres")

tests/conftest.py makes them available to every test. Each fixture skips the test, saying
why, when PostgreSQL's server binaries are not installed. A test that kills or restarts
the server takes `own_pg_server` instead of disturbing the shared one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pgserver import PgServer, unavailable_reason

__all__ = ["own_pg_server", "pg_database", "pg_server", "server_cli_env"]


def _started_server() -> Iterator[PgServer]:
    """A started PgServer (the test skips if PostgreSQL is missing), removed afterwards."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the whole session (skips if PostgreSQL is missing)."""
    yield from _started_server()


@pytest.fixture
def own_pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server of this test's own (durable settings), which it may kill."""
    yield from _started_server()


@pytest.fixture
def pg_database(pg_server: PgServer) -> Iterator[str]:
    """A new empty database on the session server for one test; yields its URL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = pg_server.create_database(name)
    yield url
    if pg_server.running:
        pg_server.drop_database(name)


@pytest.fixture(params=["lmdb", "postgres"])
def server_cli_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a server CLI command: its data directory and password file
    under `tmp_path`, with the LMDB store, or with a fresh database on the session's
    PostgreSQL server (store.kind = "postgres"), dropped afterwards."""
    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server"),
           "WAYSTATION_BROKER__PASSWORD_FILE": str(tmp_path / "passwd")}
    if request.param == "lmdb":
        yield env
        return
    server: PgServer = request.getfixturevalue("pg_server")
    name = f"cli_{uuid.uuid4().hex[:16]}"
    env.update(WAYSTATION_SERVER__STORE__KIND="postgres",
               WAYSTATION_SERVER__STORE__URL=server.create_database(name))
    yield env
    if server.running:
        server.drop_database(name)
