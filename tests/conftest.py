"""Fixtures shared by every test package: a private PostgreSQL server (skips with the
reason when PostgreSQL's server binaries are missing — except under CI, where
tests/server_skips.py turns such a skip into a failure), and the pytest-xdist groups of
tests/xdist_groups.py."""

from tests.conftest_pg import own_pg_server, pg_database, pg_server

pytest_plugins = ["tests.server_skips", "tests.xdist_groups"]

__all__ = ["own_pg_server", "pg_database", "pg_server"]
