"""Fixtures of the server tests: store factories (one per backend) and small builders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.store.base import Store
from broker.store.lmdb_store import LmdbStore

StoreFactory = Callable[..., Store]


def _lmdb(tmp: Path, **opts: Any) -> Store:
    return LmdbStore(tmp, **opts)


# Every backend's factory; the contract suite runs against each. PostgreSQL joins here.
STORE_FACTORIES: dict[str, Callable[..., Store]] = {"lmdb": _lmdb}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens a fresh store of each backend under tmp_path (closed at teardown)."""
    opened: list[Store] = []
    make = STORE_FACTORIES[request.param]

    def factory(**opts: Any) -> Store:
        store = make(tmp_path / f"s{len(opened)}", **opts)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> Store:
    """A fresh store of each backend."""
    return store_factory()
