"""`PostgresStore.interrupt`: a stopping server makes the store's call in flight return
at once, whatever it waits for on the database (here: a row lock another session holds,
which no TCP bound ends), and every later call fail at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

from broker.errors import StoreError
from broker.server.store.postgres import PostgresStore
from tests.helpers import wait_until
from tests.pgserver import unavailable_reason

_UNAVAILABLE = unavailable_reason()
pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or ""),
]


@pytest.fixture
def store(pg_database: str) -> Iterator[PostgresStore]:
    s = PostgresStore(pg_database)
    s.transact(lambda txn: txn.lock_scopes(["s"]))  # the scope's row exists
    yield s
    s.close()


def test_interrupt_ends_a_transaction_waiting_for_a_lock(
        store: PostgresStore, pg_database: str) -> None:
    outcome: dict[str, object] = {}

    def merge() -> None:
        try:
            store.transact(lambda txn: txn.lock_scopes(["s"]))
            outcome["result"] = "committed"
        except StoreError as exc:
            outcome["result"] = str(exc)

    with psycopg.connect(pg_database) as holder:
        holder.execute("SELECT 1 FROM waystation.scope_seq WHERE scope = 's' FOR UPDATE")
        worker = threading.Thread(target=merge, daemon=True)
        worker.start()
        with psycopg.connect(pg_database, autocommit=True) as probe:
            wait_until(lambda: probe.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'").fetchone(), 10,
                message="the store's transaction waiting for the row lock")
        started = time.monotonic()
        store.interrupt()
        worker.join(5)
        assert not worker.is_alive(), "the store's call still waits after interrupt()"
        assert time.monotonic() - started < 5
        assert "closed" in str(outcome.get("result")), outcome
        holder.rollback()
    with pytest.raises(StoreError, match="closed"):
        store.transact(lambda txn: txn.lock_scopes(["s"]))
    with pytest.raises(StoreError, match="closed"), store.read():
        pass
