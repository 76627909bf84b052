"""The rows a server store keeps and hands back: plain frozen dataclasses with their
JSON forms, and the dead letters' size accounting and bounds. The table layout they fill
is described in `broker.server.store.base`, which re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    """Changes waiting in its outbox, from its last status that said (-1: unknown)."""
    pend_ms: int = 0
    """When the device reported `pend` (its clock, at most the server's; 0: unknown)."""
    pend_old_ms: int = 0
    """When its oldest waiting change was written, by that report (0: none, unknown)."""
    dl: int = -1
    """Dead letters on the device (refused for good, for a person), by its last report
    that said (-1: unknown)."""
    cp_ms: int = 0
    """When it reported `cp`."""
    clk: int = 0
    """How far its clock is from the server's (ms, + ahead, - behind; 0 within
    `merge.max_skew_ms`), from its live statuses (`broker.server.clockskew`)."""
    clk_ms: int = 0
    """When the server last measured `clk` (0: never)."""
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
    rot: dict[str, Any] = field(default_factory=dict)
    """Its latest broker password rotation (`broker.server.rotation.Rotation` as JSON;
    empty: never rotated)."""
    crt: dict[str, Any] = field(default_factory=dict)
    """Its latest client-certificate renewal and the expiry of the certificate it last
    connected with (`broker.server.cert_renewal.Renewal` as JSON; empty: none known)."""

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
                "pend": self.pend, "pend_ms": self.pend_ms, "pend_old": self.pend_old_ms,
                "dl": self.dl, "cp_ms": self.cp_ms, "clk": self.clk, "clk_ms": self.clk_ms,
                "synced": self.synced_ms, "inc": self.inc, "inc_ms": self.inc_ms, "incs": self.incs,
                "wipe": self.wipe_id, "wipe_ms": self.wipe_ms, "wipe_done": self.wipe_done_ms,
                "caps": list(self.caps), "rot": self.rot, "crt": self.crt}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceRow:
        return cls(id=data["id"], scopes=tuple(data["scopes"]), enabled=data["enabled"],
                   created_ms=data["created"], last_seen_ms=data["seen"],
                   agent=data["agent"], sv=data["sv"], z=data["z"],
                   online=data.get("online", False), cp=data.get("cp", {}),
                   pend=data.get("pend", -1), pend_ms=data.get("pend_ms", 0),
                   pend_old_ms=data.get("pend_old", 0), dl=data.get("dl", -1),
                   cp_ms=data.get("cp_ms", 0), clk=data.get("clk", 0),
                   clk_ms=data.get("clk_ms", 0),
                   synced_ms=data.get("synced", 0), inc=data.get("inc", ""),
                   inc_ms=data.get("inc_ms", 0), incs=data.get("incs", 0),
                   wipe_id=data.get("wipe", ""), wipe_ms=data.get("wipe_ms", 0),
                   wipe_done_ms=data.get("wipe_done", 0),
                   caps=tuple(data.get("caps", ())), rot=data.get("rot") or {},
                   crt=data.get("crt") or {})


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
class SchemaVersionRow:
    """One published collection-schema version (the TOML text, migrations included)."""

    version: int
    published_ms: int
    source: str
    """The file it was published from (for the operator)."""
    text: str
    rolled_back_ms: int = 0
    """When it was rolled back (0: live). A rolled-back number is never reused."""

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "published": self.published_ms,
                "source": self.source, "text": self.text,
                "rolled_back": self.rolled_back_ms}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SchemaVersionRow:
        return cls(version=data["version"], published_ms=data["published"],
                   source=data["source"], text=data["text"],
                   rolled_back_ms=data.get("rolled_back", 0))


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
class LoginRemoval:
    """The broker login of a removed device that the server still has to delete
    (RabbitMQ: `broker.server.login_removal`); at most one per device id."""

    device: str
    id: str
    """Tells this removal from a later one of the same id (enrolled and removed again)."""
    queued_ms: int
    failed_ms: int = 0
    """When the deletion last failed (0: not yet); `error` and `hint` say why and how
    to delete the login by hand."""
    error: str = ""
    hint: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "id": self.id, "queued": self.queued_ms,
                "failed": self.failed_ms, "error": self.error, "hint": self.hint}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoginRemoval:
        return cls(device=data["device"], id=data["id"], queued_ms=data["queued"],
                   failed_ms=data["failed"], error=data["error"], hint=data["hint"])


@dataclass(frozen=True, slots=True)
class ServerRow:
    """A merge server's liveness, one per `server_id` (`broker.server.liveness`): written
    when it starts, every few seconds while it runs, and when it stops cleanly, so the
    operator's `server status` can tell a running server from a stopped or crashed one."""

    id: str
    group: str
    version: str
    started_ms: int
    seen_ms: int
    """The last time it recorded itself (every `liveness.SEEN_EVERY_MS` at most)."""
    stopped_ms: int = 0
    """When it stopped cleanly (0: running, or died without stopping)."""
    broker_down_ms: int = 0
    """Since when it has not been connected to its broker while running (0: connected,
    or not known: an earlier release)."""
    proc: str = ""
    """Which process on which host it is (`broker.server.process_identity`; "": not
    known, an earlier release or not Linux)."""
    store_failing_ms: int = 0
    """Since when its store refuses its writes (0: they go through, or an earlier
    release)."""
    store_error: str = ""
    """The latest such refusal, as the store said it ("" when none)."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "group": self.group, "version": self.version,
                "started": self.started_ms, "seen": self.seen_ms, "stopped": self.stopped_ms,
                "broker_down": self.broker_down_ms, "proc": self.proc,
                "store_failing": self.store_failing_ms, "store_error": self.store_error}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerRow:
        return cls(id=data["id"], group=data["group"], version=data["version"],
                   started_ms=data["started"], seen_ms=data["seen"],
                   stopped_ms=data["stopped"], broker_down_ms=data.get("broker_down", 0),
                   proc=str(data.get("proc", "")),
                   store_failing_ms=data.get("store_failing", 0),
                   store_error=str(data.get("store_error", "")))


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


__all__ = [
    "DEAD_LETTER_OVERHEAD",
    "MAX_DEAD_LETTER_RAW",
    "CommandRow",
    "ConflictRow",
    "DeadLetter",
    "DeadLetterLimits",
    "DeadLetterStats",
    "DeviceRow",
    "LoginRemoval",
    "Notice",
    "OutcomeRow",
    "SchemaVersionRow",
    "ServerRow",
    "StoreInfo",
    "Tomb",
    "dead_letter_bytes",
]
