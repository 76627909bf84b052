"""The server store interface: what every backend (LMDB, PostgreSQL) provides.

A store is deliberately dumb. It keeps rows and hands them back; every algorithm
(applying a change, catch-up paging, purging tombstones, the registry) is written once,
against the transaction interfaces below, in the modules that use it. A backend only
provides transactions:

    store.read()            context manager -> ReadTxn (a consistent snapshot)
    store.transact(fn)      runs fn(WriteTxn) in ONE atomic, durable write transaction
                            and returns its result. The backend MAY run fn again after a
                            retryable failure (LMDB grows its map, PostgreSQL retries a
                            serialisation failure), so fn must keep its side effects
                            inside the transaction until it returns.

What is kept (all in the same transactional store):

    devices       id -> DeviceRow (scopes, enabled, created, last seen, agent, sv, z)
    registry gen  a counter bumped by every structural registry change (add, remove,
                  scopes, enable/disable, schema publish/rollback) so another process
                  notices cheaply; merges read it under the schema lock
                  (`WriteTxn.guard_schema`)
    records       (collection, key) -> merge.RecordState JSON
    sequences     scope -> last allocated q
    index         (scope, q) -> (collection, key), the newest version of each record
                  only: a compacted change log; catch-up reads it in q order
    tombstones    (scope, q) -> (collection, key, applied at): deleted records, for purging
    horizons      scope -> highest q of a purged tombstone
    outcomes      (namespace, n) -> applied (scope, q) or permanently rejected (code,
                  reason), with the digest of the change's content; the namespace is the
                  device id, plus "/incarnation" for stores with one
                  (`broker.server.identity.outcome_ns`)
    conflicts     id -> ConflictRow; open ones also indexed by (collection, key, field)
    dead letters  id -> DeadLetter (time, device, topic, code, reason, raw payload <= 64 KiB),
                  bounded by DeadLetterLimits (count, bytes, age); drops are counted
    commands      (device, id) -> CommandRow
    login removals  device -> LoginRemoval: broker logins of removed devices the server
                  still has to delete (`broker.server.login_removal`)
    servers       server id -> ServerRow: each merge server's liveness (started, last
                  seen, stopped cleanly), for the operator (`broker.server.liveness`)
    notices       id -> Notice: record versions written outside the merge consumer (the
                  operator's `server resolve`) that the running server must fan out
    schemas       version -> SchemaVersionRow: the published collection-schema history
                  (`broker.server.schema_history`)

Rows are plain frozen dataclasses (`broker.server.store.rows`, re-exported here);
records are the JSON-able dicts of `merge.RecordState.to_json()` (the store never
interprets them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

from broker.server.store.rows import (
    DEAD_LETTER_OVERHEAD,
    MAX_DEAD_LETTER_RAW,
    CommandRow,
    ConflictRow,
    DeadLetter,
    DeadLetterLimits,
    DeadLetterStats,
    DeviceRow,
    LoginRemoval,
    Notice,
    OutcomeRow,
    SchemaVersionRow,
    ServerRow,
    StoreInfo,
    Tomb,
    dead_letter_bytes,
)

T = TypeVar("T")

STORE_FORMAT = 2
"""Version of the LMDB store's layout (PostgreSQL: its numbered migrations). 2: login
removals in a table of their own (format 1 kept them as `remove_login` command rows),
migrated when a format 1 store opens. A newer version is refused. (The `servers` table
came later without a bump: a store without it gets it, empty, when it opens, and an
earlier format 2 release ignores it.)"""


class ReadTxn(Protocol):
    """A consistent, read-only view of the store."""

    # registry
    def registry_generation(self) -> int: ...
    def get_device(self, dev: str) -> DeviceRow | None: ...
    def devices(self) -> list[DeviceRow]: ...

    # records and the per-scope log
    def get_record(self, c: str, k: str) -> dict[str, Any] | None: ...
    def records_after(self, c: str | None, after: tuple[str, str] | None, limit: int
                      ) -> list[tuple[str, str, dict[str, Any]]]:
        """Up to `limit` (collection, key, state) in (collection, key) order (byte-wise),
        after `after` (None: from the start), only of collection `c` unless it is None:
        operator tools page through the records with it."""
        ...
    def scope_seq(self, scope: str) -> int: ...
    def scope_seqs(self) -> dict[str, int]: ...
    def purge_horizon(self, scope: str) -> int: ...
    def index_range(self, scope: str, after_q: int, limit: int) -> list[tuple[int, str, str]]:
        """Up to `limit` (q, collection, key) of `scope` with q > after_q, in q order."""
        ...
    def tombs(self, scope: str, limit: int) -> list[Tomb]:
        """The oldest (lowest q) `limit` tombstones of `scope`."""
        ...

    # outcomes (keyed by namespace: the device id, or "device/incarnation")
    def get_outcome(self, ns: str, n: int) -> OutcomeRow | None: ...

    # conflicts
    def get_conflict(self, cid: int) -> ConflictRow | None: ...
    def conflicts(self, *, open_only: bool, limit: int) -> list[ConflictRow]:
        """Newest first."""
        ...
    def open_conflicts_on(self, c: str, k: str, fname: str) -> list[int]:
        """Ids of the open conflicts on one field of one record."""
        ...

    # dead letters, commands, notices
    def dead_letters(self, limit: int) -> list[DeadLetter]:
        """Newest first."""
        ...
    def dead_letter_stats(self) -> DeadLetterStats: ...
    def get_dead_letter(self, lid: int) -> DeadLetter | None: ...
    def commands(self, dev: str | None = None) -> list[CommandRow]:
        """Every command (of one device, or of all), oldest first."""
        ...
    def schema_versions(self) -> list[SchemaVersionRow]:
        """Every published schema version, rolled back ones included, oldest first."""
        ...
    def login_removals(self) -> list[LoginRemoval]:
        """Every login deletion still due, oldest first."""
        ...
    def get_login_removal(self, dev: str) -> LoginRemoval | None: ...
    def servers(self) -> list[ServerRow]:
        """Every merge server that recorded itself, by id."""
        ...
    def notices(self, limit: int) -> list[Notice]:
        """Oldest first."""
        ...

    def counts(self) -> dict[str, int]:
        """Entries per table (see StoreInfo.counts)."""
        ...


class WriteTxn(ReadTxn, Protocol):
    """A read-write transaction: every write commits together or not at all.

    Isolation a backend must give (LMDB has one writer at a time, so it gets it for
    free; a PostgreSQL backend with several consumers must do it explicitly):
    `scope_seq` / `allocate_seq` hold the scope's sequence until commit (row lock), so
    sequences stay gapless and no lower q becomes visible after a higher one;
    `get_record` locks the record (or the scope it lives in); `put_outcome` of a change
    id that a concurrent transaction committed first must fail the transaction as
    retryable (unique key), and `transact` then runs fn again, which finds the outcome
    and answers it as a duplicate. Within one transaction, reads see its own writes.
    """

    def lock_scopes(self, scopes: Iterable[str]) -> None:
        """Take the locks of these scopes' sequences now, in a fixed (sorted) order.

        A hint: `scope_seq` / `allocate_seq` lock a scope anyway when first used; taking
        a batch's scopes up front keeps concurrent consumers from deadlocking on them and
        makes the reads that follow (outcomes, records) current. LMDB: nothing to do.
        """
        ...

    def guard_schema(self) -> int:
        """The registry generation, read so that no `schema publish` / `rollback` can
        commit between this read and this transaction's commit.

        The merge consumer calls it first in every transaction that merges changes and
        compares the result with the generation its schema was loaded at: equal, the
        transaction runs under the live schema version at commit time; moved, it aborts,
        reloads and runs again. LMDB: one writer at a time, so a plain read.
        PostgreSQL: a shared transaction-level advisory lock (held to commit, taken
        before any scope lock) then the read; `lock_schema` takes the same lock
        exclusively.
        """
        ...

    def lock_schema(self) -> None:
        """Exclusive counterpart of `guard_schema`, taken first by `schema publish` and
        `rollback`: the change waits for the merge transactions in flight and the next
        ones wait for it (and then see the moved generation). LMDB: nothing to do."""
        ...

    def prefetch(self, ns: str, numbers: Iterable[int],
                 keys: Iterable[tuple[str, str]]) -> None:
        """A hint: the outcomes of change numbers `numbers` in namespace `ns` and the
        records `keys` are about to be read (a backend with round trips fetches them at
        once). LMDB: no-op.
        """
        ...

    # registry
    def put_device(self, row: DeviceRow) -> None: ...
    def delete_device(self, dev: str) -> bool: ...
    def bump_registry(self) -> int: ...

    # records and the per-scope log
    def put_record(self, c: str, k: str, state: dict[str, Any] | bytes) -> None:
        """Store a record state: the JSON-able dict, or its JSON text already encoded."""
        ...
    def delete_record(self, c: str, k: str) -> None: ...
    def allocate_seq(self, scope: str) -> int:
        """The next q of `scope` (last + 1), recorded as allocated."""
        ...
    def index_move(self, scope: str, old_q: int, new_q: int, c: str, k: str) -> None:
        """The record's newest version moves from `old_q` (0: new record) to `new_q`."""
        ...
    def index_delete(self, scope: str, q: int) -> None: ...
    def set_purge_horizon(self, scope: str, q: int) -> None: ...
    def jump_scope_seq(self, scope: str, q: int) -> None:
        """Move the scope's sequence forward to `q` (after a restore; never backwards)."""
        ...
    def put_tomb(self, tomb: Tomb) -> None: ...
    def delete_tomb(self, scope: str, q: int) -> None: ...

    # outcomes
    def put_outcome(self, ns: str, n: int, outcome: OutcomeRow) -> None: ...
    def delete_outcomes(self, dev: str) -> int:
        """Forget every outcome of a device, every incarnation's (it is removed);
        returns how many."""
        ...

    # conflicts
    def add_conflict(self, row: ConflictRow) -> int:
        """Store `row` under a new id (its `id` is ignored); returns the id."""
        ...
    def close_conflict(self, cid: int, closed_ms: int, resolution: str) -> bool:
        """Mark an open conflict closed; False if it is unknown or already closed."""
        ...
    def trim_conflicts(self, before_ms: int, keep_closed: int, limit: int = 10_000) -> int:
        """Drop closed conflict-log entries (never open ones: a person must settle them)
        last touched (created or closed) before `before_ms`, and the oldest closed ones
        beyond the newest `keep_closed`; at most `limit` per call. Returns how many."""
        ...

    # dead letters, commands, notices
    def add_dead_letter(self, letter: DeadLetter) -> int:
        """Store `letter` under a new id (raw truncated to 64 KiB; the oldest letters are
        dropped beyond the store's count limit, and in LMDB its byte and age limits too,
        `letter.t_ms` being now); returns the id."""
        ...
    def trim_dead_letters(self, now_ms: int) -> int:
        """Drop the oldest letters beyond every bound of the store's `DeadLetterLimits`
        (count, bytes, age at `now_ms`), counting them as dropped; returns how many."""
        ...
    def delete_dead_letter(self, lid: int) -> bool:
        """Remove one letter (the operator retried or discarded it; not counted as
        dropped by the bounds); False if there is none with that id."""
        ...
    def delete_dead_letters_of(self, dev: str) -> int:
        """Remove every letter of device `dev` (as `delete_dead_letter`); how many."""
        ...
    def put_command(self, row: CommandRow) -> None: ...
    def delete_commands(self, dev: str) -> int: ...
    def put_login_removal(self, row: LoginRemoval) -> None:
        """Insert or replace the removal of `row.device`."""
        ...
    def delete_login_removal(self, dev: str) -> bool:
        """Drop the removal of `dev`; False if there is none."""
        ...
    def put_server(self, row: ServerRow) -> None:
        """Insert or replace the row of `row.id`."""
        ...
    def delete_server(self, server_id: str) -> bool:
        """Forget a server (decommissioned); False if there is none."""
        ...
    def add_notice(self, notice: Notice) -> int: ...
    def delete_notice(self, nid: int) -> None: ...
    def put_schema_version(self, row: SchemaVersionRow) -> None:
        """Insert or replace the row of `row.version`."""
        ...


class Store(Protocol):
    """A backend: transactions over the tables above."""

    kind: str
    interruptible: bool
    """Whether `interrupt` ends anything: True for a store whose calls may wait on a
    network or on another session's lock (after `interrupt`, every call fails); False
    where `interrupt` is a no-op and the store keeps working. Known before the call, so
    that a stopping server can decide, before its worker's call returns, not to write
    through an interrupted store."""

    def read(self) -> AbstractContextManager[ReadTxn]: ...
    def transact(self, fn: Callable[[WriteTxn], T]) -> T: ...
    def info(self) -> StoreInfo: ...
    def interrupt(self) -> None:
        """Make a call waiting on the store return now, failing, and every later call
        fail at once (`interruptible`); safe from another thread. For a server whose
        stop's grace ran out (`broker.server.daemon`)."""
        ...
    def close(self) -> None: ...


def iter_all_index(txn: ReadTxn, scope: str, page: int = 1000) -> Iterator[tuple[int, str, str]]:
    """Every (q, collection, key) of `scope` in q order (helper for tools and tests)."""
    after = 0
    while True:
        chunk = txn.index_range(scope, after, page)
        yield from chunk
        if len(chunk) < page:
            return
        after = chunk[-1][0]


__all__ = [
    "DEAD_LETTER_OVERHEAD",
    "MAX_DEAD_LETTER_RAW",
    "STORE_FORMAT",
    "CommandRow",
    "ConflictRow",
    "DeadLetter",
    "DeadLetterLimits",
    "DeadLetterStats",
    "DeviceRow",
    "LoginRemoval",
    "Notice",
    "OutcomeRow",
    "ReadTxn",
    "SchemaVersionRow",
    "ServerRow",
    "Store",
    "StoreInfo",
    "Tomb",
    "WriteTxn",
    "dead_letter_bytes",
    "iter_all_index",
]
