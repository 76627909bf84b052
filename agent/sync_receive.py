"""The receiving side of syncing: acks, rejections, deltas, catch-up pages and
checkpoints applied to the store (`Sync` gets them from `Receiving`).

Every operation is ONE durable transaction and idempotent (PROTOCOL.md §9.3): applying
a message twice has the effect of applying it once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from agent import evicted, journal, txn_sync
from agent.base import BaseRecord, apply_ack_record, rec_state
from agent.changes import change_id
from agent.core import Core, Work
from agent.store import n_key, record_key, split_record_key
from schemas import codec, wire


@dataclass(frozen=True)
class AckResult:
    applied: list[int] = field(default_factory=list)
    """Change numbers acked now (dropped from the outbox)."""
    ignored: list[int] = field(default_factory=list)
    """Change numbers no longer in the outbox (duplicate acks)."""
    lost_writes: int = 0


@dataclass(frozen=True)
class RejectResult:
    dead: list[int] = field(default_factory=list)
    """Moved to the dead letters (permanent)."""
    transient: list[int] = field(default_factory=list)
    """Kept in the outbox, to be sent again later with backoff."""
    ignored: list[int] = field(default_factory=list)
    error: dict[str, str] | None = None
    """The message-level error (`err`), if any."""


@dataclass(frozen=True)
class CheckpointResult:
    complete: list[str] = field(default_factory=list)
    """Scopes whose checkpoint the device has reached."""
    behind: list[str] = field(default_factory=list)
    """Scopes the server says go further than the pages received (a page was lost):
    the daemon should send another `catchup`."""
    dropped: int = 0
    """Base records dropped by completed snapshots."""
    denied: list[str] = field(default_factory=list)


class Receiving:
    """What the daemon calls with each message it received (a mixin of `agent.sync.Sync`)."""

    _core: Core
    dev: str
    upgrade_needed: bool


    def apply_ack(self, ack: wire.Ack) -> AckResult:
        """Apply an ack (§7.4, §9.3): own changes to the base at their `q`, then the `fx`
        states; drop them from the outbox; recompute the views; advance checkpoints;
        record own lww writes that lost. Acks for `n` not in the outbox are ignored."""
        core = self._core
        restamped = frozenset(ack.rs)

        def run(work: Work) -> AckResult:
            applied: list[int] = []
            ignored: list[int] = []
            own: dict[bytes, list[tuple[dict[str, Any], int]]] = {}
            seqs: list[tuple[str, int]] = []
            kept = journal.Keeper(work, core.settings.journal)
            for n, scope, q in ack.ok:
                entry = work.outbox_entry(n)
                if entry is None:
                    ignored.append(n)
                    continue
                rk = work.remove_outbox(n, entry)
                kept.add(n, entry, scope, q)  # moved to the journal, same transaction
                own.setdefault(rk, []).append((entry["ch"], q))
                applied.append(n)
                seqs.append((scope, q))
            kept.close()
            fx: dict[bytes, list[Any]] = {}
            for rec in ack.fx:
                fx.setdefault(record_key(rec.c, rec.k), []).append(rec_state(rec))
            work.observe(_stamps(ack.fx))
            gen = work.gen()
            lost = 0
            for rk in {**own, **fx}:
                c, k = split_record_key(rk)
                old = work.load_base(rk, c, k)
                mine = own.get(rk, [])
                if len(mine) > 1:
                    mine.sort(key=_change_number)
                states = fx.get(rk, [])
                if old is None:
                    mark = evicted.marker(work.tx, rk)
                    if mark is not None and not mine:
                        states = list(evicted.admit(mark, states))
                        if not states:
                            continue  # stays evicted (agent.evicted)
                    if mark is not None:
                        work.tx.delete(evicted.DB, rk)
                new = apply_ack_record(old, mine, states, self.dev, restamped=restamped)
                if new is None:
                    continue
                new.g = gen
                work.save_base(rk, old, new)
                if mine and states:
                    lost += self._lost_writes(work, new, mine, states, restamped)
                work.refresh_view(rk, c, k, new)
                if rk in own:
                    work.feed(c, k, "synced",
                              {"change_ids": [change_id(self.dev, ch["n"]) for ch, _ in mine]})
                else:
                    work.feed(c, k, "remote")
            now = work.now()
            by_scope: dict[str, list[int]] = {}
            for scope, q in seqs:
                if q > 0 and scope in core.scopes:
                    by_scope.setdefault(scope, []).append(q)
            for scope, qs in by_scope.items():
                work.set_checkpoint(scope, work.checkpoint(scope).mark_all(qs, now))
            if applied:
                journal.note_settled(work)  # a restore's replay acked again: when
                work.tx.set_meta("last_sync", now)
                if not self.upgrade_needed:  # a problem the server reported is over
                    work.tx.delete("meta", b"last_err")
            if restamped & set(applied):
                work.tx.set_meta("last_err", {
                    "code": "clock_skew", "t": now,
                    "reason": f"the server re-stamped {len(restamped & set(applied))} "
                              "change(s) whose clock was too far ahead: check this "
                              "device's time sync"})
            if lost:
                work.prune_lost()
            return AckResult(applied, ignored, lost)

        return core.write(run, durable=False)

    def _lost_writes(self, work: Work, new: BaseRecord, mine: list[tuple[dict[str, Any], int]],
                     fx: list[Any], restamped: frozenset[int]) -> int:
        """Record own lww writes that the ack's fx states show lost: the field is in an
        fx state (or a whole one covers it) and its stamp is not the change's stamp."""
        if not mine or not fx:
            return 0
        spec = self._core.spec(new.c)
        listed: set[str] = set()
        whole_from = min((rec.q for rec in fx if not rec.part), default=None)
        for rec in fx:
            listed.update(rec.f)
        count = 0
        own_node = f":{self.dev}"
        for ch, q in mine:
            if ch["n"] in restamped or ch["op"] != "put":
                continue
            stamp = f"{ch['h']}:{self.dev}"
            covered = whole_from is not None and whole_from >= q
            for name, value in (ch.get("f") or {}).items():
                fspec = spec.fields.get(name) if spec is not None else None
                if fspec is not None and fspec.strategy != "lww":
                    continue
                winner = new.h.get(name)
                if not (covered or name in listed) or winner == stamp:
                    continue
                if winner is not None and winner.endswith(own_node):
                    # This device's own later write stands: one device's writes are
                    # never concurrent (§5), so this one was superseded, not lost.
                    continue
                if name in new.f and orjson.dumps(new.f[name]) == orjson.dumps(value):
                    continue  # the value that stands is the one written: nothing lost
                work.record_lost_write(ch["n"], name, {
                    "kind": "lost", "id": f"{self.dev}:{ch['n']}", "c": new.c, "k": new.k,
                    "s": new.s, "field": name, "value": new.f.get(name), "h": new.h.get(name),
                    "candidates": [{"v": value, "by": self.dev, "h": stamp}], "q": q,
                    "t": work.now()})
                count += 1
        return count

    def apply_reject(self, reject: wire.Reject,
                     retry_in_s: Mapping[int, float] | None = None) -> RejectResult:
        """Apply a reject (§7.5): permanent -> dead letters, out of the outbox, view
        rolled back (with `rec` applied to the base when present); transient -> kept,
        attempt count and last error updated. `retry_in_s`: change number -> the
        daemon's backoff before it sends that change again; the last error then says
        when (`retry_at`, ms), so `agent status` can tell the next try."""
        core = self._core

        def run(work: Work) -> RejectResult:
            dead: list[int] = []
            transient: list[int] = []
            ignored: list[int] = []
            reused: list[int] = []
            recs = [rj.rec for rj in reject.rj if rj.rec is not None]
            work.observe(_stamps(recs))
            bases = work.apply_recs(recs, "remote") if recs else {}
            now = work.now()
            for rj in txn_sync.with_transactions(work, reject.rj, self.dev):
                entry = work.outbox_entry(rj.n)
                if entry is None:
                    ignored.append(rj.n)
                    continue
                if not rj.perm:
                    entry["at"] += 1
                    entry["err"] = f"{rj.code}: {rj.reason}"
                    entry["et"] = now
                    work.tx.put("outbox", n_key(rj.n), entry)
                    transient.append(rj.n)
                    # `agent status` shows why changes wait (e.g. device_disabled: "...
                    # `waystation device enable van-1`"), until the next ack clears it.
                    last: dict[str, Any] = {"code": rj.code, "reason": rj.reason, "t": now}
                    delay = None if retry_in_s is None else retry_in_s.get(rj.n)
                    if delay is not None:
                        last["retry_at"] = now + round(delay * 1000)
                    work.tx.set_meta("last_err", last)
                    continue
                work.tx.put("deadletters", n_key(rj.n), {
                    "n": rj.n, "code": rj.code, "reason": rj.reason, "t": now, "entry": entry})
                if rj.code == codec.ID_REUSED and entry.get("i") == work.incarnation():
                    reused.append(rj.n)
                rk = work.remove_outbox(rj.n, entry)
                c, k = entry["ch"]["c"], entry["ch"]["k"]
                base = bases[rk] if rk in bases else work.load_base(rk, c, k)
                view = work.refresh_view(rk, c, k, base)
                event: dict[str, Any] = {
                    "change_ids": [change_id(self.dev, rj.n)], "code": rj.code,
                    "reason": rj.reason, "fields": None if view is None or view.x
                    else view.fields}
                if entry.get("x"):
                    event["transaction"] = change_id(self.dev, entry["x"][0])
                work.feed(c, k, "rejected", event)
                dead.append(rj.n)
            if dead:
                journal.note_settled(work)  # refused for good: out of the outbox too
            error = None
            if reused:
                # The server holds other content under this incarnation's change ids:
                # this store was restored from a backup or copied. What it writes from
                # now on gets ids of a new incarnation; the refused changes stay in the
                # dead letters, for a person to retry (as new changes) or discard.
                inc = work.new_incarnation()
                error = {"code": codec.ID_REUSED, "reason": (
                    f"the server already applied other content under {len(reused)} of this "
                    "store's change ids (the store was restored from a backup or copied); "
                    f"new writes now use incarnation {inc}: retry the refused changes with "
                    "`waystation agent deadletters retry N` or discard them")}
                work.tx.set_meta("last_err", {**error, "t": now})
            if reject.err is not None:
                error = {"code": reject.err.code, "reason": reject.err.reason}
                if reject.err.code != codec.DICTIONARY_UNKNOWN:  # not a problem: resent
                    work.tx.set_meta("last_err", {**error, "t": now})
            return RejectResult(dead, transient, ignored, error)

        return core.write(run, durable=False)

    def apply_delta(self, delta: wire.Delta) -> int:
        """Apply others' live changes (§7.6); returns the number of records touched."""
        core = self._core

        def run(work: Work) -> int:
            work.observe(_stamps(delta.d))
            touched = work.apply_recs(delta.d, "remote")
            now = work.now()
            by_scope: dict[str, list[int]] = {}
            for rec in delta.d:
                if rec.q > 0 and rec.s in core.scopes:
                    by_scope.setdefault(rec.s, []).append(rec.q)
            for scope, qs in by_scope.items():
                work.set_checkpoint(scope, work.checkpoint(scope).mark_all(qs, now))
            if touched:
                work.tx.set_meta("last_sync", now)  # data from the server: in sync now
            return len(touched)

        return core.write(run, durable=False)

    def apply_page(self, page: wire.Page) -> int:
        """Apply one catch-up page (§7.7, §9.5); returns the number of records touched.

        `reset: true` starts a snapshot of the scope: a new generation is recorded on
        every base record touched from now on, and the `checkpoint` completing the
        catch-up drops the scope's records left untouched. A repeated reset page of the
        snapshot in progress (same request) does not start another one.
        """
        core = self._core

        def run(work: Work) -> int:
            scope = page.s
            followed = scope in core.scopes
            now = work.now()
            cp = work.checkpoint(scope) if followed else None
            if cp is not None and page.reset and not (cp.snapshot and cp.snap_req == page.req):
                cp = cp.start_snapshot(page.to, work.bump_gen(), page.req, now)
            work.observe(_stamps(page.recs))
            touched = work.apply_recs(page.recs, "remote")
            if cp is not None:
                work.set_checkpoint(scope, cp.page(page.from_, page.to, now))
            if touched:
                work.tx.set_meta("last_sync", now)
            return len(touched)

        return core.write(run, durable=False)

    def apply_checkpoint(self, msg: wire.Checkpoint) -> CheckpointResult:
        """Catch-up complete (§7.8). A scope is complete when the device's checkpoint has
        reached the one in the message; a snapshot of a complete scope ends by dropping
        the base records no page, delta or ack touched since its reset (§9.5)."""
        core = self._core

        def run(work: Work) -> CheckpointResult:
            now = work.now()
            creq = work.tx.meta("creq")
            complete: list[str] = []
            behind: list[str] = []
            dropped = 0
            for scope, value in msg.cp.items():
                if scope not in core.scopes:
                    continue
                cp = work.checkpoint(scope).complete(value, now)
                if cp.cp < value:
                    behind.append(scope)
                else:
                    complete.append(scope)
                    if cp.snapshot and msg.req in (cp.snap_req, creq):
                        assert cp.snap_gen is not None
                        dropped += _sweep(work, scope, cp.snap_gen)
                        cp = cp.end_snapshot()
                work.set_checkpoint(scope, cp)
            denied = [s for s in msg.denied if s in core.scopes]
            work.tx.set_meta("denied", denied)
            if not behind:
                work.tx.set_meta("last_sync", now)
                if not self.upgrade_needed:  # "upgrade needed" lasts until the upgrade
                    work.tx.delete("meta", b"last_err")
            return CheckpointResult(complete, behind, dropped, denied)

        return core.write(run, durable=False)


def _change_number(item: tuple[dict[str, Any], int]) -> int:
    n: int = item[0]["n"]
    return n


def _stamps(recs: Iterable[wire.Rec]) -> list[str]:
    out: list[str] = []
    for rec in recs:
        out.extend(rec.h.values())
        if rec.xh:
            out.append(rec.xh)
    return out


def _sweep(work: Work, scope: str, gen: int) -> int:
    """Drop the scope's base records not touched since snapshot generation `gen`."""
    stale: list[tuple[bytes, dict[str, Any]]] = []
    for rk, doc in work.tx.items("base"):
        if doc["s"] == scope and doc["g"] < gen:
            stale.append((rk, doc))
    for rk, _ in stale:
        c, k = split_record_key(rk)
        old = work.load_base(rk, c, k)
        work.save_base(rk, old, None)
        work.refresh_view(rk, c, k, None)
        work.feed(c, k, "dropped")
    # Eviction markers of records the snapshot did not list: gone from the server.
    gone = [rk for rk, mark in work.tx.items(evicted.DB)
            if mark.get("s") == scope and int(mark.get("g", 0)) < gen]
    for rk in gone:
        work.tx.delete(evicted.DB, rk)
    return len(stale)


__all__ = ["AckResult", "CheckpointResult", "Receiving", "RejectResult"]
