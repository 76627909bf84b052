"""The `fleet` fixture: a `tests.e2e.fleet.Fleet` of each kind (embedded broker + LMDB,
Mosquitto + PostgreSQL), torn down after the test; when the test failed, the tails of
every process's log are printed."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import MOSQUITTO, Fleet
from tests.pgserver import unavailable_reason

_REPORT_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                         pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell that the test failed."""
    report = yield
    item.stash.setdefault(_REPORT_KEY, {})[report.when] = report
    return report


def failed(request: pytest.FixtureRequest) -> bool:
    """True when the setup or call phase of the requesting test failed."""
    reports = request.node.stash.get(_REPORT_KEY, {})
    return any(r.failed for r in reports.values())


FLEET_KINDS = [
    pytest.param(("embedded", "lmdb"), id="embedded-lmdb"),
    pytest.param(("mosquitto", "postgres"), id="mosquitto-postgres",
                 marks=[pytest.mark.mosquitto, pytest.mark.postgres]),
]
"""The two fleets every sync-loop test runs on: the single-machine default (embedded amqtt
broker, LMDB store) and the production layout (Mosquitto from deploy/, PostgreSQL store,
devices on the TLS listener, the server on the loopback one)."""


@pytest.fixture(params=FLEET_KINDS)
def fleet_kind(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(broker kind, store kind) in turn; skips, saying why, where a server is missing."""
    broker, store = request.param
    if broker == "mosquitto" and MOSQUITTO is None:
        pytest.skip("the mosquitto binary is not installed (apt-get install mosquitto)")
    if store == "postgres":
        reason = unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
    return broker, store


@pytest.fixture
def broker_kind(fleet_kind: tuple[str, str]) -> str:
    """The broker kind of `fleet_kind` ("embedded" or "mosquitto")."""
    return fleet_kind[0]


@pytest.fixture
def fleet_options() -> dict[str, Any]:
    """Extra `Fleet(...)` keyword options for the `fleet` fixture; a test module
    overrides this fixture to ask for more (e.g. ``{"metrics": True}``)."""
    return {}


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path, fleet_kind: tuple[str, str],
          fleet_options: dict[str, Any]) -> Iterator[Fleet]:
    """A started fleet (broker + merge server, no devices yet) of each kind."""
    broker, store = fleet_kind
    pg_url = request.getfixturevalue("pg_database") if store == "postgres" else None
    options: dict[str, Any] = {"device_tls": broker == "mosquitto", **fleet_options}
    f = Fleet(tmp_path, broker, store, pg_url, **options)  # type: ignore[arg-type]
    try:
        f.start()
        yield f
    finally:
        if failed(request):
            print(f"\n{f.log_tails(60)}")
        f.close(check=not failed(request))
