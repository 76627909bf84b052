"""The PostgreSQL store: connections, migrations, transactions with retries."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import set_json_dumps, set_json_loads

from broker.errors import StoreError, StoreFormatError
from broker.server.store.base import (
    DeadLetterLimits,
    ReadTxn,
    StoreInfo,
    WriteTxn,
)
from broker.server.store.postgres import orphans
from broker.server.store.postgres.common import (
    _RECONNECT,
    _RETRYABLE,
    ADVISORY_LOCK,
    DEFAULT_MAX_DEAD_LETTERS,
    HUNG_IDLE_S,
    MAX_ATTEMPTS,
    SCHEMA,
    T,
    _Blocked,
    _Reorder,
    _sqlstate,
    describe_url,
    migrations,
)
from broker.server.store.postgres.read import PgReadTxn
from broker.server.store.postgres.write import PgWriteTxn

log = structlog.get_logger("broker.server.store")

_HINTS: dict[str, str] = {
    "53100": " (free disk space on the PostgreSQL server: nothing of this transaction "
             "was written, and the devices send it again)",
}
"""What the operator can do about a failure, by SQLSTATE, appended to its message: the
first line of PostgreSQL's own text names the file it could not extend, not what to do
(its HINT line says "Check free disk space", but only the first line is kept)."""

LINK_DEFAULTS: dict[str, int] = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 25_000}
"""How a connection notices that the database's host went silent (a cut cable, a
firewall dropping packets, a host powered off: no reset ever arrives). Keepalives find
it while the connection is idle (10 + 3 x 5 s). `tcp_user_timeout` (ms) finds it while a
query waits: without it the kernel retransmits for ~15 minutes before giving up, and the
merge server would hang that long, then reconnect only at the retransmissions' next
try after the network came back. With it, the transaction fails after 25 s and the
store reconnects (`reconnect_s`) as after any lost connection."""

# ---------------------------------------------------------------------------- the store


class PostgresStore:
    """The store in one PostgreSQL database (see module docstring)."""

    kind = "postgres"
    interruptible = True
    """`interrupt` shuts the connections down: see there."""

    def __init__(self, url: str, *, max_dead_letters: int | None = None,
                 dead_letters: DeadLetterLimits | None = None,
                 reconnect_s: float = 30.0, connect_timeout_s: int = 10) -> None:
        self.url = url
        self.location = describe_url(url)
        limits = dead_letters or DeadLetterLimits(max_count=DEFAULT_MAX_DEAD_LETTERS)
        if max_dead_letters is not None:
            limits = dataclasses.replace(limits, max_count=max_dead_letters)
        self.dead_letter_limits = limits
        self.reconnect_s = reconnect_s
        self._connect_timeout = connect_timeout_s
        self._conninfo = self._make_conninfo(url)
        self._conn: psycopg.Connection[Any] | None = None
        self._readers: list[psycopg.Connection[Any]] = []
        self._aux: psycopg.Connection[Any] | None = None  # autocommit, for new scopes
        self._staged = False  # the write connection has its staging table
        self.counters: dict[str, int] = {"retries": 0, "reconnects": 0, "reorders": 0,
                                         "hung_ended": 0}
        self._closed = False
        # every connection made, for `interrupt` (from another thread)
        self._open: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()
        self._open_lock = threading.Lock()
        self._backend: orphans.Backend | None = None  # the write connection's
        self._lost_backends: list[orphans.Backend] = []  # to end after a reconnect
        conn = self._connect(write=True)
        try:
            self._migrate(conn)
            self._backend = orphans.identify(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # --- connections

    def _make_conninfo(self, url: str) -> str:
        try:
            params = conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise StoreError(f"store.url is not a valid PostgreSQL URL: {exc}") from None
        options = str(params.get("options") or "") + (
            f" -c search_path={SCHEMA} -c idle_in_transaction_session_timeout=60000"
            " -c plan_cache_mode=force_custom_plan")
        # The URL's own settings win (an operator may know their network better).
        link = {k: params.get(k) or v for k, v in LINK_DEFAULTS.items()}
        return make_conninfo(url, options=options.strip(),
                             application_name=params.get("application_name") or "waystation",
                             **link)

    def _connect(self, *, write: bool) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self._conninfo, autocommit=False,
                                   connect_timeout=self._connect_timeout)
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot connect to the PostgreSQL store at {self.location}: "
                f"{str(exc).strip()} (check store.url, that the server runs and accepts "
                "connections from this host, and the user's password)") from exc
        self._track(conn)
        set_json_loads(orjson.loads, conn)
        set_json_dumps(orjson.dumps, conn)
        if write:  # whatever the server's default: the locking above assumes it
            conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        else:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
        return conn

    def _write_conn(self, deadline: float) -> psycopg.Connection[Any]:
        """The write connection, (re)connecting until `deadline` if it is gone."""
        if self._closed:
            raise StoreError(f"the PostgreSQL store at {self.location} is closed")
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                return conn
            try:
                conn.rollback()
                return conn
            except psycopg.Error:
                pass  # gone: reconnect below
        if conn is not None:
            self._drop_write(conn)
        delay = 0.05
        while True:
            if self._closed:
                raise StoreError(f"the PostgreSQL store at {self.location} is closed")
            try:
                conn = self._connect(write=True)
                self._adopt_write(conn)
                self.counters["reconnects"] += 1
                return conn
            except StoreError:
                if time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 1.0)

    def _drop_write(self, conn: psycopg.Connection[Any]) -> None:
        """Close the write connection, lost: its backend may live on (`orphans`)."""
        if conn is self._conn:
            if self._backend is not None:
                # a few at most: one per loss, ended at the next connect
                self._lost_backends = [*self._lost_backends[-7:], self._backend]
            self._backend = None
            self._conn = None
        conn.close()

    def _adopt_write(self, conn: psycopg.Connection[Any]) -> None:
        """Make a new connection the write connection: first end the backends of the
        lost ones, which may hold the row locks its transactions need (`orphans`)."""
        try:
            if self._lost_backends:
                orphans.end(conn, self._lost_backends)
                self._lost_backends = []
            backend = orphans.identify(conn)
        except psycopg.Error as exc:  # lost already: as a failed connect
            conn.close()
            raise StoreError(f"cannot connect to the PostgreSQL store at {self.location}: "
                             f"{str(exc).strip()}") from exc
        self._conn, self._backend, self._staged = conn, backend, False

    def _aux_conn(self) -> psycopg.Connection[Any]:
        """The autocommit connection beside the write one (new scopes, hung holders)."""
        conn = self._aux
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = self._aux = psycopg.connect(self._conninfo, autocommit=True,
                                               connect_timeout=self._connect_timeout)
            self._track(conn)
        return conn

    def _end_hung(self) -> None:
        """End the backends of hung write transactions that hold scope locks
        (`orphans.end_hung`). A failure here is the next attempt's to meet."""
        try:
            if orphans.end_hung(self._aux_conn(), HUNG_IDLE_S, f"{SCHEMA}.scope_seq"):
                self.counters["hung_ended"] += 1
        except psycopg.Error as exc:
            log.warning("store_hung_check_failed", error=str(exc).strip())

    def _create_scopes(self, scopes: list[str]) -> None:
        """Create the sequence rows of new scopes in a transaction of their own.

        Inserting them inside the caller's transaction would make other transactions
        wait for it on a row it has not locked in scope order (a deadlock risk). A row
        whose transaction later rolls back stays at q = 0, which means "never used".
        """
        conn = self._aux_conn()
        conn.execute("INSERT INTO scope_seq (scope) SELECT unnest(%s::text[]) "
                     "ON CONFLICT DO NOTHING", (sorted(scopes),))

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        known = migrations()
        latest = known[-1].version
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))
                # DDL only when needed: a database set up by its owner can then be used
                # by a role that may not create anything
                cur.execute("SELECT to_regnamespace(%s), to_regclass(%s)",
                            (SCHEMA, f"{SCHEMA}.schema_migrations"))
                has_schema, has_table = cur.fetchone() or (None, None)
                if has_schema is None:
                    cur.execute(f"CREATE SCHEMA {SCHEMA}")
                if has_table is None:
                    cur.execute("CREATE TABLE schema_migrations ("
                                "version integer PRIMARY KEY, name text NOT NULL, "
                                "applied_at timestamptz NOT NULL DEFAULT now())")
                cur.execute("SELECT version FROM schema_migrations")
                applied = {int(r[0]) for r in cur.fetchall()}
                newest = max(applied, default=0)
                if newest > latest:
                    raise StoreFormatError(
                        f"the PostgreSQL store at {self.location} has schema version "
                        f"{newest}, newer than this version of Waystation knows ({latest}): "
                        "upgrade Waystation on this host, or point store.url at another "
                        "database")
                for m in known:
                    if m.version not in applied:
                        cur.execute(m.sql.encode())
                        cur.execute("INSERT INTO schema_migrations (version, name) "
                                    "VALUES (%s, %s)", (m.version, m.name))
            conn.commit()
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
            raise StoreError(f"cannot prepare the PostgreSQL store at {self.location}: "
                             f"{str(exc).strip()} (the user needs the right to create a "
                             f"schema and tables in this database)") from exc
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                conn.rollback()
            raise

    def schema_version(self) -> int:
        """The newest migration applied to the database."""
        with self.read() as txn:
            assert isinstance(txn, PgReadTxn)
            row = txn._one("SELECT max(version) FROM schema_migrations")
            return int(row[0] or 0)

    # --- transactions

    @contextmanager
    def read(self) -> Iterator[ReadTxn]:
        conn = self._reader()
        txn = PgReadTxn(conn)
        try:
            try:
                txn._one("SELECT 1")  # takes the snapshot now
            except psycopg.OperationalError:
                if not (conn.broken or conn.closed):
                    raise
                conn.close()  # the server went away since: one fresh try
                conn = self._connect(write=False)
                txn = PgReadTxn(conn)
                txn._one("SELECT 1")
            yield txn
        except psycopg.Error as exc:
            raise StoreError(f"reading the PostgreSQL store at {self.location} failed: "
                             f"{str(exc).strip()}") from exc
        finally:
            self._release(conn)

    def _reader(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise StoreError(f"the PostgreSQL store at {self.location} is closed")
        while self._readers:
            conn = self._readers.pop()
            if not conn.closed and not conn.broken:
                return conn
            conn.close()
        return self._connect(write=False)

    def _release(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.broken:
            conn.close()
            return
        try:
            conn.rollback()
        except psycopg.Error:
            conn.close()
            return
        if len(self._readers) < 2 and not self._closed:
            self._readers.append(conn)
        else:
            conn.close()

    def transact(self, fn: Callable[[WriteTxn], T]) -> T:
        deadline = time.monotonic() + self.reconnect_s
        prelock: set[str] = set()
        attempt = 0
        while True:
            attempt += 1
            conn = self._write_conn(deadline)
            txn = PgWriteTxn(self, conn)
            try:
                if prelock:
                    txn.lock_scopes(prelock)
                result = fn(txn)
                if txn._failed is not None:  # fn swallowed a failure of ours
                    raise txn._failed
                txn._send()
                conn.commit()
                self._staged = self._staged or txn._staging
                return result
            except BaseException as raised:
                self._abort(conn)
                if not isinstance(raised, Exception):  # KeyboardInterrupt, SystemExit
                    raise
                exc = txn._failed or raised  # ours, even if fn turned it into another
                if isinstance(exc, _Blocked):
                    # Waiting behind a holder: a busy one is waited for again (not an
                    # attempt: no bound, as without lock_timeout), a hung one is ended.
                    prelock |= exc.scopes
                    attempt -= 1
                    self._end_hung()
                    continue
                if isinstance(exc, _Reorder):
                    self.counters["reorders"] += 1
                    prelock |= exc.scopes
                    if attempt < MAX_ATTEMPTS:
                        continue
                    raise StoreError(f"the PostgreSQL store at {self.location}: a "
                                     f"transaction failed {attempt} times on lock "
                                     "order; retry later") from None
                if not isinstance(exc, psycopg.Error):
                    raise
                prelock |= set(txn._locked)
                state = _sqlstate(exc)
                if state in _RETRYABLE and attempt < MAX_ATTEMPTS:
                    self.counters["retries"] += 1
                    time.sleep(random.uniform(0, min(0.2, 0.002 * 2 ** min(attempt, 10))))
                    continue
                if self._lost(conn, exc):
                    self._drop_write(conn)
                    if time.monotonic() < deadline:
                        continue  # _write_conn reconnects (or gives up at the deadline)
                raise StoreError(self._message(exc, attempt)) from exc

    def _lost(self, conn: psycopg.Connection[Any], exc: psycopg.Error) -> bool:
        state = _sqlstate(exc)
        return (conn.closed or conn.broken or state.startswith("08") or state in _RECONNECT
                or (isinstance(exc, psycopg.OperationalError) and not state))

    def _message(self, exc: psycopg.Error, attempts: int) -> str:
        state = _sqlstate(exc)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if state in _RETRYABLE:
            return (f"the PostgreSQL store at {self.location}: a transaction failed "
                    f"{attempts} times on concurrent updates ({state}: {text}); retry later")
        if self._conn is None or self._conn.closed or self._conn.broken:
            return (f"lost the PostgreSQL store at {self.location} and could not reconnect "
                    f"within {self.reconnect_s:g} s: {text} (check that the server runs)")
        hint = _HINTS.get(state, "")
        return (f"the PostgreSQL store at {self.location} failed ({state or 'error'}): "
                f"{text}{hint}")

    def _abort(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.broken:
            return
        try:
            conn.rollback()
        except psycopg.Error:
            conn.close()

    # --- information

    def info(self) -> StoreInfo:
        with self.read() as txn:
            counts = txn.counts()
            assert isinstance(txn, PgReadTxn)
            row = txn._one("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) "
                           "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                           "WHERE n.nspname = %s AND c.relkind = 'r'", (SCHEMA,))
        return StoreInfo(kind=self.kind, location=self.location, size_bytes=int(row[0]),
                         capacity_bytes=0, counts=counts)

    def _track(self, conn: psycopg.Connection[Any]) -> None:
        with self._open_lock:
            self._open.add(conn)

    def interrupt(self) -> None:
        """Make a call waiting on the database return now, failing, and every later one
        fail at once; safe from another thread (the store's own calls run on one). For a
        server that stops: a query on a link that went silent waits for the TCP bound,
        one behind a lock that a lost backend holds waits for as long as it holds it,
        and neither may hold the stop. Each connection's socket is shut down, not closed
        (the thread inside it closes it); a connect under way ends at its timeout."""
        self._closed = True
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            _shut_down(conn)

    def close(self) -> None:
        self._closed = True
        conns = [*self._readers, *(c for c in (self._conn, self._aux) if c is not None)]
        self._readers, self._conn, self._aux = [], None, None
        for conn in conns:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shut_down(conn: psycopg.Connection[Any]) -> None:
    """Shut `conn`'s socket down: a wait on it wakes up and reads the end of the stream."""
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:  # closed already
        return
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(fd))  # a duplicate: closing it leaves conn's
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()
