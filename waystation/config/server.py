"""The merge server's config model (`waystation server ...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from waystation.config.common import (
    CompressOver,
    LogConfig,
    Port,
    PositiveInt,
    ServerMqttConfig,
    Str,
    _example_schema,
    _false_is_none,
    _Model,
    _optional_topic_level,
    _rule_ref,
    _valid_id,
)

# ----------------------------------------------------------------------- the server

class StoreConfig(_Model):
    """Where the server keeps the authoritative data."""

    kind: Literal["lmdb", "postgres"] = "lmdb"
    url: Str | None = Field(default=None, validate_default=True)
    map_size_mb: PositiveInt = 256
    max_map_size_mb: PositiveInt = 65536
    # PostgreSQL: how long a transaction keeps reconnecting after the database went away
    # before its changes are refused as transient (`server_error`; devices resend them).
    reconnect_s: Annotated[float, Field(gt=0, le=3600)] = 30.0

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind == "postgres":
            if value is None:
                raise ValueError("required when kind = 'postgres' "
                                 "(e.g. url = \"postgresql://waystation@db/waystation\")")
            if not value.startswith(("postgresql://", "postgres://")):
                raise ValueError("must start with postgresql:// or postgres://")
        return value

    @model_validator(mode="after")
    def _sizes(self) -> StoreConfig:
        if self.max_map_size_mb < self.map_size_mb:
            raise ValueError(f"max_map_size_mb ({self.max_map_size_mb}) is below "
                             f"map_size_mb ({self.map_size_mb})")
        return self


class MergeConfig(_Model):
    """How the server validates and merges incoming changes."""

    max_skew_ms: Annotated[int, Field(strict=True, ge=0)] = 300_000
    skew_policy: Literal["restamp", "reject"] = "restamp"
    max_payload_bytes: Annotated[int, Field(strict=True, ge=1024, le=262144)] = 262144
    max_batch_changes: Annotated[int, Field(strict=True, ge=1, le=1000)] = 1000
    rules: list[Annotated[Str, AfterValidator(_rule_ref)]] = Field(default_factory=list)
    tombstone_retention_s: Annotated[int, Field(strict=True, ge=0)] = 30 * 24 * 3600
    # 0: a group is whatever queued up while the previous group was being committed
    # (group commit without a wait). A fixed wait delays every change on a quiet link
    # by the whole window (2 ms cost ~2.3 ms of a ~5.7 ms round trip, bench/e2e.py)
    # and buys nothing under load, where groups form on their own.
    batch_window_ms: Annotated[int, Field(strict=True, ge=0, le=1000)] = 0
    compress_over_bytes: CompressOver = 512


class EnrolConfig(_Model):
    """What `waystation device add` writes for a new device: how devices reach the
    broker (often not how the server does: TLS on a public name vs. loopback), the CA
    they verify it with, where their broker logins go, and optionally a CA that signs
    device client certificates."""

    broker_host: Str | None = None
    """Host name devices connect to (default: mqtt.host)."""
    broker_port: Port | None = None
    """Port devices connect to (default: mqtt.port)."""
    ca_file: Path | None = None
    """CA certificate devices verify the broker with; set, the agent config uses TLS and
    a copy of this file is written next to it."""
    server_hostname: Str | None = None
    """Name to verify in the broker's certificate, when it differs from broker_host."""
    password_file: Path | None = None
    """The broker's password file for device logins (Mosquitto's format). Default: the
    broker config's password_file (embedded broker)."""
    client_ca_cert: Path | None = None
    """With client_ca_key: issue each device a client certificate (CN = device id)."""
    client_ca_key: Path | None = None
    client_cert_days: Annotated[int, Field(strict=True, ge=1, le=3650)] = 825

    @model_validator(mode="after")
    def _client_ca(self) -> EnrolConfig:
        if (self.client_ca_cert is None) != (self.client_ca_key is None):
            raise ValueError("client_ca_cert and client_ca_key go together: set both to "
                             "issue device client certificates, or neither")
        if self.client_ca_cert is not None and self.ca_file is None:
            raise ValueError("client certificates need TLS: set ca_file too")
        return self


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: expected host:port, e.g. \"mq-1:5672\"")
    return value


class AmqpConfig(_Model):
    """Consume devices' up and status messages from RabbitMQ over AMQP 0-9-1 instead of
    an MQTT subscription (broker.server.amqp_link): RabbitMQ 3.10 has no MQTT shared
    subscriptions, so several servers share the work as competing consumers of one
    replicated queue. Login: `mqtt.username` and the `mqtt` password (one RabbitMQ user)."""

    nodes: list[Annotated[Str, AfterValidator(_host_port)]] = Field(default_factory=list)
    """RabbitMQ nodes' AMQP listeners, `host:port`, tried in turn. Empty: AMQP off (MQTT)."""
    prefetch: Annotated[int, Field(strict=True, ge=1, le=65535)] = 2000
    """Up messages handed to this server before it acknowledges them (after they commit)."""
    heartbeat_s: Annotated[int, Field(strict=True, ge=0, le=600)] = 30
    status_queue_expires_s: Annotated[int, Field(strict=True, ge=60)] = 7 * 24 * 3600
    """This server's presence queue is deleted after it has gone unused this long."""

    @property
    def enabled(self) -> bool:
        return bool(self.nodes)


class ServerConfig(_Model):
    """The merge server (`waystation server ...`, `waystation device ...`)."""

    PART: ClassVar[str] = "server"

    server_id: Annotated[Str, AfterValidator(_valid_id("server id"))] = "server-1"
    data_dir: Path = Path("waystation-data/server")
    schema_file: Path | None = None
    store: StoreConfig = Field(default_factory=StoreConfig)
    mqtt: ServerMqttConfig = Field(default_factory=ServerMqttConfig)
    # None by default: the embedded broker (amqtt) has no shared subscriptions. Set it
    # (e.g. "waystation") on Mosquitto / EMQX to run several servers side by side.
    shared_group: Annotated[Str | None, BeforeValidator(_false_is_none),
                            AfterValidator(_optional_topic_level)] = None
    merge: MergeConfig = Field(default_factory=MergeConfig)
    amqp: AmqpConfig = Field(default_factory=AmqpConfig)
    enrol: EnrolConfig = Field(default_factory=EnrolConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    metrics_port: Port | None = None
    """Serve Prometheus metrics on this port (None: off)."""
    metrics_host: Str = "127.0.0.1"
    """Address the metrics endpoint binds to (0.0.0.0 to let a remote Prometheus scrape)."""

    @model_validator(mode="after")
    def _one_intake(self) -> ServerConfig:
        if self.amqp.enabled and self.shared_group is not None:
            raise ValueError("shared_group and amqp.nodes exclude each other: with amqp.nodes "
                             "the servers share RabbitMQ's up queue; remove shared_group")
        return self

    def schema_path(self) -> Path:
        """The collection schema file: `schema_file`, else the bundled example."""
        return self.schema_file if self.schema_file is not None else _example_schema()
