"""What one connection can make the embedded broker hold (fix 9 of
`broker.embedded.amqtt_broker`), measured against amqtt 0.12.1 over real TCP:

- **Before CONNECT**: amqtt waited for a connection's CONNECT for ever, and kept the
  socket open when the first bytes were not a CONNECT or the client closed before
  finishing one: 600 connections that sent nothing, half a CONNECT, a PINGREQ, or half a
  CONNECT and then FIN held 600 file descriptors 95 s later, and still after every one
  of those clients had closed (Mosquitto closed the garbage and closed ones at once and
  the idle ones after 90 s; EMQX closes them after its 15 s ``idle_timeout``). Enough
  port scans, load-balancer TCP checks or a slowloris would have used up the broker's
  file descriptors and locked every device out. Now a connection has `connect_timeout_s`
  (15 s, as EMQX) to send its CONNECT, and one that fails to is dropped at once.
- **QoS 2 publishes never released**: amqtt keeps every QoS 2 PUBLISH it answered with
  PUBREC until the client's PUBREL, for as long as the session lives, so one device could
  park 65,535 packet ids of 256 KiB each (16 GiB; measured: 600 of 200 kB grew the broker
  by 117 MB, kept after the device left). Now a client with `QOS2_INFLIGHT_MAX` of them
  unreleased, or `max_queued_mb` worth, is disconnected on the next one (Waystation's
  protocol uses QoS 1 only; an honest QoS 2 client releases each at once). amqtt also
  kept the task of every packet read after an unreleased one until it was released
  (measured: 1.1 million PINGREQs, 2.2 MB sent, grew the broker by 700 MB); the flows
  now run apart from the reader's tasks.
- **A packet left half sent**: amqtt's keepalive timer (fix 6) covers only the wait for
  a packet's first byte, so a client that stopped in the middle of one (a link that died
  during a 256 KiB upload, or a slowloris that logged in) stayed connected for ever, its
  will never published. `PacketDeadlineReader` gives each read inside a packet the same
  1.5 times the keepalive; after that the client is disconnected as a silent one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from broker.embedded.packet_limit import LimitedReader

log = structlog.get_logger("broker.embedded.amqtt_broker")

CONNECT_TIMEOUT_S = 15.0
"""Seconds a new connection has to send its CONNECT (EMQX's ``idle_timeout``)."""
QOS2_INFLIGHT_MAX = 100
"""Incoming QoS 2 messages one session may have waiting for their PUBREL."""


def qos2_refusal(session: Any, packet_id: int | None, size: int, max_bytes: int) -> str | None:
    """Why one more incoming QoS 2 message of `size` bytes is too many for `session`
    (None: it fits). A resend of a packet id already held replaces it, so it fits."""
    held = session.inflight_in
    if packet_id in held:
        return None
    if len(held) >= QOS2_INFLIGHT_MAX:
        return f"{len(held)} QoS 2 messages waiting for their PUBREL (at most {QOS2_INFLIGHT_MAX})"
    held_bytes = sum(len(m.data or b"") for m in held.values())
    if held_bytes + size > max_bytes:
        return (f"{held_bytes} bytes of QoS 2 messages waiting for their PUBREL "
                f"(at most {max_bytes})")
    return None


class PacketDeadlineReader(LimitedReader):
    """`LimitedReader` that calls `on_stall` when a read inside a packet gets no byte
    for `deadline_s` (0: no deadline, as a keepalive of 0). Any byte arriving counts, as
    with Mosquitto's keepalive: a slow link finishing a 256 KiB PUBLISH is not cut off."""

    def __init__(self, reader: asyncio.StreamReader, max_packet: int, peer: object) -> None:
        super().__init__(reader, max_packet, peer)
        self.deadline_s = 0.0
        self.on_stall: Callable[[], None] | None = None
        self.ticket: object | None = None
        """The connection's place in `broker.embedded.conn_table` (fix 11)."""

    async def read(self, n: int = -1) -> bytes:
        if self.deadline_s <= 0 or self.on_stall is None or self.at_boundary:
            return await super().read(n)
        loop, on_stall = asyncio.get_running_loop(), self.on_stall
        seen = self._buffered()
        timer: list[asyncio.TimerHandle] = []

        def check() -> None:
            nonlocal seen
            now = self._buffered()
            if now == seen:
                on_stall()
                return
            seen = now
            timer[0] = loop.call_later(self.deadline_s, check)

        timer.append(loop.call_later(self.deadline_s, check))
        try:
            return await super().read(n)
        finally:
            timer[0].cancel()

    def _buffered(self) -> int:
        """Bytes asyncio holds for amqtt's pending read (they grow while a packet arrives)."""
        return len(getattr(self._reader, "_buffer", b""))


def stalled(client_id: str | None, deadline_s: float, writer: Any) -> Callable[[], None]:
    """The `on_stall` of a client's reader: say so and drop its connection."""

    def on_stall() -> None:
        log.info("client stopped in the middle of a packet: disconnecting",
                 client_id=client_id, waited_s=deadline_s)
        drop_connection(writer)

    return on_stall


def drop_connection(writer: Any) -> None:
    """Close a client's socket now, without flushing what is buffered for it (a client
    that does not read would make a graceful close wait for ever)."""
    stream = getattr(writer, "_writer", writer)
    transport = getattr(stream, "transport", None)
    if transport is not None:
        transport.abort()


__all__ = ["CONNECT_TIMEOUT_S", "QOS2_INFLIGHT_MAX", "PacketDeadlineReader", "drop_connection",
           "qos2_refusal", "stalled"]
