"""A pytest plugin: under CI (scripts/test.sh sets WAYSTATION_REQUIRE_SERVERS=1) a test
that would skip because a real server (Mosquitto, PostgreSQL, RabbitMQ) cannot run here
FAILS instead, so a green CI run means the integration tests against those servers ran.
tests/conftest.py loads it for the whole suite."""

from __future__ import annotations

import os
import re
from collections.abc import Generator

import pytest

_SERVER_SKIP = re.compile(r"mosquitto|postgres|rabbitmq", re.IGNORECASE)


def is_server_skip(reason: str) -> bool:
    """True when a skip reason says a real server is missing or cannot start."""
    return _SERVER_SKIP.search(reason) is not None


def servers_required() -> bool:
    return os.environ.get("WAYSTATION_REQUIRE_SERVERS", "") not in ("", "0")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if servers_required() and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if is_server_skip(reason):
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid}: would skip, but WAYSTATION_REQUIRE_SERVERS is "
                               f"set (CI must run against the real servers): {reason}")
    return report
