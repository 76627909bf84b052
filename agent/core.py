"""Record-level operations inside one store transaction, shared by `api` and `sync`.

`Core` holds what every operation needs (store, device id, scopes, collection schema,
wall clock); `Core.write(fn)` runs `fn(work)` in one durable transaction, where `work`
(a `Work`) loads and saves base records, views, outbox entries, checkpoints and feed
events, and writes the cached counters back once at the end (bases, views and conflict
entries: the `agent.work_records` mixin).

Meta entries (database ``meta``, orjson values, plain text):

==========  ===============================================================
format      on-disk format version (`agent.store_format.FORMAT_VERSION`); migrated on open
enc         encryption check token (hex) or null
device      the device id this store belongs to
created     creation time, ms
inc         the store's current incarnation (PROTOCOL.md §2): random, created with the
            store; a new one after the server refused a reused change id (the store
            was restored from a backup or copied). Outbox entries record theirs ("i");
            entries without one were written before incarnations existed (legacy)
ctr         [next n, HLC wall, HLC counter, last feed seq]: read-modify-written
            inside every write transaction, so n stays gapless and stamps
            monotonic across processes
sv          collection-schema version the store's data is in: the one the agent last
            opened it with, or took from the server since (agent.schema_update)
schema      the schema version taken from the server (agent.schema_store)
schemas     the texts of the versions taken, to go back down (agent.schema_update)
gen         snapshot generation counter (§9.5)
cmds        ids of executed commands (newest 1,000)
last_sync   time (ms) of the last ack or completed catch-up
online      {"on": bool, "t": ms}: the daemon's heartbeat
creq        id of the last catch-up request
last_err    {"code", "reason", "t"}: the last message-level problem ("schema_version":
            upgrade needed, from the server's `welcome`)
sv_floor    [schema version, sv_min]: outbox entries older than sv_min were relabelled
            sv_min for that pair (`Sync.apply_schema_versions`)
wiped       {"t", "id", "key_destroyed"}: this store replaced one erased by a remote wipe
gone        {"t", "id"}: this store was erased by a remote wipe (its files are being
            replaced); every write is refused (`StoreGone`)
==========  ===============================================================
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson

from agent import schema_store, scopes
from agent.checkpoints import ScopeCheckpoint
from agent.errors import DeviceMismatch, StoreGone
from agent.journal import DEFAULT_LIMITS, Limits
from agent.store import Store, Tx, n_key, record_key
from agent.work_records import RecordWork, lost_key, open_conflict_key
from schemas.collection import Catalog, CollectionSpec
from waystation.hlc import Clock, Stamp

T = TypeVar("T")
_SCOPES_KEY = scopes.META_KEY.encode()

FEED_KEEP = 10_000
"""Feed events kept (the newest); older ones are pruned."""
_FEED_PRUNE_EVERY = 256
MAX_COMMAND_IDS = 1000

FeedKind = Literal["local", "synced", "rejected", "remote", "dropped", "reset", "wiped",
                   "conflict", "online", "offline", "retrying", "evicted", "fetched",
                   "quota", "server", "schema"]


def new_incarnation() -> str:
    """A fresh store incarnation id (PROTOCOL.md §2): 96 random bits, URL-safe base64."""
    return secrets.token_urlsafe(12)


def prio_key(priority: int, n: int) -> bytes:
    """Drain-order index key: higher priority first, then lower n."""
    return b"P" + ((2**31 - 1) - priority).to_bytes(4, "big") + n_key(n)


def rec_index_key(rk: bytes, n: int) -> bytes:
    return b"R" + rk + b"\0" + n_key(n)


@dataclass(frozen=True)
class Settings:
    """What the agent's record logic needs from its configuration."""

    device_id: str
    scopes: tuple[str, ...]
    catchup_page: int = 1000
    heartbeat_timeout_s: float = 65.0
    plaintext_indexes: bool = False
    """Keep indexes on an encrypted store (their keys are plain text; agent.query)."""
    schema_push: bool = True
    """Offer the `schema_push` capability (sync.schema_push; agent.schema_update)."""
    quota_bytes: int | None = None
    """The disk quota (storage.quota_bytes; agent.quota): local writes refused at it."""
    journal: Limits = DEFAULT_LIMITS
    """How long and how much of the acked changes to keep (agent.journal)."""


class Core:
    """Shared state of an open agent: store, settings, schema and clock."""

    def __init__(self, store: Store, settings: Settings, catalog: Catalog,
                 now_ms: Callable[[], int]) -> None:
        self.store = store
        self.settings = settings
        self.dev = settings.device_id
        self.scopes = settings.scopes
        """The scopes followed now: the config's, or the server's since a `scopes`
        command (`agent.scopes`); re-read at the start of every transaction, so every
        process on the store agrees."""
        self.catalog = catalog
        self.now_ms = now_ms
        self._scopes_seen: tuple[bytes | None, tuple[str, ...]] = (None, settings.scopes)
        """Meta `scopes` as last read (its stored bytes) and the scopes it gave."""

    def write(self, fn: Callable[[Work], T], *, durable: bool = True) -> T:
        """One write transaction; `durable=False` only for what the server replays
        (see Store.write)."""
        def run(tx: Tx) -> T:
            self._enter(tx, "nothing can be written to it; ")
            work = Work(self, tx)
            result = fn(work)
            work.finish()
            return result

        return self.store.write(run, durable=durable)

    def read(self, fn: Callable[[Work], T]) -> T:
        def run(tx: Tx) -> T:
            self._enter(tx, "")
            return fn(Work(self, tx))

        return self.store.read(run)

    def _enter(self, tx: Tx, refused: str) -> None:
        """What every transaction does first: refuse a wiped store, and take the scopes
        and the schema version another process may have switched the store to. Meta
        entries are compared as stored bytes with the last ones read (every write and
        read passes here: no JSON parse while they stay as they were)."""
        if tx.has("meta", b"gone"):
            raise StoreGone(f"the local store at {self.store.path} was wiped by the operator "
                            f"(remote wipe): {refused}open the agent again")
        raw = tx.raw("meta", _SCOPES_KEY)
        if raw != self._scopes_seen[0]:
            doc = None if raw is None else orjson.loads(raw)
            self._scopes_seen = (raw, scopes.effective(doc, self.settings.scopes))
        self.scopes = self._scopes_seen[1]  # (agent.scopes sets it inside its write too)
        sv = tx.raw("meta", b"sv")
        if sv is not None and sv != orjson.dumps(self.catalog.version):
            self._follow_schema(tx)  # (schema_store.follow: nothing to do at our version)

    def _follow_schema(self, tx: Tx) -> None:
        """Run the schema version another process took from the server (meta `sv`
        moved; agent.schema_update): every process on the store agrees, as for scopes."""
        taken = schema_store.follow(tx, self.catalog)
        if taken is not None:
            self.catalog = taken

    def claim_identity(self) -> None:
        """Bind a new store to this device id; refuse a store of another device."""

        def run(work: Work) -> None:
            tx = work.tx
            owner = tx.meta("device")
            if owner is None:
                tx.set_meta("device", self.dev)
                tx.set_meta("created", self.now_ms())
            if tx.meta("inc") is None:
                # A new store, or one from before incarnations (its outbox entries stay
                # in the legacy incarnation; what it writes from now on is in this one).
                tx.set_meta("inc", new_incarnation())
            elif owner != self.dev:
                raise DeviceMismatch(
                    f"the local store at {self.store.path} belongs to device {owner!r}, but "
                    f"the config says device_id = {self.dev!r}: fix device_id or use another "
                    "data_dir")
            if tx.meta("sv") != self.catalog.version:
                tx.set_meta("sv", self.catalog.version)

        self.write(run)

    def check_identity(self) -> None:
        """Read-only variant of `claim_identity` (for openers that must not write)."""
        owner = self.store.read(lambda tx: tx.meta("device"))
        if owner is not None and owner != self.dev:
            raise DeviceMismatch(
                f"the local store at {self.store.path} belongs to device {owner!r}, but the "
                f"config says device_id = {self.dev!r}: fix device_id or use another data_dir")

    def spec(self, collection: str) -> CollectionSpec | None:
        return self.catalog.collection(collection)


class Work(RecordWork):
    """One transaction's view of the agent's data (see module docstring)."""

    __slots__ = ("_checkpoints", "_ctr", "_ctr_dirty", "_gen", "_inc", "_now", "core", "dev",
                 "tx")

    def __init__(self, core: Core, tx: Tx) -> None:
        self.core = core
        self.tx = tx
        self.dev = core.dev
        self._ctr: list[int] | None = None
        self._ctr_dirty = False
        self._gen: int | None = None
        self._checkpoints: dict[str, tuple[ScopeCheckpoint, bool]] = {}
        self._now: int | None = None
        self._inc: str | None = None
        RecordWork.__init__(self)

    # --------------------------------------------------------------- counters

    def now(self) -> int:
        """The wall clock (ms), read once per transaction."""
        if self._now is None:
            self._now = self.core.now_ms()
        return self._now

    def _counters(self) -> list[int]:
        if self._ctr is None:
            self._ctr = list(self.tx.meta("ctr", [1, 0, 0, 0]))
        return self._ctr

    def next_n(self) -> int:
        """Allocate the next change number (gapless, never reused)."""
        ctr = self._counters()
        n = ctr[0]
        ctr[0] = n + 1
        self._ctr_dirty = True
        return n

    def peek_next_n(self) -> int:
        return self._counters()[0]

    def _clock(self) -> Clock:
        ctr = self._counters()
        return Clock(self.dev, self.now, ctr[1], ctr[2])

    def tick(self) -> Stamp:
        """A new HLC stamp for a local write (state persisted with this transaction)."""
        clock = self._clock()
        stamp = clock.tick()
        ctr = self._counters()
        ctr[1], ctr[2] = stamp.wall, stamp.counter
        self._ctr_dirty = True
        return stamp

    def observe(self, stamps: Iterable[str | None]) -> None:
        """Merge the latest of received full stamps into the HLC (§4 receiving)."""
        latest = max((s for s in stamps if s), default=None)
        if latest is None:
            return
        try:
            remote = Stamp.parse(latest)
        except ValueError:
            return
        clock = self._clock()
        clock.observe(remote)
        ctr = self._counters()
        ctr[1], ctr[2] = clock.state
        self._ctr_dirty = True

    def incarnation(self) -> str | None:
        """The store's current incarnation (None only for a store not yet claimed)."""
        if self._inc is None:
            self._inc = self.tx.meta("inc")
        return self._inc

    def new_incarnation(self) -> str:
        """Start a new incarnation: what is written from now on carries new change ids."""
        self._inc = new_incarnation()
        self.tx.set_meta("inc", self._inc)
        return self._inc

    def gen(self) -> int:
        """The current snapshot generation (recorded on every base record touched)."""
        if self._gen is None:
            self._gen = int(self.tx.meta("gen", 0))
        return self._gen

    def bump_gen(self) -> int:
        self._gen = self.gen() + 1
        self.tx.set_meta("gen", self._gen)
        return self._gen

    # ------------------------------------------------------------------- feed

    def feed(self, c: str, k: str, kind: FeedKind, data: dict[str, Any] | None = None) -> int:
        """Append a feed event `[c, k, kind]` (plus `data` when given: change ids, the
        rolled-back value, a link reason) in this transaction; returns its seq."""
        ctr = self._counters()
        seq = ctr[3] + 1
        ctr[3] = seq
        self._ctr_dirty = True
        self.tx.put("feed", n_key(seq), [c, k, kind] if data is None else [c, k, kind, data])
        if seq % _FEED_PRUNE_EVERY == 0 and seq > FEED_KEEP:
            cutoff = n_key(seq - FEED_KEEP)
            old: list[bytes] = []
            for key in self.tx.keys("feed"):
                if key >= cutoff:
                    break
                old.append(key)
            for key in old:
                self.tx.delete("feed", key)
        return seq

    # ------------------------------------------------------------ checkpoints

    def checkpoint(self, scope: str) -> ScopeCheckpoint:
        cached = self._checkpoints.get(scope)
        if cached is not None:
            return cached[0]
        state = ScopeCheckpoint.from_doc(self.tx.get("checkpoints", scope.encode()))
        self._checkpoints[scope] = (state, False)
        return state

    def set_checkpoint(self, scope: str, state: ScopeCheckpoint) -> None:
        self._checkpoints[scope] = (state, True)

    def finish(self) -> None:
        """Write back what was cached during the transaction."""
        for scope, (state, dirty) in self._checkpoints.items():
            if dirty:
                self.tx.put("checkpoints", scope.encode(), state.to_doc())
        if self._ctr_dirty and self._ctr is not None:
            self.tx.set_meta("ctr", self._ctr)
            self._ctr_dirty = False

    # ----------------------------------------------------------------- outbox

    def add_outbox(self, rk: bytes, n: int, change: dict[str, Any], priority: int,
                   sv: int) -> dict[str, Any]:
        entry = {"ch": change, "sv": sv, "t": self.now(), "p": priority, "at": 0, "err": None,
                 "i": self.incarnation()}
        nk = n_key(n)
        tx = self.tx
        tx.put("outbox", nk, entry)
        tx.put_raw("outbox_idx", b"P" + ((2**31 - 1) - priority).to_bytes(4, "big") + nk)
        tx.put_raw("outbox_idx", b"R" + rk + b"\0" + nk)  # prio_key, rec_index_key
        return entry

    def outbox_entry(self, n: int) -> dict[str, Any] | None:
        entry: dict[str, Any] | None = self.tx.get("outbox", n_key(n))
        return entry

    def remove_outbox(self, n: int, entry: Mapping[str, Any]) -> bytes:
        """Drop entry `n` and its index keys; returns the record key."""
        ch = entry["ch"]
        rk = record_key(ch["c"], ch["k"])
        nk = n_key(n)
        tx = self.tx
        tx.delete("outbox", nk)
        tx.delete("outbox_idx", b"P" + ((2**31 - 1) - entry["p"]).to_bytes(4, "big") + nk)
        tx.delete("outbox_idx", b"R" + rk + b"\0" + nk)  # prio_key, rec_index_key
        return rk

    def pending_changes(self, rk: bytes) -> list[dict[str, Any]]:
        """The record's pending changes (wire dicts), in n order."""
        out: list[dict[str, Any]] = []
        prefix = b"R" + rk + b"\0"
        keys: list[bytes] = []
        with self.tx.cursor("outbox_idx") as cur:
            if cur.set_range(prefix):
                key = cur.key()
                while key.startswith(prefix):
                    keys.append(key)
                    if not cur.next():
                        break
                    key = cur.key()
        for key in keys:
            entry = self.tx.get("outbox", key[-8:])
            if entry is not None:
                out.append(entry["ch"])
        return out


__all__ = [
    "FEED_KEEP",
    "Core",
    "FeedKind",
    "Settings",
    "Work",
    "lost_key",
    "new_incarnation",
    "open_conflict_key",
    "prio_key",
    "rec_index_key",
]
