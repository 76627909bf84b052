"""Why an MQTT connection attempt failed, in a few kinds people can act on (pure).

The agent records the kind with the attempt's time and the next retry, so `agent status`
and the local API can say "the broker refused the login", not just "offline".
"""

from __future__ import annotations

import socket
import ssl
from typing import Literal, NamedTuple

ProblemKind = Literal["login_refused", "not_authorized", "connection_refused", "tls", "dns",
                      "server_unavailable", "timeout", "network", "broker_refused",
                      "disconnected", "stopped"]

HINTS: dict[str, str] = {
    "login_refused": "the broker refused the login: check mqtt.username / the password "
                     "(or the client certificate), and that the device is enrolled",
    "not_authorized": "the broker refused the login (not authorized): check the password "
                      "or client certificate, and that the device is enrolled and not "
                      "removed",
    "server_unavailable": "the broker is up but not accepting connections now",
    "stopped": "the sync daemon was stopped",
    "sync_restarting": "the agent service runs but its sync process does not (starting, "
                       "or exited: the service restarts it, with backoff): if this lasts, "
                       "see the agent's log (`journalctl -u waystation-agent`)",
    "not_responding": "the sync daemon's process is alive but not responding (stopped, "
                      "the device asleep, or stuck on a stalled disk): the agent service "
                      "replaces it after sync.hung_after_s (event sync_process_hung); "
                      "run on its own, or if this lasts, see the agent's log and restart "
                      "the service",
    "connection_refused": "nothing accepts connections at the broker's address: is the "
                          "broker running, are mqtt.host / mqtt.port right?",
    "tls": "the TLS handshake failed: check mqtt.tls (CA file, server name, client "
           "certificate) and the device's clock",
    "dns": "the broker's host name does not resolve: check mqtt.host and the device's DNS",
    "timeout": "the broker did not answer in time: the network is slow or blocked, or "
               "mqtt.port / mqtt.tls do not match the broker's MQTT listener",
    # Also a connection something at mqtt.port accepted and closed before any CONNACK:
    # a TLS listener spoken to in plain text (or the reverse), a port that is not MQTT.
    "network": "the connection failed or broke: check the network, and that mqtt.host / "
               "mqtt.port name the broker's MQTT listener and mqtt.tls matches it (TLS or "
               "plain)",
    "broker_refused": "the broker refused the connection",
    "disconnected": "the connection was lost",
}


class LinkProblem(NamedTuple):
    kind: ProblemKind
    detail: str


def from_exception(exc: BaseException) -> LinkProblem:
    """The kind of an exception raised while connecting."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, socket.gaierror):
        return LinkProblem("dns", detail)
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return LinkProblem("tls", detail)
    if isinstance(exc, ConnectionRefusedError):
        return LinkProblem("connection_refused", detail)
    if isinstance(exc, TimeoutError | socket.timeout):
        return LinkProblem("timeout", detail)
    return LinkProblem("network", detail)


def from_connack(reason: str) -> LinkProblem:
    """The kind of a CONNACK refusal (paho's reason text)."""
    text = reason.lower()
    if "not authori" in text or "user name or password" in text or "bad user" in text:
        return LinkProblem("login_refused", reason)
    return LinkProblem("broker_refused", reason)


__all__ = ["HINTS", "LinkProblem", "ProblemKind", "from_connack", "from_exception"]
