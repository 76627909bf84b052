"""A pytest plugin: under CI (scripts/test.sh sets WAYSTATION_REQUIRE_SERVERS=1) a test
that would skip because a real server (Mosquitto, PostgreSQL, RabbitMQ) cannot run here
FAILS instead, so a green CI run means the integration tests against those servers ran.
The same for the real-browser tests (tests/http/browserkit.py: Debian's Chromium and
Playwright) with WAYSTATION_REQUIRE_BROWSER=1, also set by scripts/test.sh.
tests/conftest.py loads it for the whole suite."""

from __future__ import annotations

import os
import re
from collections.abc import Generator

import pytest

_SERVER_SKIP = re.compile(r"mosquitto|postgres|rabbitmq", re.IGNORECASE)
_BROWSER_SKIP = re.compile(r"chromium", re.IGNORECASE)


def is_server_skip(reason: str) -> bool:
    """True when a skip reason says a real server is missing or cannot start."""
    return _SERVER_SKIP.search(reason) is not None


def is_browser_skip(reason: str) -> bool:
    """True when a skip reason says the browser (Chromium, Playwright) is missing."""
    return _BROWSER_SKIP.search(reason) is not None


def servers_required() -> bool:
    return _set("WAYSTATION_REQUIRE_SERVERS")


def browser_required() -> bool:
    return _set("WAYSTATION_REQUIRE_BROWSER")


def _set(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _required_by(reason: str) -> str | None:
    """The variable that forbids this skip, if one is set."""
    if servers_required() and is_server_skip(reason):
        return "WAYSTATION_REQUIRE_SERVERS"
    if browser_required() and is_browser_skip(reason):
        return "WAYSTATION_REQUIRE_BROWSER"
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        name = _required_by(reason)
        if name is not None:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid}: would skip, but {name} is set (CI must run "
                               f"against the real servers and browser): {reason}")
    return report
