"""The dead letters of the PostgreSQL store, and their bounds (`DeadLetterLimits`).

Tables (migrations 0001 and 0002)::

    dead_letters       id identity -> (t_ms, device, topic, code, reason, raw, size,
                       bytes = base.dead_letter_bytes); index on t_ms
    dead_letter_drops  one row per trim that dropped letters: (t_ms, count, bytes)

Bounds. The count bound is applied on every insert, without waiting for any other
transaction: ids come from one sequence, so letters more than `max_count` ids below the
new one are older than the newest `max_count` (rows another transaction holds are
skipped). The byte and age bounds need the whole table's total, which several servers
would fight over if it were kept in one row; `trim` applies them (and the count bound),
and the engine calls it about once a minute, so between two trims the table can pass
`max_bytes` by what one minute of (already rate-limited) refusals adds. Drops are
recorded by inserting a row into `dead_letter_drops`, never by updating a shared one.
"""

from __future__ import annotations

from typing import Any, Protocol

from broker.server.store.base import (
    MAX_DEAD_LETTER_RAW,
    DeadLetter,
    DeadLetterLimits,
    DeadLetterStats,
    dead_letter_bytes,
)
from broker.server.store.postgres.common import _clean

_FOLD_DROPS = 100
"""Fold dead_letter_drops into one row once it has this many."""


class _Txn(Protocol):
    def _run(self, sql: Any, params: Any = None) -> Any: ...
    def _one(self, sql: Any, params: Any = None) -> Any: ...
    def _all(self, sql: Any, params: Any = None) -> list[Any]: ...


def stats(txn: _Txn) -> DeadLetterStats:
    count, size, truncated, oldest = txn._one(
        "SELECT count(*), coalesce(sum(bytes), 0)::int8, "
        "count(*) FILTER (WHERE size > octet_length(raw)), coalesce(min(t_ms), 0) "
        "FROM dead_letters")
    dropped, dropped_bytes = txn._one(
        "SELECT coalesce(sum(count), 0)::int8, coalesce(sum(bytes), 0)::int8 "
        "FROM dead_letter_drops")
    return DeadLetterStats(count=int(count), bytes=int(size), truncated=int(truncated),
                           oldest_ms=int(oldest), dropped=int(dropped),
                           dropped_bytes=int(dropped_bytes))


def add(txn: _Txn, limits: DeadLetterLimits, letter: DeadLetter) -> int:
    """Insert `letter` (raw cut to 64 KiB) and apply the count bound; its id."""
    raw = bytes(letter.raw[:MAX_DEAD_LETTER_RAW])
    kept = DeadLetter(0, letter.t_ms, _clean(letter.device), _clean(letter.topic),
                      _clean(letter.code), _clean(letter.reason), raw,
                      letter.size or len(letter.raw))
    lid = int(txn._one(
        "INSERT INTO dead_letters (t_ms, device, topic, code, reason, raw, size, bytes) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (kept.t_ms, kept.device, kept.topic, kept.code, kept.reason, raw, kept.size,
         dead_letter_bytes(kept)))[0])
    if lid > limits.max_count:
        _record(txn, letter.t_ms, txn._all(
            "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters "
            "WHERE id <= %s FOR UPDATE SKIP LOCKED) RETURNING bytes",
            (lid - limits.max_count,)))
    return lid


def get(txn: _Txn, lid: int) -> DeadLetter | None:
    row = txn._one("SELECT id, t_ms, device, topic, code, reason, raw, size "
                   "FROM dead_letters WHERE id = %s", (lid,))
    if row is None:
        return None
    i, t, d, tp, code, reason, raw, size = row
    return DeadLetter(id=int(i), t_ms=int(t), device=d, topic=tp, code=code, reason=reason,
                      raw=bytes(raw), size=int(size))


def delete(txn: _Txn, lid: int) -> bool:
    """Remove letter `lid` (discarded or retried by the operator: not a drop by the
    bounds, so nothing goes into dead_letter_drops). False if it is unknown."""
    return txn._one("DELETE FROM dead_letters WHERE id = %s RETURNING id", (lid,)) is not None


def delete_of(txn: _Txn, device: str) -> int:
    """Remove every letter of `device`; how many."""
    return len(txn._all("DELETE FROM dead_letters WHERE device = %s RETURNING id",
                        (_clean(device),)))


def trim(txn: _Txn, limits: DeadLetterLimits, now_ms: int) -> int:
    """Drop the oldest letters beyond every bound at `now_ms`; how many were dropped."""
    gone = txn._all(
        "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters "
        "WHERE t_ms < %s FOR UPDATE SKIP LOCKED) RETURNING bytes",
        (now_ms - limits.max_age_ms,))
    # The newest letters that fit both the count and the byte bound stay.
    gone += txn._all(
        "DELETE FROM dead_letters WHERE id IN (SELECT id FROM (SELECT id, "
        "row_number() OVER w AS nth, sum(bytes) OVER w AS total FROM dead_letters "
        "WINDOW w AS (ORDER BY id DESC)) AS ranked WHERE nth > %s OR total > %s) "
        "RETURNING bytes", (limits.max_count, limits.max_bytes))
    _record(txn, now_ms, gone)
    folded = txn._one("SELECT count(*) FROM dead_letter_drops")[0]
    if int(folded) >= _FOLD_DROPS:
        txn._run("WITH gone AS (DELETE FROM dead_letter_drops RETURNING count, bytes) "
                 "INSERT INTO dead_letter_drops (t_ms, count, bytes) "
                 "SELECT %s, sum(count), sum(bytes) FROM gone", (now_ms,))
    return len(gone)


def _record(txn: _Txn, now_ms: int, gone: list[Any]) -> None:
    if gone:
        txn._run("INSERT INTO dead_letter_drops (t_ms, count, bytes) VALUES (%s, %s, %s)",
                 (now_ms, len(gone), sum(int(row[0]) for row in gone)))


__all__ = ["add", "delete", "delete_of", "get", "stats", "trim"]
