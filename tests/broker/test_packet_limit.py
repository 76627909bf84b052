"""The embedded broker's packet size limit (broker/embedded/packet_limit.py)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.embedded.packet_limit import DEFAULT_MAX_PACKET, FrameGuard, PacketTooLarge
from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_until

LIMIT = 1000


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length encoding of `n`."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(body_size: int, kind: int = 0x30) -> bytes:
    return bytes([kind]) + remaining_length(body_size) + b"b" * body_size


def chunks(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        yield data[start:cut]
        start = cut
    yield data[start:]


@given(st.lists(st.integers(0, LIMIT - 3), max_size=20), st.lists(st.integers(0, 10**6),
                                                                  max_size=30))
@settings(max_examples=300, deadline=None)
def test_packets_within_the_limit_pass_however_they_are_read(sizes: list[int],
                                                             cuts: list[int]) -> None:
    """Packets up to the limit pass whatever pieces the stream is read in."""
    guard = FrameGuard(LIMIT)
    stream = b"".join(packet(n) for n in sizes if 1 + len(remaining_length(n)) + n <= LIMIT)
    for piece in chunks(stream, cuts):
        guard.consumed(piece)


@given(st.lists(st.integers(0, 500), max_size=5), st.integers(LIMIT - 1, 10**8),
       st.lists(st.integers(0, 10**6), max_size=10))
@settings(max_examples=300, deadline=None)
def test_an_oversized_packet_is_refused_at_its_last_length_byte(
        before: list[int], body: int, cuts: list[int]) -> None:
    """A packet whose size passes the limit is refused as soon as its length is known,
    before a single byte of its body is read."""
    size = 1 + len(remaining_length(body)) + body
    guard = FrameGuard(LIMIT)
    head = b"".join(packet(n) for n in before)
    for piece in chunks(head, cuts):
        guard.consumed(piece)
    header = bytes([0x30]) + remaining_length(body)
    if size <= LIMIT:
        guard.consumed(header)
        return
    guard.consumed(header[:-1])
    with pytest.raises(PacketTooLarge, match=f"packet of {size} bytes"):
        guard.consumed(header[-1:])


def test_a_length_of_more_than_four_bytes_is_refused() -> None:
    """MQTT's remaining length has at most 4 bytes; a fifth continuation is refused."""
    with pytest.raises(PacketTooLarge, match="malformed"):
        FrameGuard(LIMIT).consumed(b"\x30\xff\xff\xff\xff")


def test_default_limit_matches_the_protocol_and_mosquitto() -> None:
    """256 KiB of payload plus 4 KiB of room: the shipped Mosquitto/EMQX value."""
    assert DEFAULT_MAX_PACKET == 262_144 + 4096 == 266_240


# ---------------------------------------------------------------- a real embedded broker


def _connect_raw(port: int, user: str) -> socket.socket:
    """A device connected by hand (raw MQTT 3.1.1 CONNECT), CONNACK read."""
    def text(s: str) -> bytes:
        return struct.pack(">H", len(s)) + s.encode()
    body = (text("MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 30) + text(user)
            + text(user) + text(USERS[user]))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(bytes([0x10]) + remaining_length(len(body)) + body)
    assert sock.recv(4) == b"\x20\x02\x00\x00", "CONNACK accepted"
    return sock


def _send_until_closed(sock: socket.socket, header: bytes, total: int) -> int:
    """Send `header` then up to `total` body bytes; how many went before the broker
    closed the connection."""
    sent = 0
    chunk = b"z" * 65536
    try:
        sock.sendall(header)
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    return sent


def test_embedded_broker_drops_an_oversized_publish_without_buffering_it(
        embedded_broker: BrokerProcess) -> None:
    """A 50 MB PUBLISH: the broker cuts its sender off at the header, its memory does
    not grow by the payload, the subscriber never gets it; a 256 KiB one still passes
    and the sender can connect again."""
    server = RecordingClient(embedded_broker.port, "server-1", SERVER_USER,
                             USERS[SERVER_USER])
    assert server.connect() == "Success"
    assert server.subscribe(f"{PREFIX}/+/up") == 1
    assert embedded_broker.proc is not None
    broker = psutil.Process(embedded_broker.proc.pid)
    before = broker.memory_info().rss
    topic = f"{PREFIX}/van-12/up".encode()
    body_size = 50_000_000
    variable = struct.pack(">H", len(topic)) + topic + struct.pack(">H", 1)
    header = bytes([0x32]) + remaining_length(len(variable) + body_size) + variable
    sock = _connect_raw(embedded_broker.port, "van-12")
    sent = _send_until_closed(sock, header, body_size)
    sock.close()
    assert sent < body_size, "the broker read the whole 50 MB"
    grown = broker.memory_info().rss - before
    assert grown < 20_000_000, f"broker grew by {grown} bytes"

    device = RecordingClient(embedded_broker.port, "van-12", "van-12", USERS["van-12"])
    assert device.connect() == "Success"
    largest = b"x" * 262_144
    device.publish(f"{PREFIX}/van-12/up", largest)
    assert server.wait_for(f"{PREFIX}/van-12/up", largest)
    device.client.publish(f"{PREFIX}/van-12/up", b"y" * 270_000, qos=1)
    wait_until(lambda: device.state.disconnects, 15, message="the sender cut off")
    device.close()
    assert all(len(m.payload) <= 262_144 for m in server.received())
    assert "packet_refused" in embedded_broker.log_tail(200)
    server.close()


def test_embedded_broker_drops_an_oversized_connect(embedded_broker: BrokerProcess) -> None:
    """A CONNECT announcing 100 MB is refused before authentication reads it."""
    sock = socket.create_connection(("127.0.0.1", embedded_broker.port), timeout=10)
    sent = _send_until_closed(sock, bytes([0x10]) + remaining_length(100_000_000),
                              100_000_000)
    sock.close()
    assert sent < 100_000_000
    wait_until(lambda: "packet_refused" in embedded_broker.log_tail(200), 10,
               message="the refusal logged")
