"""The device agent's Python API for apps (and the CLI), safe across processes.

    agent = Agent.open(cfg, catalog)
    result = agent.put("tasks", "t-1", {"route": "route-42", "status": "delivered"})
    result.message        # 'saved locally (change van-12:17), pending sync'
    agent.get("tasks", "t-1").fields
    agent.status().summary()

Every write is ONE durable LMDB transaction that ticks the hybrid logical clock,
allocates the next gapless change number `n`, appends the change to the outbox, updates
the record's local view and appends a feed event: when it returns the write survives
kill -9 and power loss, and it is "pending" (saved locally) until the server's ack. Apps,
the CLI and the sync daemon may have the store open at the same time, each in its own
process. `agent.sync` gives the operations the sync daemon applies (`agent.sync.Sync`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import orjson

from agent import evicted, feed, fetching, idempotency, quota, validate
from agent.changes import Op, base_version, build_change, change_id, remove_tags
from agent.checkpoints import ScopeCheckpoint
from agent.core import Core, Work
from agent.errors import BadRequest, StoreGone, WriteRefused
from agent.fetch_api import AgentFetch
from agent.fetch_query_api import AgentFetchQuery
from agent.idempotency import Once
from agent.letters_api import AgentLetters
from agent.models import FeedEvent, Record, WriteResult
from agent.opening import Opener, wall_ms
from agent.query.agent_api import AgentQueries
from agent.status import AgentStatus, read_status
from agent.store import Store, record_key, split_record_key
from agent.sync import Sync
from agent.transaction import Transaction
from agent.view import ViewState, initial_view, step
from agent.wipe import WipeReport
from schemas.collection import Catalog, CollectionSpec
from waystation.config import AgentConfig

T = TypeVar("T")

WAKE_SOCKET = "agent.sock"
WAKE_WRITE = b"w"
"""Wake-socket datagram: something was written, send it."""
WAKE_SYNC_NOW = b"s"
"""Wake-socket datagram: "sync now" was asked (meta "sync_now" says when and by whom)."""
"""The sync daemon's datagram socket in the store's directory (see agent.daemon)."""
_POKE_RETRY_S = 0.25
"""After a poke found no daemon, the next pokes wait this long (a daemon polls anyway)."""


class Agent(AgentQueries, AgentFetch, AgentFetchQuery, AgentLetters):
    """An open device agent. Create with `Agent.open`; close with `close()` (or `with`).

    Queries (`query`, `count`, `live_query`, `subscribe`) come from
    `agent.query.agent_api.AgentQueries`."""

    def __init__(self, core: Core, opener: Opener | None = None) -> None:
        self._core = core
        self._opener = opener
        self._sync: Sync | None = None
        self._wake: socket.socket | None = None
        self._wake_to = ""  # the daemon's wake socket address (the store's path never moves)
        self._poke_quiet_until = 0.0

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, cfg: AgentConfig, catalog: Catalog, *, create: bool = True,
             env: Mapping[str, str] | None = None,
             now_ms: Callable[[], int] | None = None, build_indexes: bool = True,
             readonly: bool = False) -> Agent:
        """Open the agent's store under cfg.data_dir (created unless `create=False`).

        `env` expands ``${VAR}`` in the encryption key path (default: os.environ);
        `now_ms` replaces the wall clock (tests). The indexes the schema declares are
        recorded and, unless `build_indexes=False`, built (or dropped) before this
        returns (`Agent.build_indexes` finishes them later). `readonly`: only to read
        (status): takes no LMDB writer lock, records nothing, needs an existing store.
        """
        opener = Opener(cfg, catalog, create=create, env=env, now_ms=now_ms,
                        build_indexes=build_indexes, readonly=readonly)
        return cls(opener.open(), opener)

    def wipe(self, command_id: str) -> WipeReport:
        """Erase this device's store for good (a remote wipe, `agent.wipe`): data key
        first, then the files; this agent goes on with a new, empty store."""
        if self._opener is None:
            raise RuntimeError("this agent was not opened with Agent.open: cannot wipe")
        old = self._core
        self._core, report = self._opener.wipe(old, command_id)
        self._sync = None
        old.store.close()  # after the swap: a reader in another thread sees the new store
        return report

    def close(self) -> None:
        if self._wake is not None:
            self._wake.close()
            self._wake = None
        self._core.store.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def device_id(self) -> str:
        return self._core.dev

    @property
    def catalog(self) -> Catalog:
        return self._core.catalog

    @property
    def store(self) -> Store:
        return self._core.store

    @property
    def sync(self) -> Sync:
        """The daemon-side operations on this store (`agent.sync.Sync`)."""
        if self._sync is None:
            self._sync = Sync(self._core)
        return self._sync

    # ----------------------------------------------------------------- writes

    def put(self, collection: str, key: str, fields: Mapping[str, Any], *,
            priority: int = 0, once: Once | None = None) -> WriteResult:
        """Set lww/manual fields of a record (creating it: include its scope field).

        `once` (every write takes it): the write's idempotency key (`agent.idempotency`):
        sent again, it raises `Replayed` with the first answer and writes nothing."""
        return self._written(self._commit(self._put_op(collection, key, fields, priority),
                                          once))

    def _put_op(self, collection: str, key: str, fields: Mapping[str, Any],
                priority: int) -> Callable[[Work], WriteResult]:
        """Check a put's input now; the returned function writes it inside a `Work`
        (one write here, or one of a transaction's: `agent.transaction`)."""
        spec = validate.collection(self._core.catalog, collection)
        key = validate.record_key(spec, key)
        values = validate.put_fields(spec, fields)
        prio = validate.priority(priority)

        def run(work: Work) -> WriteResult:
            rk = record_key(spec.name, key)
            view = work.load_view(rk, spec.name, key)
            scope = validate.scope_for_write(spec, key, self._core.scopes,
                                             evicted.held_scope(work.tx, rk, view), values)
            return self._write(work, spec, rk, key, view, scope, "put", prio, f=values)

        return run

    def delete(self, collection: str, key: str, *, priority: int = 0,
               once: Once | None = None) -> WriteResult:
        """Delete a record this device holds ("unchanged" if it is deleted already)."""
        return self._written(self._commit(self._delete_op(collection, key, priority), once))

    def _delete_op(self, collection: str, key: str,
                   priority: int) -> Callable[[Work], WriteResult]:
        spec = validate.collection(self._core.catalog, collection)
        key = validate.record_key(spec, key)
        prio = validate.priority(priority)

        def run(work: Work) -> WriteResult:
            rk = record_key(spec.name, key)
            view = work.load_view(rk, spec.name, key)
            if view is None:
                # Evicted by retention: deleted blind like any other write on it
                # (deploy/README.md, "Retention"); its marker keeps the scope.
                held = evicted.held_scope(work.tx, rk, None)
                if held is None:
                    raise WriteRefused("invalid", f"no record {spec.name}/{key} on this "
                                                  "device to delete")
                scope = validate.scope_for_write(spec, key, self._core.scopes, held, {})
                return self._write(work, spec, rk, key, None, scope, "del", prio)
            if view.x:
                # Already deleted here (by this device, pending or synced, or by the
                # server): a repeated DELETE (an app retrying after a lost answer) has
                # nothing to do. A second tombstone would be sent with a newer stamp and
                # could delete a record another device re-created meanwhile.
                return WriteResult(spec.name, key, view.s, "unchanged")
            scope = validate.scope_for_write(spec, key, self._core.scopes, view.s, {})
            return self._write(work, spec, rk, key, view, scope, "del", prio)

        return run

    def increment(self, collection: str, key: str, field: str, amount: int | float, *,
                  priority: int = 0, once: Once | None = None) -> WriteResult:
        """Add `amount` (not 0; negative subtracts) to counter `field`."""
        return self._written(self._commit(self._increment_op(collection, key, field, amount,
                                                             priority), once))

    def _increment_op(self, collection: str, key: str, field: str, amount: int | float,
                      priority: int) -> Callable[[Work], WriteResult]:
        spec = validate.collection(self._core.catalog, collection)
        key = validate.record_key(spec, key)
        inc = validate.increment(spec, field, amount)
        prio = validate.priority(priority)

        def run(work: Work) -> WriteResult:
            rk = record_key(spec.name, key)
            view = work.load_view(rk, spec.name, key)
            scope = validate.scope_for_write(spec, key, self._core.scopes,
                                             evicted.held_scope(work.tx, rk, view), {})
            return self._write(work, spec, rk, key, view, scope, "put", prio, i={field: inc})

        return run

    def add(self, collection: str, key: str, field: str, members: Sequence[str], *,
            priority: int = 0, once: Once | None = None) -> WriteResult:
        """Add members to set `field` (each add is tagged with this change's id)."""
        return self._written(self._commit(self._add_op(collection, key, field, members,
                                                       priority), once))

    def _add_op(self, collection: str, key: str, field: str, members: Sequence[str],
                priority: int) -> Callable[[Work], WriteResult]:
        spec = validate.collection(self._core.catalog, collection)
        key = validate.record_key(spec, key)
        adds = validate.members(spec, field, members)
        prio = validate.priority(priority)

        def run(work: Work) -> WriteResult:
            rk = record_key(spec.name, key)
            view = work.load_view(rk, spec.name, key)
            scope = validate.scope_for_write(spec, key, self._core.scopes,
                                             evicted.held_scope(work.tx, rk, view), {})
            return self._write(work, spec, rk, key, view, scope, "put", prio, a={field: adds})

        return run

    def remove(self, collection: str, key: str, field: str, members: Sequence[str], *,
               priority: int = 0, once: Once | None = None) -> WriteResult:
        """Remove members from set `field`, naming the add-tags this device knows; a
        member added concurrently elsewhere stays (add wins). Members the set does not
        hold are ignored; if none is held the result is "unchanged"."""
        return self._written(self._commit(self._remove_op(collection, key, field, members,
                                                          priority), once))

    def _remove_op(self, collection: str, key: str, field: str, members: Sequence[str],
                   priority: int) -> Callable[[Work], WriteResult]:
        spec = validate.collection(self._core.catalog, collection)
        key = validate.record_key(spec, key)
        gone = validate.members(spec, field, members)
        prio = validate.priority(priority)

        def run(work: Work) -> WriteResult:
            rk = record_key(spec.name, key)
            view = work.load_view(rk, spec.name, key)
            tags = remove_tags(view.t.get(field, {}), gone) if view and not view.x else {}
            if view is None or not tags:
                return WriteResult(spec.name, key, view.s if view else (spec.scope or ""),
                                   "unchanged")
            scope = validate.scope_for_write(spec, key, self._core.scopes, view.s, {})
            return self._write(work, spec, rk, key, view, scope, "put", prio,
                               r={field: tags})

        return run

    def transaction(self, *, priority: int = 0, once: Once | None = None) -> Transaction:
        """Several writes, across records and collections, durable together or not at
        all (docs/TRANSACTIONS.md):

            with agent.transaction() as tx:
                tx.put("orders", "o-1", {...})
                tx.put("order_lines", "o-1:1", {...})

        An exception inside the block writes nothing; `tx.get` sees the block's own
        writes. On the wire the changes travel as one unit (capability `txn`)."""
        return Transaction(self, priority, once)

    def _commit(self, fn: Callable[[Work], T], once: Once | None = None) -> T:
        """One durable write transaction (on the store as it is now: `_fresh`); with
        `once`, its key is checked and recorded in that same transaction."""
        if once is not None:
            fn = partial(idempotency.guarded, fn, once)
        return self._fresh(lambda: self._core.write(fn))

    def idempotent_answer(self, once: Once) -> tuple[int, Any] | None:
        """The answer recorded for `once`'s key (status, body), or None; raises
        `KeyReused` if the key was recorded for another request (a read: nothing is
        written)."""
        return self._read(partial(idempotency.lookup, once=once))

    def _read(self, fn: Callable[[Work], T]) -> T:
        """One read transaction (on the store as it is now: `_fresh`)."""
        return self._fresh(lambda: self._core.read(fn))

    def _current_core(self) -> Core:
        """The store as it is now: re-opened if it was wiped under this agent."""
        self._fresh(lambda: self._core.read(lambda work: None))
        return self._core

    def _fresh(self, run: Callable[[], T]) -> T:
        """Run `run` on the store; if it was wiped under this agent (by the sync daemon
        or another process: a remote wipe), open the new store and run it there."""
        try:
            return run()
        except StoreGone:
            if self._opener is None:
                raise
            old = self._core
            old.store.detach()  # open the files now at the path, not this process's old env
            self._core = self._opener.open()
            self._sync = None
            old.store.close()
            return run()

    def _written(self, result: WriteResult) -> WriteResult:
        """After a write committed: poke the sync daemon (any process) to send it now."""
        if result.state == "pending":
            self._poke()
        return result

    def _poke(self, what: bytes = WAKE_WRITE) -> None:
        # A datagram to the daemon's wake socket. Without a daemon (or when the path is
        # too long for AF_UNIX) nothing happens and the daemon's poll finds it; after a
        # failed poke the next ones are skipped for _POKE_RETRY_S (a write without a
        # daemon paid a failing system call each), a daemon started meanwhile finds the
        # writes when it starts or at its next poll. (Waking a daemon of this process
        # directly, without the socket, was tried: lone-change latency through
        # bench.e2e was ~3x worse in back-to-back runs, unexplained; not kept.)
        store = self._core.store
        now = time.monotonic()
        if now < self._poke_quiet_until:
            return
        if self._wake is None:
            self._wake = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._wake.setblocking(False)
            self._wake_to = str(store.path / WAKE_SOCKET)
        try:
            self._wake.sendto(what, self._wake_to)
        except OSError:
            self._poke_quiet_until = now + _POKE_RETRY_S

    def sync_now(self) -> dict[str, Any]:
        """Ask the sync daemon to send everything waiting now: the sync windows, the
        metered-link policy, the day's budget and the battery threshold are lifted for
        `policy.sync_now_s` (an announced-down server still holds everything: nothing
        would read it). Returns the request ({"t": ms, "by": "app"}); the daemon (any
        process) is told at once, and one started later within that time honours it."""

        def run(work: Work) -> dict[str, Any]:
            doc = {"t": work.now(), "by": "app"}
            work.tx.set_meta("sync_now", doc)
            return doc

        doc: dict[str, Any] = self._fresh(lambda: self._core.write(run, durable=False))
        self._poke_quiet_until = 0.0  # asked for explicitly: always try the socket
        self._poke(WAKE_SYNC_NOW)
        return doc

    def _write(self, work: Work, spec: CollectionSpec, rk: bytes, key: str,
               view: ViewState | None, scope: str, op: Op, priority: int, *,
               f: dict[str, Any] | None = None, i: dict[str, int | float] | None = None,
               a: dict[str, list[str]] | None = None,
               r: dict[str, dict[str, list[str]]] | None = None,
               keep: tuple[str, int] | None = None) -> WriteResult:
        """`keep` (agent.salvage only): the (stamp time part, base version) of a change
        written in an older store, kept so the server merges it as the late write it is."""
        quota.check_write(work)
        if view is None and work.tx.has(evicted.DB, rk):
            # Written blind on an evicted record: ask for it back, so that its view is
            # whole again once the server answers (agent.fetching).
            fetching.enqueue(work, [rk])
        n = work.next_n()
        stamp = work.tick()
        b = base_version(work.checkpoint(scope).cp, view.wq if view else 0)
        h = stamp.time_part()
        if keep is not None:
            h, b = keep
        ch = build_change(n=n, h=h, c=spec.name, k=key, s=scope, b=b, op=op,
                          f=f, i=i, a=a, r=r)
        # `view` was loaded for this write alone (its callers are done with it): the new
        # change is folded into it in place (`apply_pending` without the copy).
        new = view if view is not None else initial_view(None, spec.name, key, scope)
        step(new, ch, self._core.dev, spec)
        size = len(orjson.dumps(new.f))
        if size > validate.MAX_RECORD_BYTES:
            raise WriteRefused("record_too_large",
                               f"{spec.name}/{key} would be {size} bytes as JSON, over the "
                               f"{validate.MAX_RECORD_BYTES}-byte record limit")
        work.add_outbox(rk, n, ch, priority, self._core.catalog.version)
        work.save_view(rk, new)
        cid = change_id(self._core.dev, n)
        work.feed(spec.name, key, "local", {"change_ids": [cid]})
        return WriteResult(spec.name, key, scope, "pending", n, cid, f"{h}:{self._core.dev}")

    # ------------------------------------------------------------------ reads

    def get(self, collection: str, key: str, *, include_deleted: bool = False) -> Record | None:
        """The record as this device sees it, or None (unknown, or deleted)."""
        spec = self._read_spec(collection)
        try:
            key = validate.record_key(spec, key)
        except WriteRefused as exc:
            raise BadRequest(exc.code, str(exc)) from None
        rk = record_key(spec.name, key)
        state = self._read(lambda work: work.load_view(rk, spec.name, key))
        if state is None or (state.x and not include_deleted):
            return None
        return _record(state)

    def _read_spec(self, collection: str) -> CollectionSpec:
        try:
            return validate.collection(self._core.catalog, collection)
        except WriteRefused as exc:
            raise BadRequest(exc.code, str(exc)) from None

    def feed_position(self) -> int:
        """The seq of the newest feed event (watch(since=...) continues after it)."""
        return self._read(feed.position)

    def feed_after(self, last: int, limit: int = 1000) -> list[FeedEvent]:
        """Up to `limit` feed events after seq `last`, oldest first (see `agent.feed`)."""
        return self._read(partial(feed.read_after, last=last, limit=limit))

    def link_state(self) -> dict[str, Any] | None:
        """The sync loop's last recorded connectivity change (`Sync.record_link`)."""
        doc: dict[str, Any] | None = self._read(lambda work: work.tx.meta("link"))
        return doc

    def watch(self, collection: str | None = None, since: int | None = None,
              timeout: float | None = None, *, poll_s: float = 0.05) -> Iterator[FeedEvent]:
        """Yield changes to local records as they happen, from any process.

        Starts after feed seq `since` (default: now) and polls the store every `poll_s`
        until `timeout` seconds have passed (None: forever). If events were pruned
        before they could be read, a "truncated" event says so first.
        """
        last = self.feed_position() if since is None else since
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.feed_after(last)
            for event in batch:
                last = event.seq
                if collection is None or event.collection in (collection, ""):
                    yield event
            if deadline is not None and time.monotonic() >= deadline:
                return
            if not batch:
                wait = poll_s if deadline is None else min(poll_s, deadline - time.monotonic())
                if wait > 0:
                    time.sleep(wait)

    def status(self) -> AgentStatus:
        """Online state (and why not), pending count and age, last sync, dead letters,
        conflicts, the store's path and incarnation (`agent.status`)."""
        return self._fresh(lambda: read_status(self._core))

    def checkpoints(self) -> dict[str, ScopeCheckpoint]:
        return self._read(lambda work: {s: work.checkpoint(s) for s in self._core.scopes})

    def pending(self) -> list[dict[str, Any]]:
        """The outbox entries in n order (for inspection)."""
        return self._read(lambda work: [doc for _, doc in work.tx.items("outbox")])

    # `list` last: inside the class body its name shadows the builtin in annotations.
    def list(self, collection: str, prefix: str | None = None, limit: int | None = None, *,
             include_deleted: bool = False, after: str | None = None) -> list[Record]:
        """Records of `collection` in key order (optionally keys starting with `prefix`,
        only keys after `after`: the last key of the previous page)."""
        spec = self._read_spec(collection)
        start = record_key(spec.name, max(prefix or "", after or ""))
        scan_prefix = spec.name.encode() + b"\0"

        def run(work: Work) -> list[Record]:
            out: list[Record] = []
            if limit is not None and limit <= 0:
                return out
            for raw, doc in work.tx.items("view", scan_prefix, start=start):
                c, k = split_record_key(raw)
                if prefix and not k.startswith(prefix):
                    break
                if after is not None and k <= after:
                    continue
                state = ViewState.from_doc(c, k, doc)
                if state.x and not include_deleted:
                    continue
                out.append(_record(state))
                if limit is not None and len(out) >= limit:
                    break
            return out

        return self._read(run)


def _record(state: ViewState) -> Record:
    return Record(collection=state.c, key=state.k, scope=state.s, fields=state.fields,
                  deleted=state.x, pending=state.p, version=state.q, conflicts=dict(state.cf),
                  sync=dict(state.sync_state()))


__all__ = ["Agent", "wall_ms"]
