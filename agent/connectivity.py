"""Why the agent is not connected, in words an app can act on (pure, no I/O).

The MQTT link reports a failed attempt or a lost connection as text (paho's reason, an
OS or TLS error). `classify` maps it to a stable code that apps and the feed use:

==================  ============================================================
login_refused       the broker refused the device's user name or password
not_authorized      the broker refused the login for another reason (ACL, banned)
connection_refused  nothing listens at the broker's address (down, wrong port)
tls                 the TLS handshake failed (certificate, CA, host name)
dns                 the broker's host name does not resolve
server_unavailable  the broker answered "server unavailable"
timeout             no answer in time
network             the connection broke (another network error)
stopped             the sync loop was stopped on purpose
sync_restarting     the agent service runs, its sync process does not (status only)
==================  ============================================================
"""

from __future__ import annotations

from typing import Literal

LinkState = Literal["online", "offline", "retrying"]

_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("stopped", ("stopped", "taken offline")),
    ("login_refused", ("bad user name or password", "bad username or password")),
    ("not_authorized", ("not authorized", "not authorised", "banned")),
    ("server_unavailable", ("server unavailable", "server busy")),
    ("tls", ("ssl", "tls", "certificate", "handshake")),
    ("dns", ("name or service not known", "temporary failure in name resolution",
             "nodename nor servname", "no address associated", "name resolution",
             "errno -2]", "errno -3]", "errno -5]")),
    ("connection_refused", ("connection refused", "errno 111]")),
    ("timeout", ("timed out", "timeout", "no connack")),
)


def classify(reason: str) -> str:
    """The code for a link failure's text (see the module docstring)."""
    text = reason.lower()
    for code, needles in _RULES:
        if any(needle in text for needle in needles):
            return code
    return "network"


__all__ = ["LinkState", "classify"]
