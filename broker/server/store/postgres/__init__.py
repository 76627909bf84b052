"""The PostgreSQL store: several merge consumers (`waystation server run` processes) over
one database.

Schema (``broker/server/store/migrations/*.sql``, everything in the schema ``waystation``)::

    registry_gen  one row: the registry generation
    devices       id -> data jsonb (DeviceRow.to_json())
    records       (c, k) -> state bytea (merge.to_json() as orjson bytes, never parsed
                  by the database), scope, q: the record's entry in the compacted change
                  log, indexed by (scope, q) (``records_log``): catch-up pages read it in
                  q order and get the states from the same rows
    scope_seq     scope -> q (last allocated), horizon (purge horizon); THE row lock
                  of the scope
    tombs         (scope, q) -> (c, k, t_ms)            oldest first per scope
    outcomes      (dev, n) -> (c, k, scope, q, code, reason); the primary key is what
                  makes a change apply once across consumers
    conflicts     id identity -> row; partial indexes on (c, k, field, id) and (id)
                  WHERE open
    dead_letters  id identity -> row (raw bytea, bytes counted); newest first by the
                  primary key; bounded by count, bytes and age (``letters.py``)
    dead_letter_drops  what the bounds dropped (one row per trim)
    commands      (dev, id) -> row
    login_removals  dev -> (id, queued_ms, failed_ms, error, hint): broker logins of
                  removed devices still to delete (migration 0005; before it,
                  `remove_login` rows in commands)
    servers       id -> (grp, version, started_ms, seen_ms, stopped_ms,
                  broker_down_ms, proc, store_failing_ms, store_error): each merge
                  server's liveness (migration 0006; its broker link, 0007; its process,
                  0008; its store refusing writes, 0009; `broker.server.liveness`)
    notices       id identity -> (scope, q, rec jsonb)
    schema_versions  version -> (published_ms, source, text, rolled_back_ms): the
                  published collection-schema history (migration 0004)

The log lives in the record rows because it holds exactly one entry per record, its
newest version: moving it is part of the record's own UPDATE instead of a delete and an
insert in another table. (A row can hold a bare log entry or a record without one, so
the primitives keep their meaning.)

Migrations are numbered ``NNNN_name.sql`` files applied on open, in one transaction
holding ``pg_advisory_xact_lock``, and recorded in ``schema_migrations``; a database
whose schema is newer than this code is refused (`StoreFormatError`).

Isolation (the obligations of `base.WriteTxn`). Write transactions run at READ
COMMITTED with explicit row locks:

* The scope lock. Every access of a write transaction to scope-keyed data (sequence,
  horizon, log, tombstones) first locks the scope's ``scope_seq`` row (``SELECT ...
  FOR UPDATE``) and keeps it until commit. So the transactions that write one scope
  commit one after another, each allocating q from the value its predecessor
  committed: sequences are gapless, and since a transaction releases its locks only
  after its commit is visible, no reader snapshot can contain q+1 without q (a
  checkpoint never skips a change committed later). A scope's row is created on first
  use by a separate autocommit statement, so that no transaction ever waits for another
  one's uncommitted insert of it.
* Records need no lock of their own. A record lives in exactly one scope (a change
  naming another scope is refused; `merge` never moves a record), and every writer of a
  record holds that scope's lock: `get_record` in a write transaction, on finding a
  record whose scope it does not hold yet, locks that scope and reads the record again.
  Reads after the lock are current (READ COMMITTED takes a new snapshot per
  statement), so read-modify-write of a record cannot lose an update. The one case a
  scope lock cannot cover - two transactions creating the same new (c, k) - ends in a
  unique violation on ``records``, which is retried (the retry sees the record).
* Outcomes: inserted with a plain INSERT; a concurrent consumer that applied the same
  change id first makes it fail with a unique violation, and the retry answers the
  change as a duplicate. Normally the scope lock already serialises the two (the
  applier locks a batch's scopes before it reads its outcomes), so the second finds
  the outcome on its first attempt.
* Deadlocks between scope locks are avoided rather than detected: a group locks the
  scopes of each batch in sorted order up front (`lock_scopes`, called by the applier);
  a lock on a scope that sorts *below* one already held is only tried (NOWAIT), and if
  it is taken the attempt is abandoned and rerun with every scope it needed locked
  first, in order. Hence every blocking wait is for a scope above all the waiter holds,
  and no cycle of waits on scope rows can form. The other waits come at commit time,
  in a fixed order of tables and keys (new records, outcomes, devices); trimming old
  dead letters skips rows another transaction holds. Anything left is caught by
  PostgreSQL's deadlock detector and retried.
* A hung holder. Scope-lock waits are bounded (`lock_timeout` LOCK_WAIT_MS, set with
  the shared schema lock, so a wait for a publish stays unbounded); when one runs out,
  a holder whose transaction has sent nothing for HUNG_IDLE_S is ended (its server is
  stopped dead: `orphans.end_hung`) and the wait starts again, for as long as a working
  holder needs. Otherwise one hung server of a group would stall every other on its
  scopes until the database's idle_in_transaction_session_timeout (60 s).
* The live collection schema: a transaction-level advisory lock (`SCHEMA_LOCK`), taken
  shared by every merge (`guard_schema`, with the registry generation read after it in
  the same round trip) and by every transaction that locks a scope, always before its
  first scope lock; taken exclusively, first, by `schema publish` / `rollback`
  (`lock_schema`). A publish thus waits for the merges in flight, rewrites the records
  with no writer beside it, and every merge after it reads the moved generation
  (READ COMMITTED: a statement's snapshot is taken after the lock was granted). One
  order (schema lock, then scope rows), so no new deadlock.
* Devices: the engine reads a device row and writes it back modified. The write is a
  merge of only the fields this transaction changed (``data || diff``), so two
  consumers touching the same device (last seen, presence) never undo each other.

Writes to records (and their log entries), tombstones, outcomes, sequences and devices
are buffered in the transaction object (reads see them) and sent at commit, or before
a range read that could see them, as a few set statements (binary COPY for big sets):
a group of 2,000 changes costs a handful of round trips for its writes. Reads that the
applier is about to make are fetched per batch (`prefetch`).

`transact(fn)` retries fn from scratch on serialization failure, deadlock, lock
reordering or unique violation (bounded, with jittered backoff) and on a lost
connection (reconnecting, for up to `reconnect_s`; the lost connection's backend, which
the database may still run with the transaction's locks, is ended first: `orphans`). A
commit whose outcome is unknown (connection lost during COMMIT) is retried too: fn is
idempotent at the level that matters, because a change that did commit is found in
``outcomes`` and answered as a duplicate. Any other database error becomes a
`StoreError` naming the server without the password.

`read()` gives a REPEATABLE READ, READ ONLY snapshot on a connection of its own (the
write connection stays free, so a transaction can run while a read is open).
"""

from __future__ import annotations

from broker.server.store.postgres.common import (
    ADVISORY_LOCK,
    DEFAULT_MAX_DEAD_LETTERS,
    SCHEMA,
    Migration,
    describe_url,
    migrations,
)
from broker.server.store.postgres.read import PgReadTxn
from broker.server.store.postgres.store import PostgresStore
from broker.server.store.postgres.write import PgWriteTxn

__all__ = ["ADVISORY_LOCK", "DEFAULT_MAX_DEAD_LETTERS", "SCHEMA", "Migration", "PgReadTxn",
           "PgWriteTxn", "PostgresStore", "describe_url", "migrations"]
