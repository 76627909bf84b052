"""The schema lock of PostgreSQL write transactions (`WriteTxn.guard_schema`,
`lock_schema`): a transaction-level advisory lock on `SCHEMA_LOCK`, shared by merges and
every transaction that locks a scope, exclusive for `schema publish` / `rollback`;
always taken before any scope lock (one order, so no deadlock between the two kinds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg

from broker.errors import StoreError
from broker.server.store.postgres.common import LOCK_WAIT_MS, SCHEMA_LOCK


class SchemaLocks:
    """Mixed into `PgWriteTxn` (which provides the attributes declared here)."""

    _conn: psycopg.Connection[Any]
    _failed: BaseException | None
    _locked: dict[str, list[int]]
    _schema_lock: str
    """"", "shared" or "exclusive": what this transaction holds of SCHEMA_LOCK."""

    if TYPE_CHECKING:  # provided by PgReadTxn
        def _run(self, sql: Any, params: Any = None) -> psycopg.Cursor[Any]: ...
        def registry_generation(self) -> int: ...

    def guard_schema(self) -> int:
        """Shared SCHEMA_LOCK, then the generation, in one round trip: two statements
        of one simple query, each with its own READ COMMITTED snapshot, so the read
        sees every publish that committed before the lock was granted."""
        if self._failed is not None:
            raise self._failed
        if self._schema_lock:
            return self.registry_generation()
        try:
            with self._conn.cursor() as cur:
                # After the schema lock (whose wait for a publish is not bounded), the
                # bound of every lock wait left in the transaction (`_Blocked`).
                cur.execute(f"SELECT pg_advisory_xact_lock_shared({SCHEMA_LOCK}); "
                            f"SELECT set_config('lock_timeout', '{LOCK_WAIT_MS}', true); "
                            "SELECT gen FROM registry_gen")
                cur.nextset()
                cur.nextset()
                row = cur.fetchone()
        except psycopg.Error as exc:
            self._failed = exc
            raise
        self._schema_lock = "shared"
        return int(row[0]) if row else 0

    def lock_schema(self) -> None:
        if self._schema_lock == "exclusive":
            return
        if self._schema_lock or self._locked:
            raise StoreError("lock_schema must come first in its transaction (an upgrade "
                             "from the shared lock could deadlock)")
        self._run("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        self._schema_lock = "exclusive"

    def _hold_schema(self) -> None:
        """Every transaction that locks a scope (merges, resolutions, expiry) holds the
        schema lock shared first, so a publish's rewrite of the records never races a
        write to them."""
        if not self._schema_lock:
            # set_config after the lock: target list entries are evaluated in order
            self._run("SELECT pg_advisory_xact_lock_shared(%s), "
                      "set_config('lock_timeout', %s, true)", (SCHEMA_LOCK, str(LOCK_WAIT_MS)))
            self._schema_lock = "shared"
