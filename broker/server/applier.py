"""The per-change algorithm of the merge consumer, written once against `WriteTxn`.

For each change of a batch, inside the caller's write transaction (PROTOCOL.md §10):

1. a change id seen before — in the same incarnation of the device's store — is
   answered with its remembered outcome (§10.2): the original (scope, q) plus the whole
   current record, or the same permanent rejection; unless its content differs from
   what was remembered (the digest), which is refused with `id_reused` (and not
   remembered: the id keeps its first outcome);
2. checks: the scope is one of the device's (`scope_denied`), the collection exists
   (`unknown_collection`), the batch's schema version is not newer than the server's
   (transient `schema_version`), the stamp is not too far ahead (re-stamped with the
   server clock, or `clock_skew`, per configuration);
3. `merge.apply_change` (field, type, strategy and scope checks, rules, the merge);
4. the merged record must fit the record limit (`record_too_large`);
5. then, and only then, the writes: the scope's next sequence, the record, the index
   entry of its newest version, its tombstone, conflict-log entries, conflicts the
   change closed, and the change's outcome.

Everything that can fail on bad input runs before the first write of a change, so a
refused or crashing change leaves nothing behind, allocates no sequence, and does not
disturb the other changes of the transaction. A rejected change allocates nothing;
permanent rejections are remembered, transient ones are not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from broker.server.caps import SCHEMA, SCHEMA_PUSH
from broker.server.identity import change_digest, entry_digest, outcome_ns, store_tag_base
from broker.server.store.base import ConflictRow, DeviceRow, OutcomeRow, Tomb, WriteTxn
from broker.server.upcast import SchemaChain
from schemas import codec
from schemas.codec import BadChange
from schemas.collection import Catalog
from schemas.errors import MigrationError
from schemas.wire import Change
from waystation import merge
from waystation.config import MergeConfig
from waystation.hlc import Clock, Stamp
from waystation.rules import Rule

log = structlog.get_logger(__name__)

RECORD_LIMIT = 64 * 1024
"""Largest record, as a whole wire record state (PROTOCOL.md §3)."""

_Key = tuple[str, str]


@dataclass(slots=True)
class ChangeResult:
    """What became of one change: acked (`code` empty) or refused."""

    n: int
    scope: str = ""
    q: int = 0
    code: str = ""
    reason: str = ""
    perm: bool = True
    rec: dict[str, Any] | None = None
    """Refused: the record's current whole state, when the device may see it."""
    fx: dict[str, Any] | None = None
    """Acked: the record state the device could not know (§7.4)."""
    delta: dict[str, Any] | None = None
    """Newly applied: the state other devices of the scope get (§7.6); None when nobody
    would receive it."""
    restamped: int = 0
    """Newly applied with a server stamp: how many ms the device's stamp was ahead."""
    duplicate: bool = False
    expected: bool = False
    """Refused as the protocol foresees (a too-old device's change, held until its
    upgrade): no dead letter for the operator."""

    @property
    def ok(self) -> bool:
        return not self.code


@dataclass(frozen=True, slots=True)
class Refusal:
    """A permanent refusal found while planning a change (not yet remembered)."""

    code: str
    reason: str
    show: bool = True
    """Send the record's current state with the rejection (the device may see it)."""


@dataclass(frozen=True, slots=True)
class Planned:
    """A change that passed every check: what `TxnApplier.write` will store."""

    ch: Change
    dev: str
    record: merge.RecordState | None
    new: merge.RecordState
    q: int
    data: bytes
    fx: dict[str, Any] | None
    delta: dict[str, Any] | None
    conflicts: list[ConflictRow]
    resolved: tuple[str, ...]
    restamped: int


@dataclass(slots=True)
class BatchStats:
    """Counters of one transaction, for metrics and logs."""

    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    transient: int = 0
    conflicts: int = 0
    reused: int = 0
    scopes: set[str] = field(default_factory=set)


class Applier:
    """Applies change batches inside a store transaction (see module docstring)."""

    def __init__(self, catalog: Catalog, config: MergeConfig, clock: Clock,
                 now_ms: Callable[[], int], rules: Sequence[Rule] = ()) -> None:
        self.catalog = catalog
        self.config = config
        self.clock = clock
        self.now_ms = now_ms
        self.rules = tuple(rules)
        self.chain: SchemaChain | None = None
        """The live schema history, to upcast changes written under older versions."""
        self.withdrawn: frozenset[int] = frozenset()
        """Rolled-back versions: a change written under one waits on its device, which
        is told to go back down and sends it again in the older names."""

    def begin(self, txn: WriteTxn,
              wants_delta: Callable[[str, str], bool] | None = None) -> TxnApplier:
        """The applier of one write transaction (it caches decoded records).

        `wants_delta(scope, dev)` says whether anyone would receive the delta of a change
        by `dev` in `scope` (default: always); when it says no, none is built.
        """
        return TxnApplier(self, txn, wants_delta)


class TxnApplier:
    """Applies changes within one write transaction."""

    def __init__(self, applier: Applier, txn: WriteTxn,
                 wants_delta: Callable[[str, str], bool] | None = None) -> None:
        self.a = applier
        self.txn = txn
        self.wants_delta = wants_delta
        self.version = applier.catalog.version
        self.max_skew = applier.config.max_skew_ms
        self.rules = applier.rules
        self.now = applier.now_ms()
        self.stats = BatchStats()
        self.tag_base = 0
        """Of the batch being applied: its set adds' tags (`store_tag_base`)."""
        self._records: dict[_Key, merge.RecordState | None] = {}

    def _lookup(self, c: str, k: str) -> Callable[[str], Any]:
        """The current value of a field of record (c, k), for a merge migration."""
        def value(name: str) -> Any:
            record = self._load((c, k))
            return None if record is None else record.value(name)
        return value

    # --- entry points

    def apply_batch(self, device: DeviceRow, sv: int, changes: Sequence[Change],
                    bad: Sequence[BadChange] = (), inc: str | None = None
                    ) -> list[ChangeResult]:
        """Apply one device's batch, written in store incarnation `inc` (None: the
        legacy one); one result per change (bad entries with a number too)."""
        ns = outcome_ns(device.id, inc)
        self.tag_base = store_tag_base(device, inc)
        scopes = {ch.s for ch in changes if ch.s in device.scopes}
        if scopes:  # in a fixed order, before reading (see WriteTxn.lock_scopes)
            self.txn.lock_scopes(sorted(scopes))
        if changes:
            known = self._records
            # Generators: a backend without round trips (LMDB) never iterates them.
            self.txn.prefetch(ns, (ch.n for ch in changes),
                              ((ch.c, ch.k) for ch in changes if (ch.c, ch.k) not in known))
        if any(ch.tx is not None for ch in changes):
            # Transactions (§7.2.1): all or none each; an entry that is not a valid change
            # is answered after the valid ones (its transaction, if any, lacks a member
            # and is refused whole).
            from broker.server.txn_apply import apply_changes  # it builds on this module

            done = apply_changes(self, device, sv, changes, ns, len(bad))
            return done + [self._invalid(device, ns, entry) for entry in bad
                           if entry.n is not None]
        if not bad:
            return [self.apply_one(device, sv, ch, ns) for ch in changes]
        # In batch order, so that a change number sent twice in one batch is judged
        # against its first occurrence even when that one is the invalid entry (§10.2).
        bad_at = {entry.index: entry for entry in bad}
        valid = iter(changes)
        results: list[ChangeResult] = []
        for index in range(len(changes) + len(bad)):
            entry = bad_at.get(index)
            if entry is None:
                results.append(self.apply_one(device, sv, next(valid), ns))
            elif entry.n is not None:
                results.append(self._invalid(device, ns, entry))
        return results

    def apply_one(self, device: DeviceRow, sv: int, ch: Change,
                  ns: str | None = None) -> ChangeResult:
        """Apply one change of outcome namespace `ns` (default: the device's legacy
        one); never raises for bad input (a bug becomes `server_error`)."""
        ns = device.id if ns is None else ns
        digest = change_digest(ch)
        prior = self.txn.get_outcome(ns, ch.n)
        if prior is not None:
            if prior.d and prior.d != digest:
                return self._reused(device, ch, ch.n)
            return self._repeat(device, ch.n, prior)
        plan = self.plan(device, sv, ch)
        if isinstance(plan, Refusal):
            return self._refuse(device, ns, ch, digest, plan.code, plan.reason,
                                show=plan.show)
        if isinstance(plan, ChangeResult):
            return plan
        return self.write(plan, ns, digest)

    def plan(self, device: DeviceRow, sv: int, ch: Change,
             bump: dict[str, int] | None = None) -> Planned | Refusal | ChangeResult:
        """Everything of a new change that can fail, without writing anything: the
        checks, the merge, the record limit. A permanent refusal comes back as a
        `Refusal` (the caller remembers it), a transient one as a `ChangeResult`.
        `bump` counts changes planned but not yet written per scope (a transaction's
        earlier changes), so that `q` is where this change will land."""
        dev = device.id
        if ch.s not in device.scopes:
            return Refusal(codec.SCOPE_DENIED, f"device {dev!r} may not write scope "
                                               f"{ch.s!r}", show=False)
        spec = self.a.catalog.collections.get(ch.c)
        if spec is None:
            return Refusal(codec.UNKNOWN_COLLECTION,
                           f"no collection {ch.c!r} in the server's schema "
                           f"(version {self.version})", show=False)
        if sv > self.version:
            self.stats.transient += 1
            # A rolled-back version, to a device that takes versions from the server:
            # expected (it is told to go back down, §7.13), no dead letter. One running a
            # hand-installed file keeps the dead letter: its operator has to act.
            return ChangeResult(ch.n, code=codec.SCHEMA_VERSION, perm=False,
                                expected=sv in self.a.withdrawn and SCHEMA_PUSH in device.caps,
                                reason=f"written under schema version {sv}; the server runs "
                                       f"version {self.version}: retry later")
        chain = self.a.chain
        oldest = chain.oldest if chain is not None else None
        if oldest is not None and sv < oldest and SCHEMA in device.caps:
            # The device was told `sv_min` in its welcome: it waits for its upgrade and
            # sends these again afterwards (transient: kept in its outbox).
            self.stats.transient += 1
            return ChangeResult(ch.n, code=codec.SCHEMA_VERSION, perm=False, expected=True,
                                reason=f"upgrade needed: written under schema version {sv}, "
                                       f"older than the oldest this server serves ({oldest})")
        if sv < self.version and chain is not None and ch.op == "put":
            # The caller's digest is of the change as the device wrote it, so a resend
            # of the same change is still recognised after the upcast.
            try:
                ch = chain.upcast(ch, sv, self._lookup(ch.c, ch.k))
            except MigrationError as exc:
                return Refusal(codec.TYPE_MISMATCH, f"written under schema version {sv}: {exc}")
        stamp: Stamp | None = None
        c, k, scope = ch.c, ch.k, ch.s
        key = (c, k)
        ahead = int(ch.h[:12], 16) - self.now
        try:
            record = self._load(key)
            if ahead > self.max_skew:
                if self.a.config.skew_policy == "reject":
                    # §10.1 order: fields, types and scope are judged before the stamp
                    code, reason = merge.check_change(record, ch, spec) or (
                        codec.CLOCK_SKEW,
                        f"stamp is {ahead / 1000:.0f} s ahead of the server's clock (limit "
                        f"{self.max_skew / 1000:.0f} s): fix the device's time sync")
                    return Refusal(code, reason)
                tick = self.a.clock.tick()
                stamp = Stamp(tick.wall, tick.counter, dev)
            q = self.txn.scope_seq(scope) + 1 + (bump.get(scope, 0) if bump else 0)
            out = merge.apply_change(record, ch, dev, q, spec, stamp=stamp, rules=self.rules,
                                     tag_base=self.tag_base)
            if not out.applied:
                code, reason = out.rejection or (codec.INVALID, "refused")
                return Refusal(code, reason)
            new = out.record
            assert new is not None and new.s == scope
            data = orjson.dumps(merge.to_json(new))
            whole_size = self._wire_size(new, data)
            if whole_size > RECORD_LIMIT:
                return Refusal(codec.RECORD_TOO_LARGE,
                               f"{c}/{k}: the record would be {whole_size} bytes, "
                               f"over the limit of {RECORD_LIMIT}: store less in it")
            if stamp is not None:  # re-stamped: the device must learn the stamps used
                fx = (merge.to_rec(new) if out.whole else
                      merge.to_rec(new, sorted(out.changed | out.fixups), part=True))
            elif record is None and not out.fixups and not out.fix_deleted:
                fx = None  # a new record is exactly what its writer wrote: no echo
            else:
                fx = merge.fx_rec(out)
            wants = self.wants_delta
            delta = merge.delta_rec(out) if wants is None or wants(scope, dev) else None
            conflicts = [ConflictRow(0, self.now, e.c, e.k, e.s, e.field, e.to_json(), e.open)
                         for e in out.conflicts] if out.conflicts else []
        except Exception:
            log.exception("change_failed", dev=dev, n=ch.n, c=c, k=k)
            self._records.pop(key, None)
            self.stats.transient += 1
            return ChangeResult(ch.n, code=codec.SERVER_ERROR, perm=False,
                                reason="the server failed to apply this change; it will be "
                                       "retried")
        return Planned(ch, dev, record, new, q, data, fx, delta, conflicts,
                       tuple(out.resolved), ahead if stamp is not None else 0)

    def write(self, p: Planned, ns: str, digest: str) -> ChangeResult:
        """The writes of a planned change (store primitives only)."""
        txn = self.txn
        ch, record, new, q = p.ch, p.record, p.new, p.q
        c, k, scope = ch.c, ch.k, ch.s
        if txn.allocate_seq(scope) != q:  # pragma: no cover - the only writer is this txn
            raise RuntimeError(f"sequence of {scope!r} moved inside the transaction")
        txn.put_record(c, k, p.data)
        self._records[(c, k)] = new
        if record is None:
            txn.index_move(scope, 0, q, c, k)
        else:
            txn.index_move(scope, record.q, q, c, k)
            if record.xh is not None and record.deleted:
                txn.delete_tomb(scope, record.q)
        if new.xh is not None and new.deleted:
            txn.put_tomb(Tomb(scope, q, c, k, self.now))
        stats = self.stats
        if p.conflicts:
            for row in p.conflicts:
                txn.add_conflict(row)
            stats.conflicts += len(p.conflicts)
        for fname in p.resolved:
            for cid in txn.open_conflicts_on(c, k, fname):
                txn.close_conflict(cid, self.now, f"device {p.dev} change {ch.n}")
        txn.put_outcome(ns, ch.n, OutcomeRow(c, k, scope=scope, q=q, d=digest))
        stats.applied += 1
        stats.scopes.add(scope)
        return ChangeResult(ch.n, scope=scope, q=q, fx=p.fx, delta=p.delta,
                            restamped=p.restamped)

    # --- helpers

    def _load(self, key: _Key) -> merge.RecordState | None:
        try:
            return self._records[key]
        except KeyError:
            pass
        raw = self.txn.get_record(*key)
        record = None if raw is None else merge.from_json(raw)
        self._records[key] = record
        return record

    def whole(self, device: DeviceRow, c: str, k: str) -> dict[str, Any] | None:
        """The record's whole state if it exists and the device may read its scope."""
        try:
            record = self._load((c, k))
        except ValueError:
            log.exception("record_unreadable", c=c, k=k)
            return None
        if record is None or record.s not in device.scopes:
            return None
        return merge.to_rec(record)

    @staticmethod
    def _wire_size(record: merge.RecordState, data: bytes) -> int:
        stored = len(data)
        if stored <= RECORD_LIMIT // 2:
            return stored  # the wire state is never twice the stored form
        return len(orjson.dumps(merge.to_rec(record)))

    def _repeat(self, device: DeviceRow, n: int, prior: OutcomeRow) -> ChangeResult:
        self.stats.duplicates += 1
        rec = self.whole(device, prior.c, prior.k)
        if prior.applied:
            return ChangeResult(n, scope=prior.scope, q=prior.q, fx=rec, duplicate=True)
        return ChangeResult(n, code=prior.code, reason=prior.reason, rec=rec, duplicate=True)

    def _refuse(self, device: DeviceRow, ns: str, ch: Change, digest: str, code: str,
                reason: str, *, show: bool = True) -> ChangeResult:
        """A permanent rejection: remembered, so a resend is refused identically."""
        self.stats.rejected += 1
        self.txn.put_outcome(ns, ch.n, OutcomeRow(ch.c, ch.k, code=code, reason=reason,
                                                  d=digest))
        rec = self.whole(device, ch.c, ch.k) if show else None
        return ChangeResult(ch.n, code=code, reason=reason, rec=rec)

    def _reused(self, device: DeviceRow, ch: Change | None, n: int) -> ChangeResult:
        """A change id already used for other content in this incarnation: refused
        loudly, and not remembered (the id keeps the outcome of its first content).
        `ch` is None for an entry that is not a valid change (no record to show)."""
        self.stats.rejected += 1
        self.stats.reused += 1
        log.warning("change_id_reused", dev=device.id, n=n, c=ch.c if ch else None,
                    k=ch.k if ch else None)
        return ChangeResult(n, code=codec.ID_REUSED, reason=(
            f"change {device.id}:{n} was already applied (or refused) with other "
            "content: this device's store re-uses change ids (restored from a backup or "
            "copied); the change was not applied"),
            rec=self.whole(device, ch.c, ch.k) if ch else None)

    def _invalid(self, device: DeviceRow, ns: str, entry: BadChange) -> ChangeResult:
        """An entry that is not a valid change but has a number: refused `invalid` and
        remembered with a digest of the entry, so that the number sent again with other
        content — valid or not — is `id_reused` like any other (§10.2), and a valid
        change's number is never acked for an invalid entry."""
        assert entry.n is not None
        n, reason, digest = entry.n, entry.error.reason, entry_digest(entry.raw)
        prior = self.txn.get_outcome(ns, n)
        if prior is not None:
            if prior.d and prior.d != digest:
                return self._reused(device, None, n)
            return self._repeat(device, n, prior)
        self.stats.rejected += 1
        self.txn.put_outcome(ns, n, OutcomeRow("", "", code=codec.INVALID, reason=reason,
                                               d=digest))
        return ChangeResult(n, code=codec.INVALID, reason=reason)


__all__ = ["RECORD_LIMIT", "Applier", "BatchStats", "ChangeResult", "Planned", "Refusal",
           "TxnApplier"]
