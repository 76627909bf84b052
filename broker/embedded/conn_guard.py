"""The embedded broker's hook for `broker.embedded.conn_table` (connections per source
and in all) and `broker.embedded.login_guard` (failed logins): the clock, the sockets and
the log lines around those pure decisions. Each refusal is one log line, bounded like
every line a client causes (`broker.embedded.log_limits`: ``broker.embedded.amqtt_broker``
is one of its loggers, so a flood writes 20 a minute and then how many more there were).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from typing import Any

import structlog

from broker.embedded.client_limits import drop_connection
from broker.embedded.conn_table import (
    MAX_CONNECTIONS,
    ConnectionTable,
    ConnLimits,
    Ticket,
    source_of,
)
from broker.embedded.login_guard import LoginGuard, LoginLimits

log = structlog.get_logger("broker.embedded.amqtt_broker")

__all__ = ["FD_RESERVE", "ConnGuard", "fitting_total", "raise_fd_limit"]

FD_RESERVE = 64
"""File descriptors kept for the broker itself (listeners, logs, password file, ...)."""


def raise_fd_limit() -> int | None:
    """Lift the soft file-descriptor limit to the hard one, as a server that holds one
    socket per device should (systemd's default soft limit is 1024 and its hard one
    524288): the soft limit, afterwards (None: unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def fitting_total(wanted: int, fd_limit: int | None = None) -> int:
    """`max_connections`, lowered to what the process's file-descriptor limit holds: past
    it accept() fails with EMFILE and asyncio stops accepting anyone for a while, so a
    flood would lock devices out before the bound closed a single connection. Lowering
    the default is only noted; lowering a bound the operator chose is a warning."""
    if fd_limit is None:
        fd_limit = raise_fd_limit()
        if fd_limit is None:
            return wanted
    room = max(1, fd_limit - FD_RESERVE)
    if wanted > room:
        say = log.info if wanted == MAX_CONNECTIONS else log.warning
        say("max_connections lowered to fit the file-descriptor limit",
            max_connections=wanted, now=room, fd_limit=fd_limit,
            hint="raise LimitNOFILE in the broker's systemd unit (or ulimit -n) "
                 "to allow more connections")
        return room
    return wanted


class ConnGuard:
    """One broker's connection table and login guard."""

    def __init__(self, conns: ConnLimits, logins: LoginLimits,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.table = ConnectionTable(ConnLimits(conns.connecting_per_source,
                                                fitting_total(conns.total)))
        self.logins = LoginGuard(logins)
        self._clock = clock

    def admit(self, writer: Any) -> Ticket | None:
        """A ticket for a new connection, or None after closing it at once (and saying
        so): established connections are never touched."""
        peer = writer.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else None
        got = self.table.open(source_of(address))
        if isinstance(got, Ticket):
            return got
        drop_connection(writer)
        log.warning("connection refused: too many connections", peer=address, reason=got,
                    hint="a host opening connections that do not log in (scan, flood, "
                         "broken client); if honest devices are refused, raise "
                         "max_connecting_per_ip or max_connections in the broker config")
        return None

    def close(self, ticket: Ticket | None) -> None:
        """The connection ended."""
        if ticket is not None:
            self.table.close(ticket)

    def login_refusal(self, address: str | None, user: str | None) -> str | None:
        """Why this login is refused before its password is checked (None: check it)."""
        why = self.logins.refusal(source_of(address), user or "", self._clock())
        if why is not None:
            log.info("login refused without checking the password", user=user, peer=address,
                     reason=why,
                     hint="someone is guessing passwords from this address, or a device "
                          "has a wrong one (`waystation broker passwd USER` sets a new "
                          "one); it is let in again after the backoff (login_backoff_after, "
                          "login_backoff_max_s, login_failures_per_ip)")
        return why

    def login_done(self, ticket: Ticket | None, address: str | None, user: str | None,
                   accepted: bool) -> None:
        """Record a checked login (accepted or not)."""
        source, now = source_of(address), self._clock()
        if accepted:
            self.logins.succeeded(source, user or "", now)
            if ticket is not None:
                self.table.logged_in(ticket)
        else:
            self.logins.failed(source, user or "", now)
