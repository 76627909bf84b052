"""The values the agent's API returns to apps: plain frozen dataclasses.

Each has `to_dict()` giving a JSON-ready dict (the CLI's ``--json`` output).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

WriteState = Literal["pending", "unchanged"]


@dataclass(frozen=True)
class WriteResult:
    """The outcome of a local write.

    `state` is "pending": saved locally and waiting to sync (never "synced": only the
    server's ack makes a change synced), or "unchanged": nothing to write (e.g. removing
    a member the set does not hold), so no change was made.
    """

    collection: str
    key: str
    scope: str
    state: WriteState
    n: int | None = None
    change_id: str | None = None
    stamp: str | None = None

    @property
    def message(self) -> str:
        if self.state == "unchanged":
            return f"{self.collection}/{self.key}: nothing to change"
        return f"saved locally (change {self.change_id}), pending sync"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "message": self.message}


@dataclass(frozen=True)
class Record:
    """A record as this device sees it: the server's base with pending changes on top."""

    collection: str
    key: str
    scope: str
    fields: dict[str, Any]
    deleted: bool = False
    pending: int = 0
    """Local changes to this record waiting for the server."""
    version: int = 0
    """The server version of the base (0: not confirmed by the server yet)."""
    conflicts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Manual fields with an open conflict -> the concurrent candidates {v, by, h}."""
    sync: dict[str, str] = field(default_factory=dict)
    """Per field: "synced", "pending" (a local change waits) or "conflict"."""

    @property
    def synced(self) -> bool:
        return self.pending == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AgentStatus:
    """The agent's sync state, as people need it (`waystation agent status`)."""

    device_id: str
    online: bool
    """The daemon reported itself connected and its heartbeat is fresh."""
    pending: int
    """Changes in the outbox (saved locally, not yet acked by the server)."""
    oldest_pending_age_s: float | None
    last_sync_age_s: float | None
    last_sync_ms: int | None
    dead_letters: int
    open_conflicts: int
    lost_writes: int
    checkpoints: dict[str, int]
    gaps: list[str]
    """Scopes with a sequence gap waiting for a catch-up."""
    snapshots: list[str]
    """Scopes being re-downloaded from a snapshot."""
    heartbeat_age_s: float | None
    last_error: dict[str, Any] | None
    next_n: int
    schema_version: int

    def summary(self) -> str:
        """One line: "online, 0 pending, last sync 3 s ago" and the like."""
        last = ("never synced" if self.last_sync_age_s is None
                else f"last sync {_age(self.last_sync_age_s)} ago")
        if self.online:
            text = f"online, {self.pending} pending, {last}"
        elif self.pending:
            noun = "change" if self.pending == 1 else "changes"
            text = (f"offline — {self.pending} {noun} saved locally, waiting for connection; "
                    f"oldest {_age(self.oldest_pending_age_s or 0)}; {last}")
        else:
            text = f"offline — nothing pending; {last}"
        extras = []
        if self.dead_letters:
            extras.append(f"{self.dead_letters} dead letter{'s' if self.dead_letters != 1 else ''}")
        if self.open_conflicts:
            extras.append(f"{self.open_conflicts} open conflict"
                          f"{'s' if self.open_conflicts != 1 else ''}")
        if extras:
            text += "; " + ", ".join(extras)
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


@dataclass(frozen=True)
class DeadLetter:
    """A local change the server refused for good; rolled back locally, kept here."""

    n: int
    change_id: str
    code: str
    reason: str
    rejected_ms: int
    created_ms: int
    change: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Conflict:
    """A conflict this device has seen.

    kind "lost": one of its own lww writes lost to a concurrent write (winner kept by
    the server, both values in the server's conflict log). kind "open": a manual field
    of a record it holds has an open conflict waiting for a person.
    """

    kind: Literal["lost", "open"]
    collection: str
    key: str
    scope: str
    field: str
    value: Any
    """The value that stands now (the winner, or the manual field's kept value)."""
    stamp: str | None
    candidates: list[dict[str, Any]]
    """open: the concurrent values {v, by, h}; lost: this device's losing value."""
    seen_ms: int
    change_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FeedEvent:
    """A change to a local record: `kind` says what happened.

    local (a local write), synced (acked), rejected (rolled back), remote (from the
    server), conflict (a manual field's conflict opened), dropped (removed by a
    snapshot), reset (every view recomputed: resync), wiped (everything erased),
    truncated (events before `seq` were pruned unseen); connectivity, with an empty
    collection: online, offline, retrying.

    `data` says more where there is more: `change_ids` (local, synced, rejected), `code`,
    `reason` and the rolled-back `fields` (rejected), `field` and `candidates`
    (conflict), `code`, `reason` and `retry_in_s` (offline, retrying).
    """

    seq: int
    collection: str
    key: str
    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{round(seconds)} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{round(seconds / 3600)} h"
    return f"{round(seconds / 86400)} d"


__all__ = [
    "AgentStatus",
    "Conflict",
    "DeadLetter",
    "FeedEvent",
    "Record",
    "WriteResult",
    "WriteState",
]
