"""Fixtures shared by every test package: a private PostgreSQL server (skips with the
reason when PostgreSQL's server binaries are missing)."""

from tests.conftest_pg import pg_database, pg_server

__all__ = ["pg_database", "pg_server"]
