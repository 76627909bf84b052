"""What the owner of an `MqttLink` plugs into it: the callbacks, the last will, the
providers that choose each connection attempt's password and client certificate (a
device rotating either holds two), and the link's options read from a config model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from waystation.linkproblems import LinkProblem
from waystation.mqtt_tls import TlsSettings

OnConnect = Callable[[bool], object]
OnDisconnect = Callable[[str], object]
OnMessage = Callable[[str, bytes], object]
OnProblem = Callable[[LinkProblem, float], object]
"""Called after a failed connection attempt: why, and the seconds until the next one."""


class PasswordProvider(Protocol):
    """Chooses the password of each connection attempt (a device whose broker password
    is being rotated holds two: `agent.creds`). Called on the network thread."""

    def password(self) -> str | None:
        """The password for the attempt about to start."""

    def refused(self) -> None:
        """The broker refused that password (bad user name or password, not authorised)."""

    def accepted(self) -> None:
        """The broker accepted it."""


class CertProvider(Protocol):
    """Chooses the client certificate of each connection attempt (a device renewing its
    certificate holds the new and the previous one: `agent.clientcert`). Called on the
    network thread."""

    def cert_files(self) -> tuple[str, str] | None:
        """Certificate and key file for the attempt about to start (None: as configured)."""

    def refused(self) -> None:
        """The attempt failed before the broker accepted it (TLS handshake, refusal)."""

    def accepted(self) -> None:
        """The broker accepted the connection."""


@dataclass(frozen=True)
class Will:
    """The last will: published by the broker if the link dies without a clean stop."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def link_options(cfg: Any, *, client_id: str,
                 env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`MqttLink` keyword arguments from a ``waystation.config.MqttConfig`` (read by
    attribute; see `MqttLink.from_config`)."""
    resolve = getattr(cfg, "resolved_password", None)
    if callable(resolve):
        password = resolve(env or {})
    else:
        secret = getattr(cfg, "password", None)
        getter = getattr(secret, "get_secret_value", None)
        password = getter() if callable(getter) else secret
    tls_cfg = getattr(cfg, "tls", None)
    tls = None
    if tls_cfg is not None:
        tls = TlsSettings(
            ca=_opt_str(getattr(tls_cfg, "ca_file", None)),
            cert=_opt_str(getattr(tls_cfg, "cert_file", None)),
            key=_opt_str(getattr(tls_cfg, "key_file", None)),
            insecure=bool(getattr(tls_cfg, "insecure", False)),
            server_hostname=getattr(tls_cfg, "server_hostname", None),
        )
    username = getattr(cfg, "username", None)
    options: dict[str, Any] = {
        "host": cfg.host,
        "port": int(cfg.port),
        "username": username if username is not None else client_id,
        "password": password,
        "tls": tls,
        "keepalive": int(getattr(cfg, "keepalive_s", 30)),
        "connect_timeout": float(getattr(cfg, "connect_timeout_s", 10.0)),
    }
    return options


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


__all__ = ["CertProvider", "OnConnect", "OnDisconnect", "OnMessage", "OnProblem",
           "PasswordProvider", "Will", "link_options"]
