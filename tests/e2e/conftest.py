"""The `fleet` fixture: a `tests.e2e.fleet.Fleet` on each broker kind, torn down after the
test; when the test failed, the tails of every process's log are printed."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import MOSQUITTO, Fleet

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


@pytest.fixture(params=[
    pytest.param("embedded", id="embedded"),
    pytest.param("mosquitto", id="mosquitto", marks=pytest.mark.mosquitto),
])
def broker_kind(request: pytest.FixtureRequest) -> str:
    """Each broker in turn: the embedded amqtt one and Mosquitto (production config)."""
    kind = str(request.param)
    if kind == "mosquitto" and MOSQUITTO is None:
        pytest.skip("the mosquitto binary is not installed (apt-get install mosquitto)")
    return kind


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path, broker_kind: str) -> Iterator[Fleet]:
    """A started fleet (broker + merge server, no devices yet) on each broker kind."""
    f = Fleet(tmp_path, broker_kind)  # type: ignore[arg-type]
    try:
        f.start()
        yield f
    finally:
        if failed(request):
            print(f"\n{f.log_tails(60)}")
        f.close()
