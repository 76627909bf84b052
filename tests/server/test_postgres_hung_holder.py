"""A write transaction waiting for a scope lock: a holder that works is waited for as
long as it needs (past any number of lock_timeout rounds); a holder whose transaction
sent nothing for HUNG_IDLE_S (its server stopped dead inside it) is ended, so the
waiter goes on instead of waiting for the database's idle timeout (60 s)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from broker.server.store.postgres import PostgresStore
from broker.server.store.postgres.common import HUNG_IDLE_S, LOCK_WAIT_MS
from tests.pgserver import unavailable_reason

_UNAVAILABLE = unavailable_reason()
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or ""),
]

_LOCK = "SELECT 1 FROM waystation.scope_seq WHERE scope = 's' FOR UPDATE"


@pytest.fixture
def store(pg_database: str) -> Iterator[PostgresStore]:
    s = PostgresStore(pg_database)
    s.transact(lambda txn: txn.lock_scopes(["s"]))  # the scope's row exists
    yield s
    s.close()


def _merge(store: PostgresStore) -> float:
    """A merge's transaction on scope `s`: seconds until it committed."""
    started = time.monotonic()
    store.transact(lambda txn: txn.lock_scopes(["s"]))
    return time.monotonic() - started


def test_a_hung_holder_is_ended(store: PostgresStore, pg_database: str) -> None:
    took: list[float] = []
    with psycopg.connect(pg_database) as hung:
        hung.execute(_LOCK)   # and nothing more: a server stopped inside its transaction
        merge = threading.Thread(target=lambda: took.append(_merge(store)), daemon=True)
        merge.start()
        merge.join(HUNG_IDLE_S + 3 * LOCK_WAIT_MS / 1000)
        assert took, "the merge still waits behind the hung transaction"
        assert took[0] >= HUNG_IDLE_S, took
        assert store.counters["hung_ended"] == 1
        with pytest.raises(psycopg.OperationalError):
            hung.execute("SELECT 1")   # woken, it finds its connection ended


def test_a_working_holder_is_waited_for(store: PostgresStore, pg_database: str) -> None:
    """Held for two lock_timeout rounds, each statement well within HUNG_IDLE_S."""
    hold_s = 2.5 * LOCK_WAIT_MS / 1000
    with psycopg.connect(pg_database) as busy:
        busy.execute(_LOCK)

        def work() -> None:
            deadline = time.monotonic() + hold_s
            while time.monotonic() < deadline:
                busy.execute("SELECT pg_sleep(0.2)")
            busy.commit()
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        took = _merge(store)
        worker.join(10)
        assert took >= hold_s - 0.5, took
        assert store.counters["hung_ended"] == 0
        assert busy.execute("SELECT 1").fetchone() == (1,)
