"""The local API's request and response bodies: pydantic models, the one source of both
the request checks and the OpenAPI document (`agent.http.openapi`).

Responses are built from the Python API's values (`agent.models`, `to_dict()`); the
response models here describe them, and the tests check every response against them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.validate import MAX_PRIORITY, MIN_PRIORITY

Priority = Annotated[int, Field(strict=True, ge=MIN_PRIORITY, le=MAX_PRIORITY,
                                description="Higher drains first (default 0)")]
JsonValue = Any


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------ requests


class PutBody(_Body):
    """Set lww/manual fields of a record (others stay); creating a record, include its
    scope field."""

    fields: Annotated[dict[str, JsonValue], Field(min_length=1)]
    priority: Priority = 0


class IncrementBody(_Body):
    """Add `amount` (not 0; negative subtracts) to a counter field."""

    field: Annotated[str, Field(strict=True, min_length=1, max_length=200)]
    amount: Annotated[int, Field(strict=True)] | Annotated[float, Field(strict=True)]
    priority: Priority = 0


class MembersBody(_Body):
    """Members to add to, or remove from, a set field."""

    field: Annotated[str, Field(strict=True, min_length=1, max_length=200)]
    members: Annotated[list[Annotated[str, Field(strict=True)]], Field(min_length=1)]
    priority: Priority = 0


class ResolveBody(_Body):
    """The value that settles a manual field's open conflict."""

    value: JsonValue
    priority: Priority = 0


class DeleteBody(_Body):
    """Optional body of a delete."""

    priority: Priority = 0


# ----------------------------------------------------------------- responses


class Error(_Out):
    """Every error: the HTTP status again, a stable code, and what to do."""

    status: int
    code: str
    message: str


class WriteResultOut(_Out):
    """A local write: saved locally and pending sync (never "synced": only the server's
    ack makes it so, and the feed says when), or "unchanged" (nothing to write)."""

    collection: str
    key: str
    scope: str
    state: Literal["pending", "unchanged"]
    n: int | None
    change_id: str | None
    stamp: str | None
    message: str


class RecordOut(_Out):
    """A record as this device sees it: the server's base with pending changes on top."""

    collection: str
    key: str
    scope: str
    fields: dict[str, JsonValue]
    deleted: bool
    pending: int
    version: int
    conflicts: dict[str, list[dict[str, JsonValue]]]
    sync: dict[str, Literal["synced", "pending", "conflict"]]


class RecordList(_Out):
    records: list[RecordOut]


class LinkOut(_Out):
    """The sync loop's last recorded connectivity change (absent before the first)."""

    state: Literal["online", "offline", "retrying"]
    code: str
    reason: str
    hint: str = ""
    """What to check, in words (e.g. "the broker refused the login: check ...")."""
    t: int
    retry_in_s: float | None = None
    """Seconds until the next connection attempt (when retrying)."""
    since_ms: int | None = None
    """Since when the link is not online (kept across retries and the daemon's
    restarts); null: not recorded (a store from an earlier release)."""


class StatusOut(_Out):
    """Online state, pending count and age, last sync, dead letters, conflicts, and
    whether the sync loop runs."""

    device_id: str
    online: bool
    pending: int
    oldest_pending_age_s: float | None
    last_sync_age_s: float | None
    last_sync_ms: int | None
    dead_letters: int
    open_conflicts: int
    lost_writes: int
    checkpoints: dict[str, int]
    gaps: list[str]
    snapshots: list[str]
    heartbeat_age_s: float | None
    last_error: dict[str, JsonValue] | None
    next_n: int
    schema_version: int
    summary: str
    link: LinkOut | None
    """Why the sync loop is not connected; null while connected."""
    sync_running: bool
    agent_running: bool | None
    """The agent service (or a sync daemon) is running on this store."""
    store_path: str
    incarnation: str | None
    wiped: dict[str, JsonValue] | None
    """Set when this store replaced one the operator wiped: {t, id, key_destroyed}."""
    deferred: list[DeferralOut]
    """What the sync policy holds back and why (empty: nothing)."""
    sync_now_until_ms: int | None
    """An explicit "sync now" lifts the device's policy until then."""
    server: dict[str, JsonValue] | None
    """The merge server group: {group, up (null: never announced), down_since_ms,
    up_since_ms}."""
    quota: QuotaOut | None
    """The disk quota (storage.quota_bytes); null without one."""
    evicted: int
    """Records evicted by retention; POST /v1/fetch brings them back."""
    fetching: int
    """Records asked back from the server, not answered yet."""
    fetch_queries: int
    """Queries asked of the server (fetch by query), not answered yet."""
    journal: dict[str, int]
    """Acked changes kept for a server restored from a backup: {changes, bytes}."""
    disk_free_bytes: int | None = None
    """Free bytes on the filesystem holding the store (null: unknown); under 4 MiB the
    summary says writes (local and synced) may fail with storage_full."""
    replayed: dict[str, JsonValue] | None
    """What the latest resync after a server restore sent again: {t, id, changes,
    units_skipped, scopes}; null: none seen."""
    client_cert: dict[str, JsonValue] | None = None
    """The client certificate the agent connects with (`[mqtt.tls]` cert_file): {expires,
    expires_ms, renew_before_days, renewal_under_way, ...}; null: none configured. The
    same as `agent status --json`."""


class QuotaOut(_Out):
    """The device's disk quota: while `reached`, local writes answer 507 quota_reached
    and syncing goes on."""

    limit: int
    used: int
    """Bytes of the store's pages holding data."""
    reached: bool


class DeferralOut(_Out):
    """One reason the sync policy holds work back (docs/agent-api.md, "Sync policy")."""

    code: Literal["server_unavailable", "window_closed", "metered", "budget_spent",
                  "battery_low"]
    reason: str
    lanes: list[Literal["records", "files", "telemetry"]]
    """The lanes it holds (records: the outbox; files and telemetry: later)."""
    until_ms: int | None
    """When it ends by itself, if known (a window opens, the budget's day ends)."""
    since_ms: int | None


class SyncNowOut(_Out):
    requested_ms: int
    sync_running: bool
    """A sync loop runs and was told (else it honours the request when it starts
    within `policy.sync_now_s`)."""
    pending: int
    deferred: list[DeferralOut]
    """What still holds work back (an announced-down server does, sync now or not)."""


class ConflictOut(_Out):
    kind: Literal["lost", "open"]
    collection: str
    key: str
    scope: str
    field: str
    value: JsonValue
    stamp: str | None
    candidates: list[dict[str, JsonValue]]
    seen_ms: int
    change_id: str | None


class ConflictList(_Out):
    conflicts: list[ConflictOut]


class DeadLetterOut(_Out):
    n: int
    change_id: str
    code: str
    reason: str
    rejected_ms: int
    created_ms: int
    change: dict[str, JsonValue]
    transaction: str | None = None
    """The change id of the transaction's first change when this change was written in
    a transaction: its changes are rejected, and listed, together."""


class DeadLetterList(_Out):
    dead_letters: list[DeadLetterOut]


class Discarded(_Out):
    n: int
    discarded: Literal[True]


class FeedEventOut(_Out):
    """One feed event (also the `data:` of a Server-Sent Event, whose `id:` is `seq`).

    kind: local, synced, rejected, remote, conflict, dropped, reset, wiped, truncated,
    evicted (retention), fetched (brought back; data `missing`); with an empty
    collection: online, offline, retrying (connectivity), quota (limit, used, reached),
    server (group, up, since_ms: the merge servers went down or came back), schema
    (from, to: another schema version taken). More kinds may come: skip unknown ones."""

    seq: int
    collection: str
    key: str
    kind: str
    data: dict[str, JsonValue]


class FeedPage(_Out):
    """Events after `since`, oldest first; `last` is where to continue from."""

    events: list[FeedEventOut]
    last: int


__all__ = [
    "ConflictList",
    "ConflictOut",
    "DeadLetterList",
    "DeadLetterOut",
    "DeleteBody",
    "Discarded",
    "Error",
    "FeedEventOut",
    "FeedPage",
    "IncrementBody",
    "LinkOut",
    "MembersBody",
    "PutBody",
    "QuotaOut",
    "RecordList",
    "RecordOut",
    "ResolveBody",
    "StatusOut",
    "WriteResultOut",
]
