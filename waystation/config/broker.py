"""The embedded broker's config model (`waystation broker ...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import (
    AfterValidator,
    Field,
    model_validator,
)

from waystation.config.common import (
    Bool,
    LogConfig,
    Port,
    Str,
    UserName,
    _Model,
    _no_duplicates,
    _topic_level,
)

# ----------------------------------------------------------------------- the broker

QUEUED_MESSAGES = (100, 10_000_000)
"""Allowed `max_queued_messages` (also `python -m broker.embedded --max-queued-messages`)."""
QUEUED_MB = (1, 65_536)
"""Allowed `max_queued_mb`."""
CONNECT_TIMEOUT_MAX_S = 3600.0
"""`connect_timeout_s` is above 0 and at most this."""
CONNECTIONS = (1, 1_000_000)
"""Allowed `max_connections` and `max_connecting_per_ip`."""
LOGIN_BACKOFF_AFTER = (1, 1000)
"""Allowed `login_backoff_after`."""
LOGIN_BACKOFF_MAX_S = 86_400.0
"""`login_backoff_max_s` is above 0 and at most this."""
LOGIN_FAILURES_PER_IP = (1, 1_000_000)
"""Allowed `login_failures_per_ip`."""
LOGIN_CHECK_THREADS = (1, 64)
"""Allowed `login_check_threads`."""

class BrokerTlsConfig(_Model):
    """TLS listener of the embedded broker."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: Bool = False

    @model_validator(mode="after")
    def _ca(self) -> BrokerTlsConfig:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signs "
                             "device certificates)")
        return self


class BrokerConfig(_Model):
    """The embedded amqtt broker (`waystation broker run`)."""

    PART: ClassVar[str] = "broker"

    host: Str = "127.0.0.1"
    port: Port = 1883
    tls_port: Port | None = None
    tls: BrokerTlsConfig | None = None
    data_dir: Path = Path("waystation-data/broker")
    password_file: Path | None = None
    prefix: Annotated[Str, AfterValidator(_topic_level)] = "waystation"
    server_users: Annotated[list[UserName], AfterValidator(_no_duplicates)] = Field(
        default_factory=lambda: ["waystation-server"])
    allow_anonymous: Bool = False
    max_packet_bytes: Annotated[int, Field(strict=True, ge=263_168, le=268_435_460)] = 266_240
    """The largest MQTT packet accepted (PROTOCOL.md: a 256 KiB payload plus room for the
    header and topic); a client sending a bigger one is disconnected."""
    max_queued_messages: Annotated[int, Field(strict=True, ge=QUEUED_MESSAGES[0],
                                              le=QUEUED_MESSAGES[1])] = 20_000
    max_queued_mb: Annotated[int, Field(strict=True, ge=QUEUED_MB[0], le=QUEUED_MB[1])] = 64
    """What the broker holds for one client, away (a device offline, the merge server
    stopped) or connected but not reading: beyond either limit messages for it are
    dropped and logged. Nothing is lost by that (devices resend and catch up); it bounds
    the broker's memory, e.g. against a device flooding while the server is down."""
    connect_timeout_s: Annotated[float, Field(strict=True, gt=0, le=CONNECT_TIMEOUT_MAX_S)] = 15.0
    """Seconds a new connection has to send its CONNECT before the broker closes it (port
    scans, half-open and slowloris connections would otherwise hold file descriptors)."""
    max_connections: Annotated[int, Field(strict=True, ge=CONNECTIONS[0],
                                          le=CONNECTIONS[1])] = 50_000
    """Open client connections in all; one more is closed at once (keep it below the
    process's file-descriptor limit, LimitNOFILE: the broker lowers it to fit)."""
    max_connecting_per_ip: Annotated[int, Field(strict=True, ge=CONNECTIONS[0],
                                                le=CONNECTIONS[1])] = 128
    """Connections from one address (an IPv6 /64) that have not logged in yet; one more is
    closed at once. Logged-in devices behind one NAT address do not count."""
    login_backoff_after: Annotated[int, Field(strict=True, ge=LOGIN_BACKOFF_AFTER[0],
                                              le=LOGIN_BACKOFF_AFTER[1])] = 5
    """Failed logins of one username from one address before that pair is refused, without
    a password check, for 1 s, then 2 s, 4 s, ... (up to `login_backoff_max_s`)."""
    login_backoff_max_s: Annotated[float, Field(strict=True, gt=0,
                                                le=LOGIN_BACKOFF_MAX_S)] = 300.0
    login_failures_per_ip: Annotated[int, Field(strict=True, ge=LOGIN_FAILURES_PER_IP[0],
                                                le=LOGIN_FAILURES_PER_IP[1])] = 100
    """Failed logins from one address within 60 s before the address is refused for the
    rest of the 60 s (usernames that logged in from it before still get in)."""
    login_check_threads: Annotated[int, Field(strict=True, ge=LOGIN_CHECK_THREADS[0],
                                                 le=LOGIN_CHECK_THREADS[1])] = 1
    """Passwords checked at once, each on a thread of its own, off the event loop. Each
    thread can take a core during a login flood; raise it only with cores to spare."""
    log: LogConfig = Field(default_factory=LogConfig)

    @model_validator(mode="after")
    def _tls(self) -> BrokerConfig:
        if (self.tls_port is None) != (self.tls is None):
            raise ValueError("tls_port and [tls] go together: set both to open a TLS "
                             "listener, or neither")
        if self.tls_port is not None and self.tls_port == self.port:
            raise ValueError(f"tls_port ({self.tls_port}) must differ from port")
        return self

    def resolved_password_file(self) -> Path:
        """The Mosquitto-format password file: `password_file`, else data_dir/passwd."""
        return self.password_file if self.password_file is not None else self.data_dir / "passwd"
