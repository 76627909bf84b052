"""Server-side retention per collection: records the operator lets expire are deleted
by the server, like a device's delete (`[retention.collections.NAME]` in server.toml).

    [retention.collections.tasks]
    after = "365d"                            # since the record last changed
    when = { status = ["delivered", "failed"] }   # optional, as in schemas.retention

An expired record becomes a deleted record at the scope's next sequence: a tombstone
(purged after `merge.tombstone_retention_s`, like every other), a `delta` to the online
devices of its scope (a notice, as for an operator's resolution) and, for the others,
catch-up. So devices never keep a record the server no longer has (guarantee 2), and a
device that writes it later re-creates it, as after any delete. Open conflicts of an
expired record are closed ("record expired").

The age is the record's newest stamp (its last write, from any device or the operator).
Bounded: one pass pages through the collections `batch` records per transaction; the
engine runs a step every tick while a pass is under way and a pass every `interval_s`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from broker.server.store.base import Notice, Store, Tomb, WriteTxn
from schemas.collection import Catalog
from schemas.retention import RetentionRule, evictable
from schemas.wire import Change
from waystation import merge
from waystation.errors import ConfigError
from waystation.hlc import SERVER_NODE, Clock


@dataclass
class Expiry:
    """The expiry rules of a server and where its pass stands (kept in memory: a restart
    starts a new pass, which finds the same records)."""

    catalog: Catalog
    rules: Mapping[str, RetentionRule]
    batch: int = 500
    interval_ms: int = 3_600_000
    next_ms: int = 0
    position: tuple[str, str] | None = None
    """The last record examined by the pass under way (None: start over)."""
    running: bool = False
    expired_total: int = field(default=0)

    def __post_init__(self) -> None:
        for name, rule in self.rules.items():
            spec = self.catalog.collection(name)
            if spec is None:
                raise ConfigError(f"retention.collections.{name}: the server's schema has no "
                                  f"collection {name!r}; fix the name or remove the table")
            for fname in rule.when:
                if fname not in spec.fields:
                    raise ConfigError(f"retention.collections.{name}.when names {fname!r}, "
                                      f"not a field of {name}")

    def tick(self, store: Store, clock: Clock, now_ms: int) -> int:
        """One step when a pass is under way or due; returns the records expired."""
        if not self.rules or (not self.running and now_ms < self.next_ms):
            return 0
        expired, finished = self.step(store, clock, now_ms)
        self.running = not finished
        if finished:
            self.next_ms = now_ms + self.interval_ms
        return expired

    def step(self, store: Store, clock: Clock, now_ms: int) -> tuple[int, bool]:
        """Examine up to `batch` records in one transaction and expire the due ones;
        returns (expired, the pass is finished)."""
        names = sorted(self.rules)
        if not names:
            return 0, True

        def fn(txn: WriteTxn) -> tuple[int, tuple[str, str] | None]:
            due: list[tuple[str, str, str]] = []  # (scope, c, k)
            start = self.position
            remaining = self.batch
            position: tuple[str, str] | None = None
            for c in names:
                if start is not None and c < start[0]:
                    continue
                after = start if start is not None and start[0] == c else None
                rows = txn.records_after(c, after, remaining)
                remaining -= len(rows)
                for _, k, raw in rows:
                    record = merge.from_json(raw)
                    if _due(self.rules[c], record, now_ms):
                        due.append((record.s, c, k))
                if remaining <= 0:
                    position = (rows[-1][0], rows[-1][1])
                    break
                start = None
            # Like a batch of changes: the scopes' locks first, in sorted order (several
            # servers over one PostgreSQL), then the records read again, current.
            txn.lock_scopes(sorted({scope for scope, _, _ in due}))
            expired = 0
            for _, c, k in due:
                current = txn.get_record(c, k)
                if current is not None and _expire(txn, self.catalog, clock, self.rules[c],
                                                   merge.from_json(current), now_ms):
                    expired += 1
            return expired, position

        expired, position = store.transact(fn)
        self.position = position
        self.expired_total += expired
        return expired, position is None


def _due(rule: RetentionRule, record: merge.RecordState, now_ms: int) -> bool:
    if record.deleted:
        return False  # a tombstone already: purged by merge.tombstone_retention_s
    latest = merge.latest_stamp(record)
    changed = latest.wall if latest is not None else 0
    return evictable(rule, record.values(), False, changed, now_ms, pending=False,
                     conflicted=False)


def _expire(txn: WriteTxn, catalog: Catalog, clock: Clock, rule: RetentionRule,
            record: merge.RecordState, now_ms: int) -> bool:
    if not _due(rule, record, now_ms):
        return False  # changed since it was read
    c, k = record.c, record.k
    latest = merge.latest_stamp(record)
    spec = catalog.collection(c)
    assert spec is not None
    stamp = clock.observe(latest) if latest is not None else clock.tick()
    q = txn.scope_seq(record.s) + 1
    change = Change(n=1, h=stamp.time_part(), c=c, k=k, s=record.s, b=record.q, op="del")
    out = merge.apply_change(record, change, SERVER_NODE, q, spec, stamp=stamp)
    if not out.applied or out.record is None:  # pragma: no cover - a delete always applies
        return False
    new = out.record
    data = merge.to_json(new)
    if txn.allocate_seq(record.s) != q:  # pragma: no cover - we hold the write lock
        raise RuntimeError("sequence moved inside the transaction")
    txn.put_record(c, k, data)
    txn.index_move(record.s, record.q, q, c, k)
    txn.put_tomb(Tomb(record.s, q, c, k, now_ms))
    for name in list(record.fields):
        for cid in txn.open_conflicts_on(c, k, name):
            txn.close_conflict(cid, now_ms, "record expired")
    delta = merge.delta_rec(out)
    if delta is not None:
        txn.add_notice(Notice(0, record.s, q, delta))
    return True


__all__ = ["Expiry"]
