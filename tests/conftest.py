"""Fixtures shared by every test package: a private PostgreSQL server (skips with the
reason when PostgreSQL's server binaries are missing)."""

from tests.conftest_pg import own_pg_server, pg_database, pg_server

__all__ = ["own_pg_server", "pg_database", "pg_server"]
