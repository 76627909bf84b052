"""The embedded broker's settings (`BrokerSettings`), mapped from the pydantic broker
config or from the command line's options, and turned into amqtt's configuration dict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.embedded.client_limits import CONNECT_TIMEOUT_S
from broker.embedded.conn_table import MAX_CONNECTING_PER_IP, MAX_CONNECTIONS, ConnLimits
from broker.embedded.login_guard import (
    BACKOFF_MAX_S,
    LOGIN_FAILURES,
    SOURCE_FAILURES,
    LoginLimits,
)
from broker.embedded.packet_limit import DEFAULT_MAX_PACKET
from broker.embedded.plugins import plugin_config
from broker.embedded.session_queue import QueueLimits
from waystation.config.broker import (
    CONNECT_TIMEOUT_MAX_S,
    CONNECTIONS,
    LOGIN_BACKOFF_AFTER,
    LOGIN_BACKOFF_MAX_S,
    LOGIN_CHECK_THREADS,
    LOGIN_FAILURES_PER_IP,
    QUEUED_MB,
    QUEUED_MESSAGES,
)
from waystation.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class BrokerSettings:
    """Everything the embedded broker needs; ``from_config`` maps the pydantic config."""

    host: str = "127.0.0.1"
    port: int = 1883
    password_file: Path = Path("passwd")
    prefix: str = "waystation"
    server_users: frozenset[str] = frozenset({"waystation-server"})
    allow_anonymous: bool = False
    tls_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_require_client_cert: bool = False
    data_dir: Path | None = None
    session_expiry_s: int | None = 7 * 24 * 3600
    """Forget a persistent session (and its queue) this long after its client left."""
    log_level: str = "info"
    max_packet_bytes: int = DEFAULT_MAX_PACKET
    """The largest MQTT packet accepted; a bigger one drops its sender's connection."""
    max_queued_messages: int = QueueLimits.messages
    max_queued_bytes: int = QueueLimits.bytes
    """At most this much is held for one client, away or not reading (fix 8)."""
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    """A new connection that has not sent its CONNECT by then is closed."""
    max_connections: int = MAX_CONNECTIONS
    max_connecting_per_ip: int = MAX_CONNECTING_PER_IP
    """Open connections in all, and from one address before they logged in
    (`broker.embedded.conn_table`); one more is closed at once."""
    login_backoff_after: int = LOGIN_FAILURES
    login_backoff_max_s: float = BACKOFF_MAX_S
    login_failures_per_ip: int = SOURCE_FAILURES
    """When logins are refused without a password check (`broker.embedded.login_guard`)."""
    login_check_threads: int = 1
    """Passwords checked at once, off the event loop."""

    def conn_limits(self) -> ConnLimits:
        """The connection bounds for `broker.embedded.conn_table`."""
        return ConnLimits(connecting_per_source=self.max_connecting_per_ip,
                          total=self.max_connections)

    def login_limits(self) -> LoginLimits:
        """The failed-login bounds for `broker.embedded.login_guard`."""
        return LoginLimits(failures=self.login_backoff_after,
                           backoff_max_s=self.login_backoff_max_s,
                           source_failures=self.login_failures_per_ip)

    def __post_init__(self) -> None:
        if self.tls_port is not None and (self.tls_cert is None or self.tls_key is None):
            raise ConfigError("broker: tls_port needs both a TLS certificate and a key")
        if self.tls_require_client_cert and self.tls_ca is None:
            raise ConfigError("broker: tls_require_client_cert needs a CA file (tls ca)")
        if not 0 < self.connect_timeout_s <= CONNECT_TIMEOUT_MAX_S:
            raise ConfigError("broker: connect_timeout_s (--connect-timeout-s) must be a "
                              "number of seconds greater than 0 and at most "
                              f"{CONNECT_TIMEOUT_MAX_S:g} (got {self.connect_timeout_s})")
        low, high = 1, QUEUED_MESSAGES[1]  # a config file asks for 100 at least (a fleet);
        # `python -m broker.embedded` takes fewer, for tests that fill a queue quickly
        if not low <= self.max_queued_messages <= high:
            raise ConfigError("broker: max_queued_messages (--max-queued-messages) must be "
                              f"a whole number from {low} to {high} "
                              f"(got {self.max_queued_messages})")
        for name, (low, high) in (("max_connections", CONNECTIONS),
                                  ("max_connecting_per_ip", CONNECTIONS),
                                  ("login_backoff_after", LOGIN_BACKOFF_AFTER),
                                  ("login_failures_per_ip", LOGIN_FAILURES_PER_IP),
                                  ("login_check_threads", LOGIN_CHECK_THREADS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not low <= value <= high:
                raise ConfigError(f"broker: {name} (--{name.replace('_', '-')}) must be a "
                                  f"whole number from {low} to {high} (got {value!r})")
        if not 0 < self.login_backoff_max_s <= LOGIN_BACKOFF_MAX_S:
            raise ConfigError("broker: login_backoff_max_s (--login-backoff-max-s) must be a "
                              "number of seconds greater than 0 and at most "
                              f"{LOGIN_BACKOFF_MAX_S:g} (got {self.login_backoff_max_s})")
        if not self.prefix or self.prefix.startswith("$") or any(c in self.prefix for c in "+#"):
            raise ConfigError(f"broker: invalid topic prefix {self.prefix!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> BrokerSettings:
        """Build from a config object read by attribute (e.g. ``waystation.config.BrokerConfig``).

        TLS options are read nested (``tls.cert_file``, ``tls.key_file``, ``tls.ca_file``,
        ``tls.require_client_cert``) or flat (``tls_cert``, ``tls_key``, ``tls_ca``, ...).
        """
        if isinstance(cfg, BrokerSettings):
            return cfg
        defaults = cls()
        data_dir = _opt_path(_pick(cfg, "data_dir"))
        resolve = getattr(cfg, "resolved_password_file", None)
        password_file = _opt_path(resolve() if callable(resolve) else _pick(cfg, "password_file"))
        if password_file is None:
            password_file = (data_dir / "passwd") if data_dir else defaults.password_file
        server_users = _pick(cfg, "server_users")
        log_cfg = _pick(cfg, "log")
        log_level = _pick(cfg, "log_level") or (
            log_cfg if isinstance(log_cfg, str) else _pick(log_cfg, "level")
        )
        tls_port = _pick(cfg, "tls_port", "tls.port")
        return cls(
            host=str(_pick(cfg, "host") or defaults.host),
            port=int(_pick(cfg, "port") or defaults.port),
            password_file=password_file,
            prefix=str(_pick(cfg, "prefix") or defaults.prefix),
            server_users=(
                frozenset(server_users) if server_users is not None else defaults.server_users
            ),
            allow_anonymous=bool(_pick(cfg, "allow_anonymous") or False),
            tls_port=int(tls_port) if tls_port else None,
            tls_cert=_opt_path(_pick(cfg, "tls.cert_file", "tls_cert", "tls.cert")),
            tls_key=_opt_path(_pick(cfg, "tls.key_file", "tls_key", "tls.key")),
            tls_ca=_opt_path(_pick(cfg, "tls.ca_file", "tls_ca", "tls.ca")),
            tls_require_client_cert=bool(
                _pick(cfg, "tls_require_client_cert", "tls.require_client_cert") or False
            ),
            data_dir=data_dir,
            session_expiry_s=_pick(cfg, "session_expiry_s") or defaults.session_expiry_s,
            log_level=str(log_level or defaults.log_level),
            max_packet_bytes=int(_pick(cfg, "max_packet_bytes") or defaults.max_packet_bytes),
            # Explicit None checks: `or` took a 0 for "not set" and ran with the default.
            max_queued_messages=_given(cfg, "max_queued_messages", defaults.max_queued_messages),
            max_queued_bytes=_queued_bytes(_pick(cfg, "max_queued_mb"), defaults),
            connect_timeout_s=float(_given(cfg, "connect_timeout_s",
                                           defaults.connect_timeout_s)),
            max_connections=_given(cfg, "max_connections", defaults.max_connections),
            max_connecting_per_ip=_given(cfg, "max_connecting_per_ip",
                                         defaults.max_connecting_per_ip),
            login_backoff_after=_given(cfg, "login_backoff_after", defaults.login_backoff_after),
            login_backoff_max_s=float(_given(cfg, "login_backoff_max_s",
                                             defaults.login_backoff_max_s)),
            login_failures_per_ip=_given(cfg, "login_failures_per_ip",
                                         defaults.login_failures_per_ip),
            login_check_threads=_given(cfg, "login_check_threads",
                                          defaults.login_check_threads),
        )

    def amqtt_config(self) -> dict[str, Any]:
        """The amqtt broker configuration dict for these settings."""
        listeners: dict[str, dict[str, Any]] = {
            "default": {"type": "tcp", "bind": _bind(self.host, self.port)},
        }
        if self.tls_port is not None:
            tls: dict[str, Any] = {
                "type": "tcp",
                "bind": _bind(self.host, self.tls_port),
                "ssl": True,
                "certfile": str(self.tls_cert),
                "keyfile": str(self.tls_key),
            }
            if self.tls_ca is not None:
                tls["cafile"] = str(self.tls_ca)
            listeners["tls"] = tls
        return {
            "listeners": listeners,
            "session_expiry_interval": self.session_expiry_s,
            "plugins": plugin_config(
                password_file=self.password_file,
                prefix=self.prefix,
                server_users=self.server_users,
                allow_anonymous=self.allow_anonymous,
                trust_client_cert_cn=self.tls_ca is not None,
                check_threads=self.login_check_threads,
            ),
        }


def _pick(obj: Any, *names: str) -> Any:
    """The first attribute among ``names`` (dotted for nesting) that is set on ``obj``."""
    for name in names:
        value: Any = obj
        for part in name.split("."):
            value = getattr(value, part, None)
            if value is None:
                break
        if value is not None:
            return value
    return None


def _given(cfg: Any, name: str, default: Any) -> Any:
    value = _pick(cfg, name)
    return default if value is None else value


def _queued_bytes(mb: Any, defaults: BrokerSettings) -> int:
    """`max_queued_mb` in bytes, checked here: the bytes cannot say what was asked for."""
    if mb is None:
        return defaults.max_queued_bytes
    low, high = QUEUED_MB
    if isinstance(mb, bool) or not isinstance(mb, int) or not low <= mb <= high:
        raise ConfigError(f"broker: max_queued_mb (--max-queued-mb) must be a whole number "
                          f"of MB from {low} to {high} (got {mb!r})")
    return mb << 20


def _opt_path(value: Any) -> Path | None:
    return None if value is None or value == "" else Path(value)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = ["BrokerSettings"]
