"""The server store interface: what every backend (LMDB, PostgreSQL) provides.

A store is deliberately dumb. It keeps rows and hands them back; every algorithm
(applying a change, catch-up paging, purging tombstones, the registry) is written once,
against the transaction interfaces below, in the modules that use it. A backend only
provides transactions:

    store.read()            context manager -> ReadTxn (a consistent snapshot)
    store.transact(fn)      runs fn(WriteTxn) in ONE atomic, durable write transaction
                            and returns its result. The backend MAY run fn again after a
                            retryable failure (LMDB grows its map, PostgreSQL retries a
                            serialisation failure), so fn must keep its side effects
                            inside the transaction until it returns.

What is kept (all in the same transactional store):

    devices       id -> DeviceRow (scopes, enabled, created, last seen, agent, sv, z)
    registry gen  a counter bumped by every structural registry change (add, remove,
                  scopes, enable/disable) so another process notices cheaply
    records       (collection, key) -> merge.RecordState JSON
    sequences     scope -> last allocated q
    index         (scope, q) -> (collection, key), the newest version of each record
                  only: a compacted change log; catch-up reads it in q order
    tombstones    (scope, q) -> (collection, key, applied at): deleted records, for purging
    horizons      scope -> highest q of a purged tombstone
    outcomes      (namespace, n) -> applied (scope, q) or permanently rejected (code,
                  reason), with the digest of the change's content; the namespace is the
                  device id, plus "/incarnation" for stores with one
                  (`broker.server.identity.outcome_ns`)
    conflicts     id -> ConflictRow; open ones also indexed by (collection, key, field)
    dead letters  id -> DeadLetter (time, device, topic, code, reason, raw payload <= 64 KiB),
                  bounded by DeadLetterLimits (count, bytes, age); drops are counted
    commands      (device, id) -> CommandRow
    notices       id -> Notice: record versions written outside the merge consumer (the
                  operator's `server resolve`) that the running server must fan out

Rows are plain frozen dataclasses; records are the JSON-able dicts of
`merge.RecordState.to_json()` (the store never interprets them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

STORE_FORMAT = 1
"""Version of the stored layout; a store refuses to open another version."""

MAX_DEAD_LETTER_RAW = 64 * 1024
"""Raw payloads kept in a dead letter are truncated to this many bytes."""


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """One registered device."""

    id: str
    scopes: tuple[str, ...]
    enabled: bool = True
    created_ms: int = 0
    last_seen_ms: int = 0
    """When the server last received a valid message from it."""
    agent: str = ""
    sv: int = 0
    z: bool = False
    """The device accepts zlib-compressed messages (from its last hello)."""
    online: bool = False
    """Its retained status says online (as last seen by the running server)."""
    cp: dict[str, int] = field(default_factory=dict)
    """The checkpoints the device last reported (in `hello` or a catch-up request): what
    it held then."""
    pend: int = -1
    """Changes waiting in its outbox, from its last status (-1: unknown)."""
    cp_ms: int = 0
    """When it reported `cp`."""
    synced_ms: int = 0
    """When the server last acked one of its changes or completed a catch-up for it."""
    inc: str = ""
    """The incarnation of its store, from its last `hello` ("" none or legacy)."""
    inc_ms: int = 0
    """When the server first saw that incarnation."""
    incs: int = 0
    """How many store incarnations the server has seen for this id (a store re-created
    by re-imaging, a restored backup, a new data_dir ...)."""
    wipe_id: str = ""
    """The last wipe ordered for it (command id; "" never)."""
    wipe_ms: int = 0
    """When that wipe was ordered."""
    wipe_done_ms: int = 0
    """When the device reported it carried the wipe out (0: still pending)."""
    caps: tuple[str, ...] = ()
    """The optional protocol features agreed in its last `hello` (PROTOCOL.md §11):
    what the server may send it beyond protocol v1."""

    @property
    def wipe_pending(self) -> bool:
        return bool(self.wipe_id) and not self.wipe_done_ms

    @property
    def blocked(self) -> bool:
        """Gets no data and its changes wait: disabled, or a wipe it has not done yet."""
        return not self.enabled or self.wipe_pending

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "scopes": list(self.scopes), "enabled": self.enabled,
                "created": self.created_ms, "seen": self.last_seen_ms, "agent": self.agent,
                "sv": self.sv, "z": self.z, "online": self.online, "cp": self.cp,
                "pend": self.pend, "cp_ms": self.cp_ms, "synced": self.synced_ms,
                "inc": self.inc, "inc_ms": self.inc_ms, "incs": self.incs,
                "wipe": self.wipe_id, "wipe_ms": self.wipe_ms, "wipe_done": self.wipe_done_ms,
                "caps": list(self.caps)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceRow:
        return cls(id=data["id"], scopes=tuple(data["scopes"]), enabled=data["enabled"],
                   created_ms=data["created"], last_seen_ms=data["seen"],
                   agent=data["agent"], sv=data["sv"], z=data["z"],
                   online=data.get("online", False), cp=data.get("cp", {}),
                   pend=data.get("pend", -1), cp_ms=data.get("cp_ms", 0),
                   synced_ms=data.get("synced", 0), inc=data.get("inc", ""),
                   inc_ms=data.get("inc_ms", 0), incs=data.get("incs", 0),
                   wipe_id=data.get("wipe", ""), wipe_ms=data.get("wipe_ms", 0),
                   wipe_done_ms=data.get("wipe_done", 0),
                   caps=tuple(data.get("caps", ())))


@dataclass(frozen=True, slots=True)
class OutcomeRow:
    """What became of one change id: applied at (scope, q), or rejected for good."""

    c: str
    k: str
    scope: str = ""
    q: int = 0
    code: str = ""
    reason: str = ""
    d: str = ""
    """Digest of the change's content (`broker.server.identity.change_digest`); empty
    for outcomes stored before digests existed and for changes that did not parse."""

    @property
    def applied(self) -> bool:
        return not self.code


@dataclass(frozen=True, slots=True)
class ConflictRow:
    """One conflict-log entry: a concurrent value that lost, or an open manual conflict."""

    id: int
    created_ms: int
    c: str
    k: str
    s: str
    field: str
    entry: dict[str, Any]
    """`merge.ConflictEntry.to_json()`: winner, loser(s), stamps, devices."""
    open: bool
    closed_ms: int = 0
    resolution: str = ""
    """How it was closed: e.g. ``operator`` or ``device van-7 change 12``."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created_ms, "c": self.c, "k": self.k,
                "s": self.s, "field": self.field, "entry": self.entry, "open": self.open,
                "closed": self.closed_ms, "resolution": self.resolution}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConflictRow:
        return cls(id=data["id"], created_ms=data["created"], c=data["c"], k=data["k"],
                   s=data["s"], field=data["field"], entry=data["entry"], open=data["open"],
                   closed_ms=data["closed"], resolution=data["resolution"])


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Input the server refused (or accepted only after repair), kept for the operator."""

    id: int
    t_ms: int
    device: str
    """The device id of the topic it arrived on."""
    topic: str
    """Which topic kind: ``up`` or ``status``."""
    code: str
    reason: str
    raw: bytes
    """The payload as received, truncated to 64 KiB."""
    size: int = 0
    """The payload's full size in bytes."""


DEAD_LETTER_OVERHEAD = 64
"""Bytes counted per dead letter on top of its raw payload and texts."""


def dead_letter_bytes(letter: DeadLetter) -> int:
    """What one dead letter counts against `DeadLetterLimits.max_bytes` (every store
    counts the same way): the raw bytes kept, the texts, a fixed overhead."""
    return (min(len(letter.raw), MAX_DEAD_LETTER_RAW) + len(letter.reason.encode())
            + len(letter.device.encode()) + len(letter.code.encode())
            + len(letter.topic.encode()) + DEAD_LETTER_OVERHEAD)


@dataclass(frozen=True, slots=True)
class DeadLetterLimits:
    """How many dead letters a store keeps: the oldest go first beyond any bound."""

    max_count: int = 100_000
    max_bytes: int = 256 << 20
    """Total of `dead_letter_bytes` over the letters kept."""
    max_age_ms: int = 30 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class DeadLetterStats:
    """The dead letters a store holds, and what its bounds dropped so far."""

    count: int
    bytes: int
    """Total `dead_letter_bytes` of the letters kept."""
    truncated: int
    """Letters kept whose raw payload was cut (size > raw kept)."""
    oldest_ms: int
    """Time of the oldest letter kept (0: none)."""
    dropped: int
    """Letters dropped by the bounds since the store was created."""
    dropped_bytes: int

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "bytes": self.bytes, "truncated": self.truncated,
                "oldest_ms": self.oldest_ms, "dropped": self.dropped,
                "dropped_bytes": self.dropped_bytes}


@dataclass(frozen=True, slots=True)
class CommandRow:
    """An order for one device (`wipe`, `resync`, `ping`), pending until reported done."""

    id: str
    device: str
    cmd: str
    args: dict[str, Any] = field(default_factory=dict)
    created_ms: int = 0
    done_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "device": self.device, "cmd": self.cmd, "args": self.args,
                "created": self.created_ms, "done": self.done_ms}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CommandRow:
        return cls(id=data["id"], device=data["device"], cmd=data["cmd"], args=data["args"],
                   created_ms=data["created"], done_ms=data["done"])


@dataclass(frozen=True, slots=True)
class Notice:
    """A record version written outside the merge consumer, waiting to be fanned out."""

    id: int
    scope: str
    q: int
    rec: dict[str, Any]
    """The wire record state (§6) to send every online device of the scope."""


@dataclass(frozen=True, slots=True)
class Tomb:
    """A deleted record, candidate for purging once older than the retention."""

    scope: str
    q: int
    c: str
    k: str
    t_ms: int


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """Where the store is and how big it is."""

    kind: str
    location: str
    size_bytes: int
    """Bytes the store occupies on disk (or in the database)."""
    capacity_bytes: int
    """Current size limit (LMDB map size); 0 when the backend has none."""
    counts: dict[str, int]
    """Entries per table: records, devices, outcomes, conflicts, open_conflicts,
    dead_letters, commands, notices, tombstones."""


class ReadTxn(Protocol):
    """A consistent, read-only view of the store."""

    # registry
    def registry_generation(self) -> int: ...
    def get_device(self, dev: str) -> DeviceRow | None: ...
    def devices(self) -> list[DeviceRow]: ...

    # records and the per-scope log
    def get_record(self, c: str, k: str) -> dict[str, Any] | None: ...
    def records_after(self, c: str | None, after: tuple[str, str] | None, limit: int
                      ) -> list[tuple[str, str, dict[str, Any]]]:
        """Up to `limit` (collection, key, state) in (collection, key) order (byte-wise),
        after `after` (None: from the start), only of collection `c` unless it is None:
        operator tools page through the records with it."""
        ...
    def scope_seq(self, scope: str) -> int: ...
    def scope_seqs(self) -> dict[str, int]: ...
    def purge_horizon(self, scope: str) -> int: ...
    def index_range(self, scope: str, after_q: int, limit: int) -> list[tuple[int, str, str]]:
        """Up to `limit` (q, collection, key) of `scope` with q > after_q, in q order."""
        ...
    def tombs(self, scope: str, limit: int) -> list[Tomb]:
        """The oldest (lowest q) `limit` tombstones of `scope`."""
        ...

    # outcomes (keyed by namespace: the device id, or "device/incarnation")
    def get_outcome(self, ns: str, n: int) -> OutcomeRow | None: ...

    # conflicts
    def get_conflict(self, cid: int) -> ConflictRow | None: ...
    def conflicts(self, *, open_only: bool, limit: int) -> list[ConflictRow]:
        """Newest first."""
        ...
    def open_conflicts_on(self, c: str, k: str, fname: str) -> list[int]:
        """Ids of the open conflicts on one field of one record."""
        ...

    # dead letters, commands, notices
    def dead_letters(self, limit: int) -> list[DeadLetter]:
        """Newest first."""
        ...
    def dead_letter_stats(self) -> DeadLetterStats: ...
    def get_dead_letter(self, lid: int) -> DeadLetter | None: ...
    def commands(self, dev: str | None = None) -> list[CommandRow]:
        """Every command (of one device, or of all), oldest first."""
        ...
    def notices(self, limit: int) -> list[Notice]:
        """Oldest first."""
        ...

    def counts(self) -> dict[str, int]:
        """Entries per table (see StoreInfo.counts)."""
        ...


class WriteTxn(ReadTxn, Protocol):
    """A read-write transaction: every write commits together or not at all.

    Isolation a backend must give (LMDB has one writer at a time, so it gets it for
    free; a PostgreSQL backend with several consumers must do it explicitly):
    `scope_seq` / `allocate_seq` hold the scope's sequence until commit (row lock), so
    sequences stay gapless and no lower q becomes visible after a higher one;
    `get_record` locks the record (or the scope it lives in); `put_outcome` of a change
    id that a concurrent transaction committed first must fail the transaction as
    retryable (unique key), and `transact` then runs fn again, which finds the outcome
    and answers it as a duplicate. Within one transaction, reads see its own writes.
    """

    def lock_scopes(self, scopes: Iterable[str]) -> None:
        """Take the locks of these scopes' sequences now, in a fixed (sorted) order.

        A hint: `scope_seq` / `allocate_seq` lock a scope anyway when first used; taking
        a batch's scopes up front keeps concurrent consumers from deadlocking on them and
        makes the reads that follow (outcomes, records) current. LMDB: nothing to do.
        """
        ...

    def prefetch(self, ns: str, numbers: Iterable[int],
                 keys: Iterable[tuple[str, str]]) -> None:
        """A hint: the outcomes of change numbers `numbers` in namespace `ns` and the
        records `keys` are about to be read (a backend with round trips fetches them at
        once). LMDB: no-op.
        """
        ...

    # registry
    def put_device(self, row: DeviceRow) -> None: ...
    def delete_device(self, dev: str) -> bool: ...
    def bump_registry(self) -> int: ...

    # records and the per-scope log
    def put_record(self, c: str, k: str, state: dict[str, Any] | bytes) -> None:
        """Store a record state: the JSON-able dict, or its JSON text already encoded."""
        ...
    def delete_record(self, c: str, k: str) -> None: ...
    def allocate_seq(self, scope: str) -> int:
        """The next q of `scope` (last + 1), recorded as allocated."""
        ...
    def index_move(self, scope: str, old_q: int, new_q: int, c: str, k: str) -> None:
        """The record's newest version moves from `old_q` (0: new record) to `new_q`."""
        ...
    def index_delete(self, scope: str, q: int) -> None: ...
    def set_purge_horizon(self, scope: str, q: int) -> None: ...
    def jump_scope_seq(self, scope: str, q: int) -> None:
        """Move the scope's sequence forward to `q` (after a restore; never backwards)."""
        ...
    def put_tomb(self, tomb: Tomb) -> None: ...
    def delete_tomb(self, scope: str, q: int) -> None: ...

    # outcomes
    def put_outcome(self, ns: str, n: int, outcome: OutcomeRow) -> None: ...
    def delete_outcomes(self, dev: str) -> int:
        """Forget every outcome of a device, every incarnation's (it is removed);
        returns how many."""
        ...

    # conflicts
    def add_conflict(self, row: ConflictRow) -> int:
        """Store `row` under a new id (its `id` is ignored); returns the id."""
        ...
    def close_conflict(self, cid: int, closed_ms: int, resolution: str) -> bool:
        """Mark an open conflict closed; False if it is unknown or already closed."""
        ...

    # dead letters, commands, notices
    def add_dead_letter(self, letter: DeadLetter) -> int:
        """Store `letter` under a new id (raw truncated to 64 KiB; the oldest letters are
        dropped beyond the store's count limit, and in LMDB its byte and age limits too,
        `letter.t_ms` being now); returns the id."""
        ...
    def trim_dead_letters(self, now_ms: int) -> int:
        """Drop the oldest letters beyond every bound of the store's `DeadLetterLimits`
        (count, bytes, age at `now_ms`), counting them as dropped; returns how many."""
        ...
    def delete_dead_letter(self, lid: int) -> bool:
        """Remove one letter (the operator retried or discarded it; not counted as
        dropped by the bounds); False if there is none with that id."""
        ...
    def delete_dead_letters_of(self, dev: str) -> int:
        """Remove every letter of device `dev` (as `delete_dead_letter`); how many."""
        ...
    def put_command(self, row: CommandRow) -> None: ...
    def delete_commands(self, dev: str) -> int: ...
    def add_notice(self, notice: Notice) -> int: ...
    def delete_notice(self, nid: int) -> None: ...


class Store(Protocol):
    """A backend: transactions over the tables above."""

    kind: str

    def read(self) -> AbstractContextManager[ReadTxn]: ...
    def transact(self, fn: Callable[[WriteTxn], T]) -> T: ...
    def info(self) -> StoreInfo: ...
    def close(self) -> None: ...


def iter_all_index(txn: ReadTxn, scope: str, page: int = 1000) -> Iterator[tuple[int, str, str]]:
    """Every (q, collection, key) of `scope` in q order (helper for tools and tests)."""
    after = 0
    while True:
        chunk = txn.index_range(scope, after, page)
        yield from chunk
        if len(chunk) < page:
            return
        after = chunk[-1][0]


__all__ = [
    "DEAD_LETTER_OVERHEAD",
    "MAX_DEAD_LETTER_RAW",
    "STORE_FORMAT",
    "CommandRow",
    "ConflictRow",
    "DeadLetter",
    "DeadLetterLimits",
    "DeadLetterStats",
    "DeviceRow",
    "Notice",
    "OutcomeRow",
    "ReadTxn",
    "Store",
    "StoreInfo",
    "Tomb",
    "WriteTxn",
    "dead_letter_bytes",
    "iter_all_index",
]
