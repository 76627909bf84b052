"""Fixtures for the device agent's tests: real LMDB stores in tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.api import Agent
from schemas.collection import Catalog, example_catalog_path, load_catalog
from tests.agent.agentkit import FakeClock, make_cfg


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
