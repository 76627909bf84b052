"""pytest fixtures for a private PostgreSQL server (tests/pgserver.py).

    pg_server     session-scoped PgServer, durable settings, started once, removed at the end
    pg_database   a fresh, uniquely named database on it for one test; yields its URL

tests/conftest.py makes them available to every test. Both fixtures skip the test, saying
why, when PostgreSQL's server binaries are not installed. A test that kills or restarts
the server makes its own `PgServer` instead of disturbing the shared one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.pgserver import PgServer, unavailable_reason

__all__ = ["pg_database", "pg_server"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the whole session (skips if PostgreSQL is missing)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_database(pg_server: PgServer) -> Iterator[str]:
    """A new empty database on the session server for one test; yields its URL."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = pg_server.create_database(name)
    yield url
    if pg_server.running:
        pg_server.drop_database(name)
