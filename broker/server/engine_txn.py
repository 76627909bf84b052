"""The engine's group transaction (`Engine._commit`), as a mixin of `Engine`.

One store transaction per group of up messages (group commit): the publish-window
guard first (`schema_guard.check`), every message applied (`apply_message`), refusals
kept as dead letters, and the registry rows the group changed written at its end.
A failing group is retried message by message; a failing message becomes a dead letter
and a transient `server_error`.

The registry is not read before a group: the guard reads the generation inside the
transaction anyway, and when it moved the registry is reloaded, the group's messages
parsed again against it (a device enrolled, disabled or re-scoped meanwhile) and the
group run again (`_transact_live`). One read transaction per message fewer online.

Row fields wait in memory for a transaction (`broker.server.pending_rows`): presence
goes with the next one, a group's or the tick's; contact times (`last_seen_ms`,
`synced_ms`, for the operator's view only) of a group that changes nothing else of a
device's row wait for the next tick, about a second later (at most that much of them is
lost in a crash; a clean stop writes them, `Engine.flush`), instead of every message
rewriting its device's row.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import structlog

from broker.errors import StoreError
from broker.server import schema_guard
from broker.server.applier import Applier, BatchStats
from broker.server.fanout import Fanout
from broker.server.incoming import Incoming, dead_letters_for, parse_up, wiped_in_group
from broker.server.letter_gate import GateSession, LetterGate
from broker.server.liveness import Heartbeat
from broker.server.message_apply import apply_message
from broker.server.pending_rows import CONTACT_FIELDS, Fields, PendingRows
from broker.server.presence import Presence
from broker.server.recent import RecentTraffic
from broker.server.registry import Registry
from broker.server.replies import letter
from broker.server.store.base import DeadLetter, DeviceRow, ServerRow, Store, WriteTxn
from schemas import codec
from waystation.config import MergeConfig, ServerConfig

log = structlog.get_logger("broker.server.engine")

_T = TypeVar("_T")
MAX_PENDING_LETTERS = 1000

_Result = tuple[list[DeviceRow], BatchStats, GateSession, Fields]


class GroupTransaction:
    """`Engine`'s transaction half (see module docstring)."""

    store: Store
    config: ServerConfig
    cfg: MergeConfig
    registry: Registry
    presence: Presence
    applier: Applier
    gate: LetterGate
    counters: Counter[str]
    recent: RecentTraffic | None
    heartbeat: Heartbeat
    _rows: PendingRows
    _letters: list[DeadLetter]

    def _refresh_registry(self) -> bool:
        raise NotImplementedError

    def _served(self) -> frozenset[str]:
        raise NotImplementedError

    def _done_letters(self, session: GateSession) -> None:
        raise NotImplementedError

    def _commit(self, incs: list[Incoming], now: int, server: ServerRow | None = None
                ) -> None:
        """Apply the group in one transaction; on a failure, each message on its own.
        With no messages (the tick) it writes what waits: presence, contact times,
        dead letters, and `server`, this server's liveness row when one is due."""
        if not incs and not self._rows and not self._letters and server is None:
            return
        # A group writes the rows due (presence); the tick writes every waiting row.
        dirty = self._rows.take_due() if incs else self._rows.take_all()
        letters, self._letters = self._letters, []
        try:
            self._done(self._transact_live(
                incs, lambda txn: self._apply_all(txn, incs, now, dirty, letters, server)))
            if server is not None:
                self.heartbeat.written(server)
            if incs:
                self.heartbeat.store_ok()
            return
        except StoreError as exc:
            log.exception("store_failed", messages=len(incs))
            self.heartbeat.store_failed(str(exc), now)
            for inc in incs:
                inc.failed = inc.error is None
            self._restore(dirty, letters)
            return
        except Exception:
            log.exception("group_failed", messages=len(incs))
        self._restore(dirty, letters)
        for inc in incs:
            try:
                self._done(self._transact_live([inc], partial(
                    self._apply_all, incs=[inc], now=now, dirty={}, letters=[])))
            except Exception:
                log.exception("message_failed", dev=inc.topic_dev)
                inc.failed = True
                code, reason = inc.error or (codec.SERVER_ERROR, "the server failed to handle "
                                                                 "this message")
                dead = letter(inc.topic_dev, "up", code, reason, inc.payload, now)
                try:
                    self.store.transact(partial(_add_letter, letter=dead))
                except Exception:
                    log.exception("dead_letter_failed", dev=inc.topic_dev)

    def _transact_live(self, incs: list[Incoming], fn: Callable[[WriteTxn], _T]) -> _T:
        def reload() -> None:
            self._refresh_registry()
            for inc in incs:  # parsed again against the registry as reloaded
                _reparse(inc, self.registry, self.cfg, self.recent, self._served())
        return schema_guard.transact_live(self.store, fn, reload, self.counters)

    def _done(self, result: _Result) -> None:
        rows, st, session, seen = result
        self._done_letters(session)
        for row in rows:
            self.registry.put(row)
            self._rows.written(row.id)  # its waiting contact times went with it
        for dev, fields in seen.items():
            self._rows.put(dev, fields)
        counters = self.counters  # plain adds: Counter.update(**kw) is slow per group
        counters["applied"] += st.applied
        counters["duplicates"] += st.duplicates
        counters["rejected"] += st.rejected
        counters["transient"] += st.transient
        counters["conflicts"] += st.conflicts

    def _restore(self, dirty: Fields, letters: list[DeadLetter]) -> None:
        self._rows.restore(dirty)
        self._letters = (letters + self._letters)[-MAX_PENDING_LETTERS:]

    def _apply_all(self, txn: WriteTxn, incs: list[Incoming], now: int, dirty: Fields,
                   letters: list[DeadLetter], server: ServerRow | None = None) -> _Result:
        """The body of the group transaction (may run again after a retryable failure)."""
        if server is not None:
            txn.put_server(server)
            self.heartbeat.saw(txn.servers(), now)
        if incs:  # first, before any scope lock (`broker.server.schema_guard`)
            schema_guard.check(txn, self.registry.generation)
            wiped_in_group(incs)
        fan = Fanout(self.registry, self.presence)
        session = self.gate.session()  # a rerun decides afresh: nothing counted twice
        wants_cache: dict[tuple[str, str], bool] = {}

        def wants(scope: str, dev: str) -> bool:
            key = (scope, dev)
            want = wants_cache.get(key)
            if want is None:
                want = wants_cache[key] = fan.wants(scope, dev)
            return want

        ta = self.applier.begin(txn, wants)
        # Lock every scope the group writes once, in sorted order, before any batch:
        # per-batch locking would take later batches' scopes out of order (PostgreSQL
        # then reruns the transaction to avoid a deadlock). A no-op on LMDB.
        group_scopes = {ch.s for inc in incs if inc.error is None and inc.kind == "changes"
                        and not inc.blocked and inc.msg.changes is not None
                        for ch in inc.msg.changes.ch}
        if group_scopes:
            txn.lock_scopes(sorted(group_scopes))
        updates: Fields = {dev: dict(ch) for dev, ch in dirty.items()}
        for inc in incs:
            inc.results, inc.commands = [], []
            if inc.error is None and inc.device is not None:
                upd = updates.setdefault(inc.device.id, {})
                upd["last_seen_ms"] = now
                apply_message(txn, inc, ta, upd, now, self.config.enrol, self.counters)
            for refusal in dead_letters_for(inc, now):
                for dead in session.admit(refusal):
                    txn.add_dead_letter(dead)
        for dead in letters:
            txn.add_dead_letter(dead)
        rows: list[DeviceRow] = []
        seen: Fields = {}
        for dev, fields in updates.items():
            if dev not in dirty and fields.keys() <= CONTACT_FIELDS:
                seen[dev] = fields  # the next tick writes them (module docstring)
                continue
            row = txn.get_device(dev)
            if row is not None:
                row = dataclasses.replace(row, **{**self._rows.contact_of(dev), **fields})
                txn.put_device(row)
                rows.append(row)
        return rows, ta.stats, session, seen


def _reparse(inc: Incoming, registry: Registry, cfg: MergeConfig,
             recent: RecentTraffic | None, served: frozenset[str]) -> None:
    """`inc` as `parse_up` makes it against `registry` (its results reset)."""
    fresh = parse_up(inc.topic_dev, inc.payload, registry, cfg, recent, served)
    inc.kind, inc.device, inc.msg = fresh.kind, fresh.device, fresh.msg
    inc.error, inc.blocked, inc.caps = fresh.error, fresh.blocked, fresh.caps


def _add_letter(txn: WriteTxn, letter: DeadLetter) -> int:
    return txn.add_dead_letter(letter)


__all__ = ["MAX_PENDING_LETTERS", "GroupTransaction"]
