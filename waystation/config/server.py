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

from schemas.retention import RetentionRule
from waystation.config.common import (
    Bool,
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
    encryption_key_file: Path | None = None
    """LMDB: encrypt record values, the conflict log, dead letters and notices at rest
    with a data key wrapped by this key file (${CREDENTIALS_DIRECTORY} allowed). Not for
    PostgreSQL: encrypt its volume instead (deploy/README.md, "Encryption at rest")."""

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
        if self.encryption_key_file is not None and self.kind != "lmdb":
            raise ValueError(
                "encryption_key_file applies to the LMDB store only; for PostgreSQL "
                "encrypt the database's volume (LUKS/dm-crypt, an encrypted cloud disk) "
                "and back-ups: see deploy/README.md, \"Encryption at rest\"")
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
    conflict_retention_s: Annotated[int, Field(strict=True, ge=3600)] = 90 * 24 * 3600
    """Closed conflict-log entries (lost values, settled conflicts) are dropped this long
    after they were last touched; open ones are kept until a person settles them."""
    conflict_max_closed: Annotated[int, Field(strict=True, ge=1000)] = 1_000_000
    """At most this many closed conflict-log entries are kept (the oldest go first)."""
    # 0: a group is whatever queued up while the previous group was being committed
    # (group commit without a wait). A fixed wait delays every change on a quiet link
    # by the whole window (2 ms cost ~2.3 ms of a ~5.7 ms round trip, bench/e2e.py)
    # and buys nothing under load, where groups form on their own.
    batch_window_ms: Annotated[int, Field(strict=True, ge=0, le=1000)] = 0
    compress_over_bytes: CompressOver = 512
    fetch_query_max_records: Annotated[int, Field(strict=True, ge=1, le=1000)] = 1000
    """Records one fetch-by-query answer holds at most (PROTOCOL.md §7.14.1)."""
    fetch_query_scan_budget: Annotated[int, Field(strict=True, ge=100, le=1_000_000)] = 5_000
    """Records one fetch by query may make the server read (its cost bound): the scan
    stops there and the device continues with the answer's cursor."""
    fetch_query_scan_rate: Annotated[int, Field(strict=True, ge=10, le=1_000_000)] = 1000
    """Records a second one device's fetches by query may make the server read, over
    time (a burst of 4 x the scan budget first): a device asking again and again gets
    smaller answers (at least 100 records read each), never more of the server."""
    missed_grace_ms: Annotated[int, Field(strict=True, ge=1000, le=3_600_000)] = 10_000
    """How long a device back online (or enabled again) has to ask for a catch-up
    before the server sends it the newest record of each scope that changed while it was
    away (PROTOCOL.md §7.6): long enough for an agent's own catch-up after a reconnect,
    short enough that a device counted away by mistake is not left behind for long."""
    recent_dictionary_bytes: Annotated[int, Field(strict=True, ge=0, le=1 << 32)] = 16 << 20
    """Memory for the devices' recent messages that `zd3` streams are compressed with
    (PROTOCOL.md §3, broker.server.recent; ~4-16 KiB per device sending, least recently
    used dropped first: such a device sends one message again with `zd2`). 0: `zd3` is
    not served. Where several servers share the devices' messages (`shared_group`,
    `[amqp]`), a device stops using `zd3` after three refusals on one connection."""


class ServerRetentionConfig(_Model):
    """Records the server lets expire, per collection (broker.server.expiry): deleted by
    the server like a device's delete, so devices drop them too. None by default."""

    collections: dict[str, RetentionRule] = Field(default_factory=dict)
    interval_s: Annotated[int, Field(strict=True, ge=1, le=86_400 * 7)] = 3600
    batch: Annotated[int, Field(strict=True, ge=1, le=100_000)] = 500
    """Records examined per store transaction."""


class IntakeConfig(_Model):
    """Memory the server holds for messages waiting to be handled (broker.server.intake).

    Each device has its own queue, served fairly (by bytes); past `device_bytes` a
    device's further messages are dropped and counted (it resends what is not acked);
    past `max_bytes` in all, the server stops reading from the broker until the worker
    catches up (backpressure: the broker holds the rest, under its own limits)."""

    max_bytes: Annotated[int, Field(strict=True, ge=1 << 20, le=1 << 34)] = 64 << 20
    """Bytes of waiting messages in all (payloads plus a small per-message overhead)."""
    device_bytes: Annotated[int, Field(strict=True, ge=1 << 19, le=1 << 34)] = 4 << 20
    """Bytes of waiting messages one device may have (at least two largest messages)."""

    @model_validator(mode="after")
    def _sizes(self) -> IntakeConfig:
        if self.device_bytes > self.max_bytes:
            raise ValueError(f"device_bytes ({self.device_bytes}) is above max_bytes "
                             f"({self.max_bytes})")
        return self


class DeadLetterConfig(_Model):
    """How much refused input the server keeps for the operator (its dead letters).

    The first `keep_first` refusals with the same code from the same device within
    `window_s` are kept one by one with their raw bytes; the rest of that window are
    only counted, into one summary letter per device and code when the window ends.
    The oldest letters are dropped beyond `max_count`, `max_bytes` or `max_age_s` (and
    counted: `waystation server status`, the metrics)."""

    max_count: Annotated[int, Field(strict=True, ge=100, le=10_000_000)] = 100_000
    max_bytes: Annotated[int, Field(strict=True, ge=1 << 20, le=1 << 40)] = 256 << 20
    """Bytes of dead letters kept (raw payloads, reasons and ids)."""
    max_age_s: Annotated[int, Field(strict=True, ge=60)] = 30 * 24 * 3600
    raw_bytes: Annotated[int, Field(strict=True, ge=0, le=65536)] = 65536
    """Bytes of each refused payload kept in its letter (the rest is cut, its size kept)."""
    keep_first: Annotated[int, Field(strict=True, ge=1, le=10_000)] = 10
    window_s: Annotated[int, Field(strict=True, ge=1, le=86_400)] = 60


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
    broker_reload: list[Str] = Field(default_factory=list, max_length=32)
    """A command (argv) the server runs after it changed the password file during a
    password rotation, so that the broker reads it again: for Mosquitto e.g.
    ["systemctl", "reload", "mosquitto"]. Empty: nothing (the embedded broker re-reads
    the file at each login by itself)."""
    broker_kind: Literal["embedded", "mosquitto", "rabbitmq"] = "embedded"
    """Where device logins live, so where `device add` and a password rotation change
    them: "embedded" and "mosquitto" in password_file (Mosquitto's format; Mosquitto is
    reloaded through broker_reload); "rabbitmq" in RabbitMQ's own users (a rotation's
    switch runs rabbitmq_import; no password file is read or written)."""
    rabbitmq_import: list[Str] = Field(
        default_factory=lambda: ["rabbitmqctl", "import_definitions", "--format", "json"],
        min_length=1, max_length=32)
    """broker_kind "rabbitmq": a command (argv) that imports a RabbitMQ definitions
    document read from its standard input. A rotation's switch writes to it only the
    device's user with its new salted password hash (never the password, never on a
    command line). Add `-n rabbit@mq-1` to reach a node of the cluster, or wrap it (ssh)."""
    rabbitmq_delete_user: list[Str] = Field(
        default_factory=lambda: ["rabbitmqctl", "delete_user"], min_length=1, max_length=32)
    """broker_kind "rabbitmq": a command (argv) that deletes a RabbitMQ user, named as its
    last argument (the device id is appended). The running server runs it after `device
    remove`, retried at every tick until it works (`device list` shows it pending)."""
    client_ca_cert: Path | None = None
    """With client_ca_key: issue each device a client certificate (CN = device id)."""
    client_ca_key: Path | None = None
    client_cert_days: Annotated[int, Field(strict=True, ge=1, le=3650)] = 825

    @model_validator(mode="after")
    def _client_ca(self) -> EnrolConfig:
        if self.broker_kind == "rabbitmq" and self.broker_reload:
            raise ValueError("broker_reload is Mosquitto's reload; with broker_kind = "
                             "\"rabbitmq\" a rotation changes the password through "
                             "rabbitmq_import: remove broker_reload")
        if not self.rabbitmq_delete_user[0].strip():
            raise ValueError("rabbitmq_delete_user: the first element must be a program "
                             "(e.g. \"rabbitmqctl\")")
        if not self.rabbitmq_import[0].strip():
            raise ValueError("rabbitmq_import: the first element must be a program "
                             "(e.g. \"rabbitmqctl\")")
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


def _amqp_heartbeat(value: int) -> int:
    if value == 0:
        raise ValueError(
            "0 turns the AMQP heartbeat off: a link to RabbitMQ that goes silent (a cut "
            "cable, a dropping firewall: no reset) would go unnoticed, the server saying it "
            "is connected while it merges nothing; use 1..600 (30 by default)")
    return value


class AmqpConfig(_Model):
    """Consume devices' up and status messages from RabbitMQ over AMQP 0-9-1 instead of
    an MQTT subscription (broker.server.amqp_link): RabbitMQ 3.10 has no MQTT shared
    subscriptions, so several servers share the work as competing consumers of one
    replicated queue. Login: `mqtt.username` and the `mqtt` password (one RabbitMQ user).
    The server's announcement (`announce`, PROTOCOL.md §7.12) still goes over MQTT: a
    small connection of its own to `mqtt.host`:`mqtt.port`, RabbitMQ's MQTT listener (the
    devices' broker), with the same login (broker.server.announcer)."""

    nodes: list[Annotated[Str, AfterValidator(_host_port)]] = Field(default_factory=list)
    """RabbitMQ nodes' AMQP listeners, `host:port`, tried in turn. Empty: AMQP off (MQTT)."""
    prefetch: Annotated[int, Field(strict=True, ge=1, le=65535)] = 2000
    """Up messages handed to this server before it acknowledges them (after they commit)."""
    heartbeat_s: Annotated[int, Field(strict=True, ge=0, le=600),
                           AfterValidator(_amqp_heartbeat)] = 30
    """AMQP heartbeat: a link to RabbitMQ that goes silent (packets vanish, no reset) is
    noticed within `heartbeat_s` + 5 s to twice that (pika's check), and RabbitMQ takes
    back the messages the server held unsettled after about two heartbeats. 1..600."""
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
    server_group: Annotated[Str, AfterValidator(_valid_id("server group"))] = "main"
    """The group this server announces itself in (devices wait for it: agent
    `policy.server_group`)."""
    announce: Bool = True
    """Publish the retained announcement with its last will (PROTOCOL.md §7.12); false:
    clear it after connecting. With `[amqp] nodes` over a small MQTT connection of its
    own to `[mqtt]` host and port (RabbitMQ's MQTT listener); merging never waits for it."""
    merge: MergeConfig = Field(default_factory=MergeConfig)
    amqp: AmqpConfig = Field(default_factory=AmqpConfig)
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
    dead_letters: DeadLetterConfig = Field(default_factory=DeadLetterConfig)
    retention: ServerRetentionConfig = Field(default_factory=ServerRetentionConfig)
    enrol: EnrolConfig = Field(default_factory=EnrolConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    metrics_port: Port | None = None
    """Serve Prometheus metrics on this port (None: off)."""
    metrics_host: Str = "127.0.0.1"
    """Address the metrics endpoint binds to (0.0.0.0 to let a remote Prometheus scrape)."""
    metrics_max_connections: Annotated[int, Field(strict=True, ge=1, le=1024)] = 16
    """Connections the metrics endpoint serves at once (a thread each); one more closes
    the oldest (broker.server.metrics_http)."""
    metrics_timeout_s: Annotated[float, Field(strict=True, gt=0, le=300)] = 10.0
    """A metrics connection has this long in all to send its request and take the answer."""

    @model_validator(mode="after")
    def _one_intake(self) -> ServerConfig:
        if self.amqp.enabled and self.shared_group is not None:
            raise ValueError("shared_group and amqp.nodes exclude each other: with amqp.nodes "
                             "the servers share RabbitMQ's up queue; remove shared_group")
        return self

    def schema_path(self) -> Path:
        """The collection schema file: `schema_file`, else the bundled example."""
        return self.schema_file if self.schema_file is not None else _example_schema()
