"""A packet size limit for the embedded broker (amqtt 0.12.1 has none).

    guard = FrameGuard(max_packet=266_240)
    guard.consumed(data)          # every byte read from a client, in order; raises
                                  # PacketTooLarge once a packet's length says too big
    LimitedReader(stream_reader, max_packet, peer)   # amqtt's reader adapter, guarded

amqtt reads a packet's fixed header (type byte, then the "remaining length" in 1-4
bytes), then reads the whole rest of the packet into memory before anyone looks at it:
a client could make the broker buffer a 256 MiB PUBLISH. `FrameGuard` follows MQTT's
framing over the bytes amqtt reads and refuses a packet as soon as its last length byte
arrives, before amqtt asks for its body; the broker then drops the connection (as
Mosquitto does with `max_packet_size`). What the broker holds of a refused packet is at
most what asyncio's stream reader had buffered (about 128 KiB).

amqtt trusts the length fields inside a packet (a topic's, a client id's) even when they
run past the packet's own end, and then reads the next packets as the rest of it: a
5-byte PUBLISH whose topic claims 5 bytes shifted amqtt's framing so that bytes the guard
counted as a small packet's body became a 256 MiB PUBLISH header, which amqtt buffered
whole (measured: 200 MiB held for one connection under a 260 KB limit). So `LimitedReader`
also refuses any read that would run past the packet being read (`MalformedPacket`), and
amqtt's view of the stream can never leave the guard's.

The default matches PROTOCOL.md §3: a 256 KiB payload plus room for the fixed header, the
topic and the packet id (the same 266,240 bytes as the shipped Mosquitto and EMQX
configs). Sizes count the whole packet, fixed header included, as Mosquitto's does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from amqtt.adapters import StreamReaderAdapter
from amqtt.errors import AMQTTError

log = structlog.get_logger(__name__)

DEFAULT_MAX_PACKET = 266_240
"""Bytes of the largest MQTT packet the embedded broker accepts (256 KiB + 4 KiB)."""

_HEADER, _LENGTH, _BODY = 0, 1, 2
_ROOM_POLL_S = 0.005
_ROOM_POLL_MAX_S = 0.05
"""A held client's reader looks for room again after 5 ms, then ever less often up to
every 50 ms: with many clients held (the broker overloaded already) their polls must not
add much to its load, and 50 ms is small against the seconds a hold lasts."""


class PacketTooLarge(AMQTTError):  # type: ignore[misc]
    """A client announced a packet over the broker's limit; its connection is dropped."""


class MalformedPacket(AMQTTError):  # type: ignore[misc]
    """A field of a client's packet runs past the packet's end; its connection is dropped."""


class FrameGuard:
    """MQTT framing over a byte stream, refusing packets over `max_packet` bytes."""

    __slots__ = ("_length_bytes", "_multiplier", "_remaining", "_state", "_value",
                 "max_packet")

    @property
    def at_boundary(self) -> bool:
        """Between two packets: the next byte starts a new one."""
        return self._state == _HEADER

    @property
    def in_body(self) -> bool:
        """Inside a packet's body (its fixed header read)."""
        return self._state == _BODY

    def __init__(self, max_packet: int) -> None:
        if max_packet < 2:
            raise ValueError("max_packet must be at least 2 bytes")
        self.max_packet = max_packet
        self._state = _HEADER
        self._value = self._multiplier = self._length_bytes = self._remaining = 0

    def fits(self, n: int) -> bool:
        """Whether a read of `n` bytes stays within the packet being read (between packets
        and in a length only single bytes are read: amqtt reads headers byte by byte)."""
        return 0 <= n <= (self._remaining if self._state == _BODY else 1)

    def consumed(self, data: bytes) -> None:
        """Account for `data`, the next bytes read from the client."""
        i, end = 0, len(data)
        while i < end:
            if self._state == _BODY:
                step = min(self._remaining, end - i)
                self._remaining -= step
                i += step
                if not self._remaining:
                    self._state = _HEADER
            elif self._state == _HEADER:
                i += 1
                self._state = _LENGTH
                self._value, self._multiplier, self._length_bytes = 0, 1, 0
            else:
                byte = data[i]
                i += 1
                self._value += (byte & 0x7F) * self._multiplier
                self._multiplier *= 128
                self._length_bytes += 1
                if byte & 0x80:
                    if self._length_bytes == 4:
                        raise PacketTooLarge("malformed remaining length (more than 4 bytes)")
                    continue
                size = 1 + self._length_bytes + self._value
                if size > self.max_packet:
                    raise PacketTooLarge(f"packet of {size} bytes exceeds the broker's limit "
                                         f"of {self.max_packet} bytes")
                self._remaining = self._value
                self._state = _BODY if self._value else _HEADER


class LimitedReader(StreamReaderAdapter):  # type: ignore[misc]
    """amqtt's stream reader adapter with a `FrameGuard` on everything it reads, and a
    `room` check between packets: while it says no, the client's next packet is not
    read (its bytes wait in the kernel, and TCP holds the client back)."""

    def __init__(self, reader: asyncio.StreamReader, max_packet: int, peer: object) -> None:
        super().__init__(reader)
        self._guard = FrameGuard(max_packet)
        self._peer = peer
        self.room: Callable[[], bool] | None = None
        self.holding = False
        """Waiting for room now (the client is not silent: the broker is not reading)."""

    @property
    def at_boundary(self) -> bool:
        """Between two packets (nothing of the next one read yet)."""
        return self._guard.at_boundary

    @property
    def in_body(self) -> bool:
        """Inside a packet's body (its fixed header read)."""
        return self._guard.in_body

    async def read(self, n: int = -1) -> bytes:
        if self.room is not None and self._guard.at_boundary:
            delay = _ROOM_POLL_S
            while not self.room():
                # Left set when the keepalive timer cancels the wait: it then reads that
                # the broker, not the client, was holding things up.
                self.holding = True
                await asyncio.sleep(delay)
                delay = min(2 * delay, _ROOM_POLL_MAX_S)
            self.holding = False
        if not self._guard.fits(n):
            log.warning("packet_refused", peer=str(self._peer),
                        reason=f"malformed packet: a field of {n} bytes runs past its end")
            raise MalformedPacket(f"malformed packet from {self._peer}: a field runs past its end")
        data: bytes = await super().read(n)
        try:
            self._guard.consumed(data)
        except PacketTooLarge as exc:
            log.warning("packet_refused", peer=str(self._peer), reason=str(exc))
            raise
        return data


__all__ = ["DEFAULT_MAX_PACKET", "FrameGuard", "LimitedReader", "MalformedPacket",
           "PacketTooLarge"]
