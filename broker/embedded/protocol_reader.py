"""The embedded broker's reader of a client's bytes, refusing packets MQTT 3.1.1 forbids
(`broker.embedded.protocol_checks`) as they are read: a fixed header with the wrong
flags, a packet before CONNECT or a second CONNECT, and a CONNECT of another protocol
(MQTT 5, MQTT 3.1) before amqtt parses its payload as 3.1.1's, a CONNECT whose client
id, will topic or user name is not an MQTT string (not UTF-8, or U+0000), and a PUBLISH to a
malformed topic (a wildcard, a NUL, not UTF-8) before amqtt drops it and reads its
payload as the next packets.

A refusal logs one line (``packet_refused``, with the reason and what to do), raises
`ProtocolViolation`, and the broker closes the connection: before CONNECT after sending
the refusal's CONNACK, if it has one; after CONNECT as any broken connection (the will
is published, as for every connection that ends without DISCONNECT).
"""

from __future__ import annotations

import asyncio

import structlog

from broker.embedded.client_limits import PacketDeadlineReader
from broker.embedded.packet_limit import MalformedPacket
from broker.embedded.protocol_checks import (
    PUBLISH,
    ConnectHeaderCheck,
    ConnectStringsCheck,
    PublishTopicCheck,
    Refusal,
    fixed_header_violation,
)

__all__ = ["CheckedReader", "ProtocolViolation"]

log = structlog.get_logger("broker.embedded.packet_limit")


class ProtocolViolation(MalformedPacket):
    """A client's packet breaks MQTT 3.1.1; its connection is closed."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(f"protocol violation: {refusal.reason}")
        self.refusal = refusal


class CheckedReader(PacketDeadlineReader):
    """`PacketDeadlineReader` that checks each packet's fixed header, the CONNECT's
    protocol name, level and flags and its strings, and a PUBLISH's topic, as their
    bytes arrive."""

    def __init__(self, reader: asyncio.StreamReader, max_packet: int, peer: object) -> None:
        super().__init__(reader, max_packet, peer)
        self.client_id: str | None = None
        """Set once the client logged in, for the log lines."""
        self.connect_by: float | None = None
        """The event loop time by which the CONNECT must have arrived (None: not set)."""
        self._packets = 0
        # The header's check first: the strings' takes the header for 3.1.1's.
        self._connect: list[ConnectHeaderCheck | ConnectStringsCheck] = [
            ConnectHeaderCheck(), ConnectStringsCheck()]
        self._topic: PublishTopicCheck | None = None

    async def read(self, n: int = -1) -> bytes:
        starting = self.at_boundary
        in_connect = self._packets == 1 and self.in_body
        in_topic = self._topic is not None and self.in_body
        data = await super().read(n)
        if starting and data:
            self._packets += 1
            why = fixed_header_violation(data[0], first_packet=self._packets == 1)
            if why is not None:
                self._refuse(Refusal(why))
            self._topic = PublishTopicCheck() if data[0] >> 4 == PUBLISH else None
        elif in_topic and self._topic is not None:
            why = self._topic.feed(data)
            if self._topic.done:
                self._topic = None
            if why is not None:
                self._refuse(Refusal(why))
        elif in_connect:
            self._check_connect(data)
        return data

    def _check_connect(self, data: bytes) -> None:
        # Each check sees every byte (amqtt reads a string's length and its bytes in
        # separate reads) and judges a field in the read that completes it, before
        # amqtt decodes it.
        for check in list(self._connect):
            refusal = check.feed(data)
            if check.done:
                self._connect.remove(check)
            if refusal is not None:
                self._refuse(refusal)

    def _refuse(self, refusal: Refusal) -> None:
        who = {} if self.client_id is None else {"client_id": self.client_id}
        log.warning("packet_refused", peer=str(self._peer), **who,
                    reason=f"protocol violation: {refusal.reason}",
                    hint=refusal.hint or "the client breaks MQTT 3.1.1: fix or replace its "
                                         "MQTT library; the connection was closed")
        raise ProtocolViolation(refusal)
