"""How many connections the embedded broker holds: per source address before CONNECT,
and in all (pure; the amqtt hook is `broker.embedded.conn_guard`).

`broker.embedded.client_limits` bounds what one connection can make the broker hold (a
CONNECT within `connect_timeout_s`), not how many connections one host opens: measured
over TCP on amqtt 0.12.1 with our fixes, 2,000 sockets from one address that never sent
a CONNECT held 2,000 of the broker's file descriptors for the whole 15 s, and a host that
opens them again as they close holds them for ever, until honest devices get EMFILE.

`ConnectionTable` counts, per source (`source_of`: the IPv4 address, or the /64 network
of an IPv6 one, which one host usually owns whole), the connections that have not yet
logged in, and all open connections together. `open` refuses a connection over either
bound, so the adapter closes it at once; a connection that logged in no longer counts
against its source (one NAT address may carry thousands of devices), only against the
total. Memory: one entry per source with a connection still logging in, so at most
`ConnLimits.total` entries.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["ConnLimits", "ConnectionTable", "Ticket", "source_of"]

MAX_CONNECTING_PER_IP = 128
"""Default: connections from one source that have not logged in (sent CONNECT and been
accepted). A reconnect storm of devices behind one carrier NAT address logs in within a
round trip each, so few are in that state at once; a scan or slowloris keeps them there."""
MAX_CONNECTIONS = 50_000
"""Default: open client connections in all (below the unit's LimitNOFILE of 65,536)."""


@dataclass(frozen=True)
class ConnLimits:
    """The two bounds (see the module docstring)."""

    connecting_per_source: int = MAX_CONNECTING_PER_IP
    total: int = MAX_CONNECTIONS


class Ticket:
    """One admitted connection: its source and whether it has logged in yet."""

    __slots__ = ("closed", "logged_in", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.logged_in = False
        self.closed = False


class ConnectionTable:
    """Admits or refuses connections (`open`), and follows each to its end."""

    def __init__(self, limits: ConnLimits) -> None:
        self.limits = limits
        self.total = 0
        self._connecting: dict[str, int] = {}

    def connecting(self, source: str) -> int:
        """Connections from `source` that have not logged in."""
        return self._connecting.get(source, 0)

    @property
    def sources(self) -> int:
        """Sources with a connection still logging in (the table's size)."""
        return len(self._connecting)

    def open(self, source: str) -> Ticket | str:
        """A ticket for a new connection from `source`, or why it is refused."""
        if self.total >= self.limits.total:
            return (f"{self.total} connections open (max_connections "
                    f"{self.limits.total})")
        waiting = self._connecting.get(source, 0)
        if waiting >= self.limits.connecting_per_source:
            return (f"{waiting} connections from this address have not logged in "
                    f"(max_connecting_per_ip {self.limits.connecting_per_source})")
        self._connecting[source] = waiting + 1
        self.total += 1
        return Ticket(source)

    def logged_in(self, ticket: Ticket) -> None:
        """The connection's CONNECT was accepted: it no longer counts against its source."""
        if ticket.closed or ticket.logged_in:
            return
        ticket.logged_in = True
        self._release_source(ticket.source)

    def close(self, ticket: Ticket) -> None:
        """The connection ended (idempotent)."""
        if ticket.closed:
            return
        ticket.closed = True
        self.total -= 1
        if not ticket.logged_in:
            self._release_source(ticket.source)

    def _release_source(self, source: str) -> None:
        left = self._connecting.get(source, 0) - 1
        if left > 0:
            self._connecting[source] = left
        else:
            self._connecting.pop(source, None)


def source_of(address: str | None) -> str:
    """The key a peer address is counted under: IPv4 as is (also when mapped into IPv6),
    IPv6 by its /64 (a host is handed a whole /64 and picks addresses in it at will)."""
    if not address:
        return "?"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)
