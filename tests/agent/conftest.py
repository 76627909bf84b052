"""Fixtures for the device agent's tests: real LMDB stores in tmp_path; for the daemon's
tests a real embedded broker and a scripted server (a plain paho client standing where the
merge server would, subscribed to device van-12's up topic)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.api import Agent
from schemas.collection import Catalog, example_catalog_path, load_catalog
from tests.agent.agentkit import FakeClock, make_cfg
from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess, start_embedded
from tests.helpers import RecordingClient

SCRIPTED_DEV = "van-12"


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog(example_catalog_path())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def agent(tmp_path: Path, catalog: Catalog, clock: FakeClock) -> Iterator[Agent]:
    ag = Agent.open(make_cfg(tmp_path / "data"), catalog, now_ms=clock)
    yield ag
    ag.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A real embedded broker of this test's own."""
    proc = start_embedded(tmp_path / "broker")
    yield proc
    proc.stop()


@pytest.fixture
def server(broker: BrokerProcess) -> Iterator[RecordingClient]:
    """The scripted server: records what device van-12 publishes on its up topic."""
    client = RecordingClient(broker.port, "test-server", SERVER_USER, USERS[SERVER_USER])
    assert client.connect() == "Success"
    assert client.subscribe(f"{PREFIX}/{SCRIPTED_DEV}/up") == 1
    yield client
    client.close()
