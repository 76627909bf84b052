"""The device agent's config model (`waystation agent ...`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import (
    AfterValidator,
    Field,
    model_validator,
)

from waystation.config.common import (
    Bool,
    CompressOver,
    DeviceId,
    LogConfig,
    MqttConfig,
    Port,
    PositiveInt,
    ScopeId,
    Seconds,
    _example_schema,
    _Model,
    _no_duplicates,
    default_device_id,
)
from waystation.config.policy import PolicyConfig

# ------------------------------------------------------------------------ the agent

class SyncConfig(_Model):
    """How the agent drains its outbox and follows the server."""

    batch_max_changes: Annotated[int, Field(strict=True, ge=1, le=1000)] = 500
    batch_max_bytes: Annotated[int, Field(strict=True, ge=1024, le=262144)] = 131072
    ack_timeout_s: Seconds = 10.0
    """Changes and catch-ups unanswered this long are sent again: the least wait (changes
    wait twice as long as the server's last answer took, agent.answer_wait). A catch-up
    counts it from the last bytes the link delivered (agent.link_progress): on 2G a
    192 KiB page takes a minute to arrive, and this default then still holds."""
    max_inflight_changes: PositiveInt = 5000
    backoff_initial_s: Seconds = 0.5
    backoff_max_s: Seconds = 60.0
    compress_over_bytes: CompressOver = 512
    status_interval_s: Seconds = 30.0
    gap_timeout_s: Seconds = 5.0
    hung_after_s: Annotated[float, Field(strict=True, ge=2, le=3600)] = 60.0
    """The agent service kills its sync process and starts another when it has given no
    sign of life for this long (a beat a second from its main loop): stopped (SIGSTOP,
    a debugger), stuck in a call on a stalled disk, its interpreter wedged. Its own
    check catches a stuck sync loop inside a running process; this one a process that
    does not run at all, which would otherwise never be restarted (the service, alive,
    keeps feeding systemd's watchdog)."""
    deaf_after_s: Annotated[float, Field(strict=True, ge=1, le=3600)] = 60.0
    """A catch-up or a batch of changes unanswered this long, with nothing at all from
    the server while one is announced up, means the connection is deaf (the broker
    delivers nothing on it): the agent reconnects (agent.daemon_deaf). Doubles after
    each reconnect that heals nothing, up to 15 minutes."""
    catchup_page: Annotated[int, Field(strict=True, ge=1, le=5000)] = 1000
    poll_interval_s: Annotated[float, Field(strict=True, gt=0, le=60)] = 0.1
    schema_push: Bool = True
    """Take new collection-schema versions from the server (capability `schema_push`,
    PROTOCOL.md §7.13). false: the device runs its schema file and is upgraded by hand,
    e.g. when the app on it must change with the schema."""
    acked_journal_days: Annotated[float, Field(strict=True, ge=0, le=365)] = 7.0
    """Keep acked changes this long (agent.journal, PROTOCOL.md §9.7), so that a server
    restored from a backup gets back what it acked after the backup. 0: no journal."""
    acked_journal_max_mb: Annotated[int, Field(strict=True, ge=1, le=4096)] = 32
    """At most this much journal; the oldest acked changes go first beyond it."""

    @model_validator(mode="after")
    def _ordered(self) -> SyncConfig:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) is below "
                             f"backoff_initial_s ({self.backoff_initial_s})")
        if self.max_inflight_changes < self.batch_max_changes:
            raise ValueError(f"max_inflight_changes ({self.max_inflight_changes}) is below "
                             f"batch_max_changes ({self.batch_max_changes})")
        return self


class RetentionConfig(_Model):
    """How the agent evicts synced records the schema declares evictable
    (`[collections.NAME.retention]`, schemas.retention); agent.evict."""

    enabled: Bool = True
    interval_s: Annotated[float, Field(strict=True, gt=0, le=86_400)] = 60.0
    """Between eviction passes (a pass runs at once while the quota is reached)."""
    batch: Annotated[int, Field(strict=True, ge=1, le=10_000)] = 200
    """Records examined per LMDB write transaction (bounded work per commit)."""


class StorageConfig(_Model):
    """The agent's LMDB environment; optional encryption at rest."""

    map_size_mb: PositiveInt = 64
    max_map_size_mb: PositiveInt = 4096
    encryption_key_file: Path | None = None
    plaintext_indexes: bool = False
    """On an encrypted store, keep the schema's indexes anyway, although their keys hold
    the indexed fields' values in plain text (without it: no indexes, and queries that
    need one are refused saying why). No effect on an unencrypted store."""

    quota_bytes: Annotated[int, Field(strict=True, ge=1 << 20)] | None = None
    """The device's disk quota: at or over it, local writes are refused (`QuotaReached`),
    syncing goes on, and retention evicts evictable records before their time
    (agent.quota). Measured as the pages holding data (falls when records go)."""

    @model_validator(mode="after")
    def _sizes(self) -> StorageConfig:
        if self.max_map_size_mb < self.map_size_mb:
            raise ValueError(f"max_map_size_mb ({self.max_map_size_mb}) is below "
                             f"map_size_mb ({self.map_size_mb})")
        if self.quota_bytes is not None and self.quota_bytes > self.max_map_size_mb << 20:
            raise ValueError(f"quota_bytes ({self.quota_bytes}) is above max_map_size_mb "
                             f"({self.max_map_size_mb} MiB): the store could never reach it")
        return self


_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_LONG_POLLS = 256
"""Long polls of /v1/events that wait at once (agent.http.feed.MAX_WAITING_POLLS)."""


_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#@\s]{1,253}$")


def _origin(value: str) -> str:
    """A web origin as browsers send it (scheme://host[:port], lower case), or "*"."""
    if value == "*" or _ORIGIN.fullmatch(value):
        return value
    hint = (" (the origin of file:// pages and sandboxed frames, which any page can "
            "take: not allowed)" if value == "null" else "")
    raise ValueError(f"{value[:100]!r} is not a web origin{hint}: write it as the browser "
                     "sends it, scheme://host[:port] in lower case without a path "
                     "(https://tablet.example:8443), or \"*\" for any")


class ApiConfig(_Model):
    """The local API for apps (`agent.http`): a Unix socket in the store's directory,
    optionally loopback TCP; tokens per app (`waystation agent token ...`)."""

    socket: Bool = True
    socket_mode: Annotated[int, Field(strict=True, ge=0, le=0o777)] = 0o660
    """File mode of the socket (the outer wall; tokens are checked inside it)."""
    tcp_port: Port | None = None
    tcp_host: Annotated[str, Field(strict=True)] = "127.0.0.1"
    max_body_bytes: Annotated[int, Field(strict=True, ge=1024, le=64 * 1024 * 1024)] = (
        1024 * 1024)
    max_feed_clients: Annotated[int, Field(strict=True, ge=1, le=1024)] = 32
    feed_idle_timeout_s: Seconds = 30.0
    """A feed client that takes longer than this to accept an event is dropped."""
    # ge=1, not the real floor: the model check below names it (max_feed_clients + 272),
    # where a field bound of 16 answered 10 with "from 16" and then 16 with "at least 304".
    max_connections: Annotated[int, Field(strict=True, ge=1, le=65536)] = 512
    """Open connections (Unix socket and TCP together, agent.http.conn_limits): over it
    the longest-idle connection is closed to make room; when all are busy answering, 503
    too_many_connections. At least max_feed_clients + 256 long polls + 16 (left unset, it
    is raised to that), and below the process's file limit."""
    idle_timeout_s: Annotated[float, Field(strict=True, gt=0, le=3600)] = 30.0
    """A connection that sends no complete request head for this long (from its start or
    its last answer) is closed."""
    body_timeout_s: Annotated[float, Field(strict=True, gt=0, le=3600)] = 30.0
    """A request's body must arrive whole within this, else 408 body_timeout."""
    send_timeout_s: Annotated[float, Field(strict=True, gt=0, le=3600)] = 60.0
    """An answer (not a feed: api.feed_idle_timeout_s) must be read by the client within
    this, else the connection is closed."""
    idempotency_keep_s: Annotated[float, Field(strict=True, ge=1, le=30 * 86400)] = 86400.0
    """How long a write's Idempotency-Key (and its answer) is kept (agent.idempotency)."""
    idempotency_max_keys: Annotated[int, Field(strict=True, ge=1, le=1_000_000)] = 10_000
    """At most this many keys are kept over every app; past it the app holding the most
    loses its oldest (agent.idempotency.fair_victims)."""
    cors_origins: Annotated[list[Annotated[str, Field(strict=True),
                                           AfterValidator(_origin)]],
                            Field(max_length=100), AfterValidator(_no_duplicates)] = (
        Field(default_factory=list))
    """Web origins whose pages a browser lets call the API (agent.http.cors); "*": any
    (only when listed explicitly). Empty: no CORS."""

    @model_validator(mode="after")
    def _connections(self) -> ApiConfig:
        # Feeds and long polls each hold a connection busy (not evictable): with no
        # room above them, one more app could not even be told 503 by its route.
        need = self.max_feed_clients + _LONG_POLLS + 16
        if self.max_connections < need and "max_connections" not in self.model_fields_set:
            # The default under a raised max_feed_clients (a config written before this
            # setting existed must not stop the agent at an upgrade): room for them.
            object.__setattr__(self, "max_connections", need)
        if self.max_connections < need:
            raise ValueError(f"max_connections ({self.max_connections}) must be at least "
                             f"max_feed_clients ({self.max_feed_clients}) + {_LONG_POLLS} "
                             f"long polls + 16 = {need}")
        return self

    @model_validator(mode="after")
    def _loopback(self) -> ApiConfig:
        if self.tcp_host not in _LOOPBACK:
            raise ValueError(f"tcp_host {self.tcp_host!r} is not a loopback address: the "
                             f"local API only listens on {', '.join(_LOOPBACK)}")
        return self


class AgentConfig(_Model):
    """The device agent (`waystation agent ...`)."""

    PART: ClassVar[str] = "agent"

    device_id: DeviceId = Field(default_factory=default_device_id)
    data_dir: Path = Path("waystation-data/agent")
    scopes: Annotated[list[ScopeId], Field(min_length=1), AfterValidator(_no_duplicates)] = (
        Field(default_factory=lambda: ["default"]))
    schema_file: Path | None = None
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    def schema_path(self) -> Path:
        """The collection schema file: `schema_file`, else the bundled example."""
        return self.schema_file if self.schema_file is not None else _example_schema()

    def mqtt_username(self) -> str:
        """The broker user name: `mqtt.username`, else the device id (PROTOCOL.md §1)."""
        return self.mqtt.username if self.mqtt.username is not None else self.device_id
