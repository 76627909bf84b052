"""Fixtures shared by every test package: a private PostgreSQL server (skips with the
reason when PostgreSQL's server binaries are missing — except under CI, where
tests/server_skips.py turns such a skip into a failure), the pytest-xdist groups of
tests/xdist_groups.py, coverage handed to the xdist workers (tests/coverage_workers.py)
and logging put back after every test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog

from tests.conftest_pg import own_pg_server, pg_database, pg_server, server_cli_env
from waystation.logs import OWN_LOGGERS

pytest_plugins = ["tests.server_skips", "tests.xdist_groups", "tests.coverage_workers"]


@pytest.fixture(autouse=True)
def _logging_as_a_fresh_process() -> Iterator[None]:
    """Each test starts with logging as a fresh CLI process has it: structlog not
    configured. Without this, a test that configured it (`capture_logs` leaves
    `is_configured` set, with structlog's stdout printer behind) makes library code log
    into a later test's stdout, and which test comes later depends on the order the
    tests run in (xdist workers)."""
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h).__name__ == "_WaystationHandler"]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)


__all__ = ["own_pg_server", "pg_database", "pg_server", "server_cli_env"]
