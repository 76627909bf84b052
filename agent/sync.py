"""The storage side of syncing: what the daemon calls when it sends and receives.

No network code: the MQTT daemon decodes messages into `schemas.wire` models and hands
them here, and publishes what these operations return. Every operation is ONE durable
transaction (data and the checkpoints covering it commit together, §9.4) and idempotent:
applying a message twice has the effect of applying it once (§9.3), so the daemon may
apply whatever the broker delivers, duplicates and reorderings included.

Drain order (§9.2): higher `priority` first, then lower `n`.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import orjson

from agent import scopes
from agent.base import BaseRecord, apply_ack_record, rec_state
from agent.caps import AGENT_CAPS
from agent.changes import change_id
from agent.connectivity import LinkState, classify
from agent.core import MAX_COMMAND_IDS, Core, Work
from agent.status import record_online
from agent.store import n_key, record_key, split_record_key
from schemas import codec, wire

_ENVELOPE_BYTES = 96
"""Room for the `changes` envelope ({"type","v","dev","sv","ch":[...]}) in a batch."""


class Batch(list[tuple[int, dict[str, Any]]]):
    """The next changes to send: `(n, wire change dict)` in drain order, one schema
    version (`sv`) and one store incarnation (`inc`, None: legacy) for all of them, as a
    `changes` message needs."""

    def __init__(self, items: Iterable[tuple[int, dict[str, Any]]] = (), sv: int = 0,
                 inc: str | None = None) -> None:
        super().__init__(items)
        self.sv = sv
        self.inc = inc

    @property
    def numbers(self) -> list[int]:
        return [n for n, _ in self]

    def message(self, dev: str) -> wire.Changes:
        """The `changes` message carrying this batch."""
        return wire.Changes(dev=dev, sv=self.sv, inc=self.inc,
                            ch=[wire.Change.model_validate(ch) for _, ch in self])

    def payload(self, dev: str, *, compress_over: int | None = None) -> bytes:
        """The wire bytes of that message, as the daemon publishes them: encoded straight
        from the outbox entries (validated when they were written), without a model."""
        msg: dict[str, Any] = {"type": "changes", "v": 1, "dev": dev, "sv": self.sv,
                               "ch": [ch for _, ch in self]}
        if self.inc is not None:
            msg["inc"] = self.inc
        return codec.encode_dict(msg, compress_over=compress_over)


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


class Sync:
    """Daemon-side operations on an open agent store (get it as `Agent.sync`)."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self.dev = core.dev
        self.server_caps: frozenset[str] | None = None
        """The optional features agreed with the server in its `welcome` to the latest
        `hello` (PROTOCOL.md §11); None until one arrived on this connection."""

    # ---------------------------------------------------------------- sending

    def next_batch(self, exclude_n: Iterable[int] = (), max_changes: int = 500,
                   max_bytes: int = 131072) -> Batch:
        """The next changes to send, in drain order, skipping `exclude_n` (in flight).

        At most `max_changes` changes whose encoded size (with the message envelope)
        stays within `max_bytes`; always at least one if any is waiting. All share the
        schema version and the incarnation of the first.
        """
        # Only looked up: a set (or a dict's keys) is used as it is, not copied (the
        # daemon passes up to max_inflight_changes numbers for every batch).
        excluded = exclude_n if isinstance(exclude_n, AbstractSet) else set(exclude_n)

        def run(work: Work) -> Batch:
            batch = Batch()
            size = _ENVELOPE_BYTES
            with work.tx.cursor("outbox_idx") as cur:
                found = cur.set_range(b"P")
                while found:
                    key = cur.key()
                    if not key.startswith(b"P"):
                        break
                    n = int.from_bytes(key[-8:], "big")
                    if n in excluded:
                        # Jump over the whole run of excluded numbers at this priority
                        # with one seek: the changes in flight are mostly one run, and
                        # stepping over each of them made every batch cost O(in flight).
                        after = n + 1
                        while after in excluded:
                            after += 1
                        found = cur.set_range(key[:-8] + n_key(after))
                        continue
                    found = cur.next()
                    entry = work.outbox_entry(n)
                    if entry is None:
                        continue
                    if not batch:
                        batch.sv = entry["sv"]
                        batch.inc = entry.get("i")
                    elif entry["sv"] != batch.sv or entry.get("i") != batch.inc:
                        continue
                    cost = len(orjson.dumps(entry["ch"])) + 1
                    if batch and size + cost > max_bytes:
                        break
                    batch.append((n, entry["ch"]))
                    size += cost
                    if len(batch) >= max_changes:
                        break
            return batch

        return self._core.read(run)

    def pending_count(self) -> int:
        return self._core.read(lambda work: work.tx.count("outbox"))

    # -------------------------------------------------------------- receiving

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
            for n, scope, q in ack.ok:
                entry = work.outbox_entry(n)
                if entry is None:
                    ignored.append(n)
                    continue
                rk = work.remove_outbox(n, entry)
                own.setdefault(rk, []).append((entry["ch"], q))
                applied.append(n)
                seqs.append((scope, q))
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
                work.tx.set_meta("last_sync", now)
                work.tx.delete("meta", b"last_err")  # a problem the server reported is over
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

    def apply_reject(self, reject: wire.Reject) -> RejectResult:
        """Apply a reject (§7.5): permanent -> dead letters, out of the outbox, view
        rolled back (with `rec` applied to the base when present); transient -> kept,
        attempt count and last error updated."""
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
            for rj in reject.rj:
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
                    work.tx.set_meta("last_err", {"code": rj.code, "reason": rj.reason,
                                                  "t": now})
                    continue
                work.tx.put("deadletters", n_key(rj.n), {
                    "n": rj.n, "code": rj.code, "reason": rj.reason, "t": now, "entry": entry})
                if rj.code == codec.ID_REUSED and entry.get("i") == work.incarnation():
                    reused.append(rj.n)
                rk = work.remove_outbox(rj.n, entry)
                c, k = entry["ch"]["c"], entry["ch"]["k"]
                base = bases[rk] if rk in bases else work.load_base(rk, c, k)
                view = work.refresh_view(rk, c, k, base)
                work.feed(c, k, "rejected", {
                    "change_ids": [change_id(self.dev, rj.n)], "code": rj.code,
                    "reason": rj.reason, "fields": None if view is None or view.x
                    else view.fields})
                dead.append(rj.n)
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
                work.tx.delete("meta", b"last_err")
            return CheckpointResult(complete, behind, dropped, denied)

        return core.write(run, durable=False)

    # --------------------------------------------------------- asking for data

    def catchup_request(self, req_id: str,
                        scopes: Iterable[str] | None = None) -> wire.Catchup:
        """The `catchup` to send (§7.3): every followed scope's checkpoint (or only those
        of `scopes`), the scopes with a snapshot in progress. Remembers `req_id` as the
        latest request."""
        core = self._core
        chosen = None if scopes is None else set(scopes)
        wanted = [s for s in core.scopes if chosen is None or s in chosen]

        def run(work: Work) -> wire.Catchup:
            work.tx.set_meta("creq", req_id)
            cps = {s: work.checkpoint(s) for s in wanted}
            return wire.Catchup(dev=core.dev, req=req_id, cp={s: c.cp for s, c in cps.items()},
                                snap=[s for s, c in cps.items() if c.snapshot],
                                lim=core.settings.catchup_page)

        return core.write(run)

    def gaps_older_than(self, seconds: float) -> bool:
        """True when some scope has had a sequence gap for at least `seconds` (§9.4:
        time to send a `catchup`)."""
        core = self._core

        def run(work: Work) -> bool:
            now = work.now()
            for scope in core.scopes:
                age = work.checkpoint(scope).gap_age_ms(now)
                if age is not None and age >= seconds * 1000:
                    return True
            return False

        return core.read(run)

    def hello(self, agent_version: str, *, z: bool = True) -> wire.Hello:
        """The `hello` to send after every (re)connect (and when the checkpoints moved),
        with executed command ids, the store's incarnation and its checkpoints."""
        core = self._core

        def run(work: Work) -> wire.Hello:
            return wire.Hello(dev=self.dev, agent=agent_version, sv=core.catalog.version,
                              z=z, done=list(work.tx.meta("cmds", []))[-MAX_COMMAND_IDS:],
                              inc=work.incarnation(),
                              cp={s: work.checkpoint(s).cp for s in core.scopes},
                              caps=sorted(AGENT_CAPS))

        return core.read(run)

    def apply_welcome(self, msg: wire.Welcome) -> frozenset[str]:
        """Note the features the server agreed to (only ones this agent offered)."""
        self.server_caps = frozenset(msg.caps) & AGENT_CAPS
        return self.server_caps

    def status_message(self, online: bool, agent_version: str | None = None) -> wire.Status:
        """The retained `status` (§7.10): presence and counts, nothing private."""

        def run(work: Work) -> wire.Status:
            now = work.now()
            first = work.tx.first("outbox")
            return wire.Status(dev=self.dev, on=online, agent=agent_version,
                               sv=self._core.catalog.version, t=now,
                               pend=work.tx.count("outbox"),
                               old=None if first is None else max(0, now - first[1]["t"]),
                               dl=work.tx.count("deadletters"))

        return self._core.read(run)

    # --------------------------------------------------------------- commands

    def command_done(self, command_id: str) -> bool:
        """Whether this store already carried out command `command_id` (§7.9)."""
        return command_id in self._core.read(lambda work: work.tx.meta("cmds", []))

    def execute_command(self, cmd: wire.Command) -> bool:
        """Carry out a `resync`, `scopes` or `ping` at most once per id (§7.9); False if
        already done. resync: drop the base and checkpoints, keep the outbox, rebuild the
        views from the pending changes. scopes: follow the new list (`agent.scopes`).
        ping: nothing. The daemon then sends `hello`. A `wipe`
        replaces the whole store: `Agent.wipe` carries it out.
        """
        if cmd.cmd == "wipe":
            raise ValueError("a wipe replaces the store: carry it out with Agent.wipe")
        core = self._core

        def run(work: Work) -> bool:
            tx = work.tx
            done: list[str] = list(tx.meta("cmds", []))
            if cmd.id in done:
                return False
            if cmd.cmd == "resync":
                _resync(work)
            elif cmd.cmd == "scopes":
                scopes.carry_out(work, cmd.id, cmd.args)
            done.append(cmd.id)
            tx.set_meta("cmds", done[-MAX_COMMAND_IDS:])
            return True

        return core.write(run)

    def set_online(self, online: bool) -> None:
        """The daemon's heartbeat: connected or not, now. Call it at least every
        sync.status_interval_s while connected; `status()` reports online only while
        the last heartbeat is fresh and the daemon's process is alive."""
        self._core.write(lambda work: record_online(work, online), durable=False)

    def record_link(self, state: LinkState, reason: str = "",
                    retry_in_s: float | None = None, *, code: str | None = None) -> bool:
        """Record a connectivity change for apps: a feed event (online, offline,
        retrying) and meta "link", in one transaction. The reason is classified
        (`agent.connectivity`) unless the link already knew its `code` (from the
        exception or the broker's refusal, `waystation.linkproblems`). An unchanged
        online/offline state is not recorded again; every retry is (each says when the
        next attempt is). Returns whether it was."""
        if state == "online":
            code = ""
        elif not code:
            code = classify(reason)

        def run(work: Work) -> bool:
            prior = work.tx.meta("link")
            if (state != "retrying" and prior is not None and prior.get("state") == state
                    and prior.get("code") == code):
                return False
            doc: dict[str, Any] = {"state": state, "code": code, "reason": reason,
                                   "t": work.now()}
            if retry_in_s is not None:
                doc["retry_in_s"] = round(retry_in_s, 1)
            work.tx.set_meta("link", doc)
            work.feed("", "", state, {k: v for k, v in doc.items() if k not in ("state", "t")})
            return True

        return self._core.write(run, durable=False)


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
    return len(stale)


def _resync(work: Work) -> None:
    tx = work.tx
    for db in ("base", "stamps", "checkpoints"):
        tx.clear(db)
    work.clear_views()
    for key in list(tx.keys("conflicts", b"O")):
        tx.delete("conflicts", key)
    records: dict[bytes, None] = {}
    for key in tx.keys("outbox_idx", b"R"):
        records[key[1:-9]] = None
    for rk in records:
        c, k = split_record_key(rk)
        work.refresh_view(rk, c, k, None)
    tx.delete("meta", b"denied")
    work.feed("", "", "reset")


__all__ = ["AckResult", "Batch", "CheckpointResult", "RejectResult", "Sync"]
