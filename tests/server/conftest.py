"""Fixtures of the server tests: store factories (one per backend) and small builders.

`store_factory` / `store` run a test once per backend: LMDB under tmp_path, PostgreSQL
in a fresh database of the session's private server (skipped, with the reason, when
PostgreSQL's binaries are missing). `reopen(store)` opens another store object on the
same data, as a restarted server would.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.keyring import KeyEncryptionKey
from broker.server.store.base import Store
from broker.server.store.lmdb_store import LmdbStore
from tests.pgserver import PgServer

StoreFactory = Callable[..., Store]


def _lmdb(tmp: Path, **opts: Any) -> Store:
    return LmdbStore(tmp, **opts)


TEST_KEK = KeyEncryptionKey(b"server-store-test-key-0123456789")


def _lmdb_sealed(tmp: Path, **opts: Any) -> Store:
    """The LMDB store with encryption at rest (records, conflicts, dead letters, notices
    sealed): every contract and engine test must pass on it unchanged."""
    return LmdbStore(tmp, kek=TEST_KEK, **opts)


class _Postgres:
    """Databases on the session's PgServer, one per store the test opens."""

    def __init__(self) -> None:
        self.server: PgServer | None = None
        self.created: list[str] = []

    def __call__(self, tmp: Path, **opts: Any) -> Store:
        from broker.server.store.postgres import PostgresStore

        assert self.server is not None, "the postgres factory needs the pg_server fixture"
        name = f"t_{uuid.uuid4().hex[:16]}"
        url = self.server.create_database(name)
        self.created.append(name)
        return PostgresStore(url, **opts)

    def drop_all(self) -> None:
        names, self.created = self.created, []
        if self.server is not None and self.server.running:
            for name in names:
                self.server.drop_database(name)


_postgres = _Postgres()

# Every backend's factory; the contract suite (and the engine tests) run against each.
STORE_FACTORIES: dict[str, Callable[..., Store]] = {"lmdb": _lmdb, "lmdb-sealed": _lmdb_sealed,
                                                    "postgres": _postgres}


def reopen(store: Store) -> Store:
    """Another store object on the data of `store` (as after a server restart)."""
    if isinstance(store, LmdbStore):
        return LmdbStore(store.path.parent, kek=store.kek)
    from broker.server.store.postgres import PostgresStore

    assert isinstance(store, PostgresStore)
    return PostgresStore(store.url)


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens a fresh store of each backend under tmp_path (closed at teardown)."""
    opened: list[Store] = []
    if request.param == "postgres":
        _postgres.server = request.getfixturevalue("pg_server")
    make = STORE_FACTORIES[request.param]

    def factory(**opts: Any) -> Store:
        store = make(tmp_path / f"s{len(opened)}", **opts)
        opened.append(store)
        return store

    try:
        yield factory
    finally:
        for store in opened:
            store.close()
        if request.param == "postgres":
            _postgres.drop_all()


@pytest.fixture
def store(store_factory: StoreFactory) -> Store:
    """A fresh store of each backend."""
    return store_factory()
