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
class DeadLetter:
    """A local change the server refused for good; rolled back locally, kept here."""

    n: int
    change_id: str
    code: str
    reason: str
    rejected_ms: int
    created_ms: int
    change: dict[str, Any]
    transaction: str | None = None
    """The change id of its transaction's first change (docs/TRANSACTIONS.md), if any."""

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
    truncated (events before `seq` were pruned unseen), evicted (removed by retention),
    fetched (brought back by a fetch; `missing: true` when the server holds nothing for
    it); connectivity, with an empty collection: online, offline, retrying (at most every
    10 minutes while an outage goes on unchanged: `agent.link_feed`); quota (the
    disk quota was reached or left: `limit`, `used`, `reached`); server (the merge server
    group went down or came back: `group`, `up`, `since_ms`); schema (another schema
    version was taken: `from`, `to`).

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
        "Conflict",
    "DeadLetter",
    "FeedEvent",
    "Record",
    "WriteResult",
    "WriteState",
]
