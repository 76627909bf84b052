"""TLS towards the MQTT broker: the settings and the `ssl.SSLContext` built from them
(TLS 1.2 at least; an optional client certificate; an optional fixed server name that
is verified and sent as SNI whatever host was dialled). Used by `waystation.mqtt`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class TlsSettings:
    """TLS towards the broker; ``cert`` + ``key`` present a client certificate."""

    ca: str | None = None
    """CA file that signs the broker's certificate (None: the system's CAs)."""
    cert: str | None = None
    key: str | None = None
    insecure: bool = False
    """Skip certificate and host name verification (tests only)."""
    server_hostname: str | None = None
    """Name to verify (and send as SNI) when it differs from the host connected to."""


def ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The client-side context for `tls`."""
    context: ssl.SSLContext
    if tls.server_hostname:
        context = _FixedServerNameContext(ssl.PROTOCOL_TLS_CLIENT)
        context.server_name = tls.server_hostname
        if tls.ca:
            context.load_verify_locations(cafile=tls.ca)
        else:
            context.load_default_certs()
    else:
        context = ssl.create_default_context(cafile=tls.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert:
        context.load_cert_chain(tls.cert, tls.key)
    if tls.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _FixedServerNameContext(ssl.SSLContext):
    """An SSLContext that verifies (and sends as SNI) a fixed name, whatever host paho
    connected to: paho always passes the host it dialled."""

    server_name: str = ""

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


__all__ = ["TlsSettings", "ssl_context"]
