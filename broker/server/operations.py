"""Operator actions on the authoritative store: resolving conflicts, purging tombstones.

Both run in one store transaction and may run in another process than the server (the
CLI). A resolution is a normal write: it allocates the scope's next sequence, stores
the record, closes the field's open conflicts and queues a *notice* carrying the new
record state; the running server's `Engine.tick()` sends it as a `delta` to every
online device of the scope. Devices that miss it get it by catch-up (they see a gap in
their sequence, or reconnect), as with any other change.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

import orjson

from broker.errors import ConflictClosed, ConflictNotFound, InvalidArgument
from broker.server.applier import RECORD_LIMIT
from broker.server.store.base import CommandRow, Notice, Store, WriteTxn
from schemas.collection import Catalog
from waystation import merge
from waystation.hlc import Clock


@dataclass(frozen=True, slots=True)
class Resolution:
    """A conflict settled by the operator: the record's new version."""

    conflict_id: int
    c: str
    k: str
    s: str
    field: str
    q: int
    value: Any
    closed: tuple[int, ...]
    """Every conflict id closed by it (all open conflicts of that field)."""


def resolve_conflict(store: Store, catalog: Catalog, clock: Clock, cid: int, value: Any,
                     now_ms: int) -> Resolution:
    """Settle open conflict `cid` by writing `value` to its field (see module docstring)."""
    def fn(txn: WriteTxn) -> Resolution:
        row = txn.get_conflict(cid)
        if row is None:
            raise ConflictNotFound(f"no conflict with id {cid} (see `waystation server "
                                   "conflicts`)")
        if not row.open:
            raise ConflictClosed(f"conflict {cid} was already resolved ({row.resolution})")
        raw = txn.get_record(row.c, row.k)
        if raw is None:
            txn.close_conflict(cid, now_ms, "record purged")
            raise ConflictClosed(f"conflict {cid}: record {row.c}/{row.k} no longer exists")
        record = merge.from_json(raw)
        spec = catalog.collection(row.c)
        if spec is None:
            raise InvalidArgument(f"conflict {cid}: collection {row.c!r} is not in the "
                                  "server's schema any more")
        latest = merge.latest_stamp(record)
        stamp = clock.observe(latest) if latest is not None else clock.tick()
        q = txn.scope_seq(record.s) + 1
        out = merge.resolve(record, row.field, value, q, stamp, spec=spec)
        if not out.applied or out.record is None:
            code, reason = out.rejection or ("invalid", "refused")
            if code == "invalid":  # nothing open any more (a device settled it)
                for other in txn.open_conflicts_on(row.c, row.k, row.field):
                    txn.close_conflict(other, now_ms, "already settled")
                raise ConflictClosed(f"conflict {cid}: {reason}")
            raise InvalidArgument(f"conflict {cid}: cannot write {value!r}: {reason}")
        new = out.record
        size = len(orjson.dumps(merge.to_rec(new)))
        if size > RECORD_LIMIT:
            raise InvalidArgument(f"conflict {cid}: the record would be {size} bytes, over "
                                  f"the limit of {RECORD_LIMIT}")
        if txn.allocate_seq(new.s) != q:  # pragma: no cover - we hold the write lock
            raise RuntimeError("sequence moved inside the transaction")
        txn.put_record(new.c, new.k, merge.to_json(new))
        txn.index_move(new.s, record.q, q, new.c, new.k)
        closed = tuple(txn.open_conflicts_on(row.c, row.k, row.field))
        for other in closed:
            txn.close_conflict(other, now_ms, "operator")
        delta = merge.delta_rec(out)
        assert delta is not None
        txn.add_notice(Notice(0, new.s, q, delta))
        return Resolution(cid, new.c, new.k, new.s, row.field, q, value, closed)

    return store.transact(fn)


RESTORE_SEQ_GAP = 1_000_000_000_000
"""How far a restore moves every scope's sequence (and purge horizon) forward: further
than any fleet writes between a backup and its restore, and small enough for thousands
of restores below the protocol's 2^53 limit on sequence numbers."""


def after_restore(store: Store, now_ms: int | None = None, *,
                  resync: bool = True) -> dict[str, int]:
    """Make a store restored from a backup safe to serve: move every scope's sequence and
    purge horizon forward by `RESTORE_SEQ_GAP`, and (with `resync`) order every
    registered device to resync (a `resync` command, PROTOCOL.md §7.9) carrying, per
    scope the device may use, the sequence the restored store had reached (`seqs`):
    the device gives back the acked changes it journaled above it (§9.7). Returns
    scope -> new sequence.

    Devices have seen sequence numbers the backup never reached; without the jump the
    restored server would hand those numbers to other changes and a device would skip
    them as already seen. With it every device's checkpoint is below the purge horizon,
    so its next catch-up is a snapshot of the restored state (its pending writes are
    kept and sent on top). The resync command makes that catch-up happen at once: the
    restarted server sends it to every online device at its first tick (to the others
    at their next hello), instead of waiting until a device writes or notices a gap,
    all the while showing records the server no longer has."""
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms

    def jump(txn: WriteTxn) -> dict[str, int]:
        out: dict[str, int] = {}
        restored = txn.scope_seqs()
        registered = txn.devices()
        # A scope whose first record came after the backup is not in `restored`, yet
        # devices may hold checkpoints in it: it jumps too, or its new numbers would
        # start again below what they have seen.
        scopes = {*restored, *(s for device in registered for s in device.scopes)}
        for scope in sorted(scopes):
            new = restored.get(scope, 0) + RESTORE_SEQ_GAP
            txn.jump_scope_seq(scope, new)
            txn.set_purge_horizon(scope, new)
            out[scope] = new
        devices = registered if resync else []
        for device in devices:
            txn.put_command(CommandRow(f"resync-{now:x}-{secrets.token_hex(3)}", device.id,
                                       "resync", restore_args(restored, device.scopes),
                                       created_ms=now))
        if devices:
            txn.bump_registry()  # a running server (PostgreSQL --in-place) sends them
        # The backup recorded its servers as running: without this, `server status` on
        # the restored store (no server started yet) says "running" for 30 s, then
        # "crashed?"; a server that starts on it records itself again at once.
        for row in txn.servers():
            if not row.stopped_ms:
                txn.put_server(replace(row, stopped_ms=row.seen_ms))
        return out

    return store.transact(jump)


def restore_args(restored: dict[str, int], scopes: tuple[str, ...]) -> dict[str, Any]:
    """A restore's `resync` args for a device of `scopes`: what the restored store had
    reached in each (0: nothing), before the jump (PROTOCOL.md §7.9, §9.7)."""
    return {"why": "restore", "seqs": {s: restored.get(s, 0) for s in scopes}}


def purge_tombstones(store: Store, now_ms: int, retention_ms: int, limit: int = 10_000) -> int:
    """Drop deleted records older than the retention; returns how many.

    Each purge raises the scope's purge horizon to the tombstone's q, so a device whose
    checkpoint is below it gets a snapshot at its next catch-up (it may have missed the
    delete).
    """
    cutoff = now_ms - retention_ms

    def fn(txn: WriteTxn) -> int:
        purged = 0
        for scope in txn.scope_seqs():
            horizon = old = txn.purge_horizon(scope)
            for tomb in txn.tombs(scope, limit - purged):
                if tomb.t_ms > cutoff:
                    break
                txn.delete_tomb(scope, tomb.q)
                raw = txn.get_record(tomb.c, tomb.k)
                record = None if raw is None else merge.from_json(raw)
                if record is None or record.q != tomb.q or not record.deleted:
                    continue  # a stale entry
                txn.delete_record(tomb.c, tomb.k)
                txn.index_delete(scope, tomb.q)
                horizon = max(horizon, tomb.q)
                purged += 1
            if horizon > old:
                txn.set_purge_horizon(scope, horizon)
            if purged >= limit:
                break
        return purged

    return store.transact(fn)


__all__ = ["RESTORE_SEQ_GAP", "Resolution", "after_restore", "purge_tombstones",
           "resolve_conflict", "restore_args"]
