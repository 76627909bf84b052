"""The PostgreSQL store when its connection dies in the middle of a transaction: the
half-done transaction is rolled back by PostgreSQL, the store reconnects and runs it
again, and what it wrote is there exactly once; past the reconnect window the caller
gets a StoreError telling the operator what to check. A write connection left inside a
transaction (its abort interrupted by a signal) is rolled back before the next
transaction, or replaced when that rollback fails."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from broker.errors import StoreError
from broker.server.store.base import WriteTxn
from broker.server.store.postgres import PostgresStore
from tests.helpers import wait_until
from tests.pgserver import PgServer

pytestmark = [pytest.mark.postgres]


def _terminate(url: str, pid: int) -> None:
    """Kill one backend (the server process serving a connection), as an OOM kill or
    an operator's pg_terminate_backend would."""
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def test_backend_killed_mid_transaction_is_retried_once_on_a_new_connection(
        pg_database: str) -> None:
    """The first attempt writes, then its backend is killed before the commit: nothing of
    it is kept (PostgreSQL rolled it back), the store reconnects, the second attempt
    commits: the sequence advanced once and the record holds the second attempt's value."""
    attempts: list[int] = []
    with PostgresStore(pg_database, reconnect_s=30) as store:
        store.transact(lambda t: t.allocate_seq("r1"))

        def work(txn: WriteTxn) -> int:
            attempts.append(len(attempts) + 1)
            q = txn.allocate_seq("r1")
            txn.put_record("tasks", "a", {"attempt": len(attempts)})
            if len(attempts) == 1:
                assert store._conn is not None
                _terminate(pg_database, store._conn.info.backend_pid)
            return q

        reconnects = store.counters["reconnects"]
        q = store.transact(work)
        assert attempts == [1, 2]
        assert q == 2
        assert store.counters["reconnects"] == reconnects + 1
        with store.read() as txn:
            assert txn.scope_seq("r1") == 2
            assert txn.get_record("tasks", "a") == {"attempt": 2}


def test_server_gone_for_longer_than_the_reconnect_window_is_a_store_error(
        own_pg_server: PgServer) -> None:
    """PostgreSQL killed mid-transaction and not back: after `reconnect_s` the caller
    gets a StoreError saying the store was lost and to check that the server runs;
    nothing of the transaction is kept once it is back."""
    url = own_pg_server.create_database(f"f_{uuid.uuid4().hex[:8]}")
    with PostgresStore(url, reconnect_s=1.0, connect_timeout_s=2) as store:
        store.transact(lambda t: t.put_record("tasks", "kept", {"v": 1}))

        def work(txn: WriteTxn) -> Any:
            txn.put_record("tasks", "lost", {"v": 2})
            own_pg_server.kill()
            txn.put_record("tasks", "lost-2", {"v": 3})

        with capture_logs(), pytest.raises(StoreError, match=r"(?s)(lost|cannot connect to) "
                                           r"the PostgreSQL store at .*that the server runs"):
            store.transact(work)
        own_pg_server.start()
        with store.read() as txn:
            assert txn.get_record("tasks", "kept") == {"v": 1}
            assert txn.get_record("tasks", "lost") is None
            assert txn.get_record("tasks", "lost-2") is None
        store.transact(lambda t: t.put_record("tasks", "after", {"v": 4}))
        with store.read() as txn:
            assert txn.get_record("tasks", "after") == {"v": 4}


def _backend_alive(url: str, pid: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                           (pid,)).fetchone()
        return row is not None and row[0] > 0


def _left_in_a_transaction(store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> int:
    """Leave the store's write connection inside a half-done transaction, the way a
    signal (Ctrl-C, or a SIGTERM handler raising) landing during the abort's rollback
    leaves it: the transaction wrote `tasks/half` and took the lock on scope r1's
    sequence row, then failed; the rollback was interrupted before it reached the
    server. Returns the backend pid of that connection."""
    conn = store._conn
    assert conn is not None
    interrupted: list[bool] = []

    def interrupted_rollback() -> None:
        interrupted.append(True)
        monkeypatch.delattr(conn, "rollback")  # only this once
        raise KeyboardInterrupt

    def work(txn: WriteTxn) -> None:
        txn.allocate_seq("r1")
        txn.put_record("tasks", "half", {"v": 1})
        txn.index_range("r1", 0, 10)  # reading its own writes sends them to the server
        raise RuntimeError("the caller's own bug")

    monkeypatch.setattr(conn, "rollback", interrupted_rollback)
    with pytest.raises(KeyboardInterrupt):
        store.transact(work)
    assert interrupted == [True]
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    return conn.info.backend_pid


def test_connection_left_in_a_transaction_is_rolled_back_before_the_next(
        pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next transaction finds the write connection still inside the interrupted
    one: it rolls that back and runs on the same connection; nothing of the
    interrupted transaction is kept and the sequence advances once."""
    with PostgresStore(pg_database, reconnect_s=5) as store:
        store.transact(lambda t: t.allocate_seq("r1"))
        pid = _left_in_a_transaction(store, monkeypatch)
        reconnects = store.counters["reconnects"]
        q = store.transact(lambda t: t.allocate_seq("r1"))
        assert q == 2
        assert store.counters["reconnects"] == reconnects
        assert store._conn is not None and store._conn.info.backend_pid == pid
        with store.read() as txn:
            assert txn.scope_seq("r1") == 2
            assert txn.get_record("tasks", "half") is None


def test_rollback_failing_on_a_connection_killed_mid_transaction_reconnects(
        pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend of the connection left inside a transaction is killed (an operator's
    pg_terminate_backend, an OOM kill): the next transaction's rollback of the leftover
    fails, the store drops that connection and runs the transaction on a new one;
    PostgreSQL discarded the half-written rows with the backend."""
    with PostgresStore(pg_database, reconnect_s=10) as store:
        store.transact(lambda t: t.allocate_seq("r1"))
        pid = _left_in_a_transaction(store, monkeypatch)
        _terminate(pg_database, pid)
        wait_until(lambda: not _backend_alive(pg_database, pid), 10,
                   message=f"backend {pid} to exit")  # gone before the next statement
        reconnects = store.counters["reconnects"]
        q = store.transact(lambda t: (t.put_record("tasks", "next", {"v": 2}),
                                      t.allocate_seq("r1"))[1])
        assert q == 2
        assert store.counters["reconnects"] == reconnects + 1
        assert store._conn is not None and store._conn.info.backend_pid != pid
        with store.read() as txn:
            assert txn.scope_seq("r1") == 2
            assert txn.get_record("tasks", "half") is None
            assert txn.get_record("tasks", "next") == {"v": 2}


def test_rollback_failing_with_the_server_gone_is_a_store_error_then_recovers(
        own_pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL dies while the write connection sits inside the interrupted
    transaction and stays down past `reconnect_s`: the next transaction cannot roll the
    leftover back nor reconnect, and the caller gets a StoreError telling the operator
    to check that the server runs. Once it is back, a transaction runs on a fresh
    connection and nothing of the interrupted one was kept."""
    url = own_pg_server.create_database(f"f_{uuid.uuid4().hex[:8]}")
    with PostgresStore(url, reconnect_s=1.0, connect_timeout_s=2) as store:
        store.transact(lambda t: t.allocate_seq("r1"))
        pid = _left_in_a_transaction(store, monkeypatch)
        own_pg_server.kill()
        with capture_logs(), pytest.raises(StoreError, match=r"(?s)cannot connect to the "
                                           r"PostgreSQL store at .*that the server runs"):
            store.transact(lambda t: t.put_record("tasks", "refused", {"v": 3}))
        own_pg_server.start()
        reconnects = store.counters["reconnects"]
        q = store.transact(lambda t: t.allocate_seq("r1"))
        assert q == 2
        assert store.counters["reconnects"] == reconnects + 1
        assert store._conn is not None and store._conn.info.backend_pid != pid
        with store.read() as txn:
            assert txn.scope_seq("r1") == 2
            assert txn.get_record("tasks", "half") is None
            assert txn.get_record("tasks", "refused") is None


def test_disk_full_says_to_free_disk_space(pg_database: str) -> None:
    """PostgreSQL refusing a write for want of disk space (SQLSTATE 53100, raised here by
    a trigger; tests/e2e/test_fault_pairs_disk_services.py fills a real disk): the
    StoreError tells the operator what to do, not only which file could not grow, and
    the store is usable again afterwards."""
    with PostgresStore(pg_database) as store:
        with psycopg.connect(pg_database, autocommit=True) as conn:
            conn.execute("CREATE FUNCTION waystation.disk_full() RETURNS trigger LANGUAGE plpgsql "
                         "AS $$ BEGIN RAISE EXCEPTION 'could not extend file' "
                         "USING ERRCODE = 'disk_full'; END $$")
            conn.execute("CREATE TRIGGER disk_full BEFORE INSERT ON waystation.records "
                         "FOR EACH ROW EXECUTE FUNCTION waystation.disk_full()")
        with pytest.raises(StoreError, match=r"failed \(53100\): could not extend file "
                                             r"\(free disk space on the PostgreSQL server"):
            store.transact(lambda t: t.put_record("tasks", "a", {"n": 1}))
        with psycopg.connect(pg_database, autocommit=True) as conn:
            conn.execute("DROP TRIGGER disk_full ON waystation.records")
        store.transact(lambda t: t.put_record("tasks", "a", {"n": 1}))
