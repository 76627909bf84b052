"""Fixtures for the local API: a real store and a running server on its Unix socket."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.api import Agent
from agent.http.server import ApiServer
from schemas.collection import Catalog, example_catalog_path, load_catalog
from tests.agent.agentkit import make_cfg
from tests.http.httpkit import Client, issue, running_api
from waystation.config import AgentConfig


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog(example_catalog_path())


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A temp dir with a short path (Unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ws-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cfg(short_dir: Path) -> AgentConfig:
    return make_cfg(short_dir / "data")


@pytest.fixture
def api(cfg: AgentConfig, catalog: Catalog) -> Iterator[tuple[ApiServer, Agent]]:
    with running_api(cfg, catalog) as pair:
        yield pair


@pytest.fixture
def token(cfg: AgentConfig) -> str:
    return issue(Path(cfg.data_dir))


@pytest.fixture
def client(api: tuple[ApiServer, Agent], token: str) -> Iterator[Client]:
    server, _ = api
    assert server.socket_path is not None
    c = Client(server.socket_path, token)
    yield c
    c.close()
