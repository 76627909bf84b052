"""Hostile clients against a real embedded broker over TCP (fix 9,
broker.embedded.client_limits): connections that never log in are closed, a client
cannot park QoS 2 messages without end, and a packet whose fields run past its end cannot
shift amqtt's framing past the packet size limit (broker.embedded.packet_limit)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from amqtt.mqtt.publish import PublishPacket

from broker.embedded.client_limits import QOS2_INFLIGHT_MAX
from broker.embedded.packet_limit import DEFAULT_MAX_PACKET, LimitedReader, MalformedPacket
from tests.fixtures_brokers import PREFIX, USERS, BrokerProcess, start_embedded
from tests.helpers import RecordingClient, wait_until
from tests.raw_mqtt import closed_by_peer, mqtt_string, remaining_length

UP = f"{PREFIX}/van-12/up"
CONNECT_TIMEOUT_S = 4.0




def _connect_packet(client_id: str, password: str) -> bytes:
    body = (mqtt_string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60) + mqtt_string(client_id)
            + mqtt_string(client_id) + mqtt_string(password))
    return bytes([0x10]) + remaining_length(len(body)) + body


def _publish_qos2(packet_id: int, payload: bytes) -> bytes:
    body = mqtt_string(UP) + struct.pack("!H", packet_id) + payload
    return bytes([0x34]) + remaining_length(len(body)) + body



def _fds(broker: BrokerProcess) -> int:
    assert broker.proc is not None
    return psutil.Process(broker.proc.pid).num_fds()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """An embedded broker giving new connections CONNECT_TIMEOUT_S to log in."""
    proc = start_embedded(tmp_path / "broker",
                          extra_args=["--connect-timeout-s", str(CONNECT_TIMEOUT_S)])
    yield proc
    proc.stop()


def test_connections_that_never_log_in_are_closed(broker: BrokerProcess) -> None:
    """Sockets that send half a CONNECT and FIN, or another packet first, are closed at
    once; sockets that send nothing or half a CONNECT are closed at the CONNECT deadline.
    The broker's file descriptors return to what they were and devices still log in.
    (amqtt 0.12.1 kept every one of them open for ever, even after the client closed.)"""
    before = _fds(broker)
    half = _connect_packet("van-12", USERS["van-12"])[:9]
    sockets: dict[str, list[socket.socket]] = {"idle": [], "half": [], "garbage": [],
                                               "half+fin": []}
    for _ in range(15):
        for kind, socks in sockets.items():
            sock = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
            if kind == "half":
                sock.sendall(half)
            elif kind == "garbage":
                sock.sendall(b"\xc0\x00")  # a PINGREQ before any CONNECT
            elif kind == "half+fin":
                sock.sendall(half)
                sock.shutdown(socket.SHUT_WR)
            socks.append(sock)
    try:
        wait_until(lambda: all(closed_by_peer(s) for s in sockets["half+fin"]
                               + sockets["garbage"]), CONNECT_TIMEOUT_S - 1,
                   message="connections that failed to log in closed at once")
        waiting = sockets["idle"] + sockets["half"]
        assert not any(closed_by_peer(s) for s in waiting), "closed before the deadline"
        wait_until(lambda: all(closed_by_peer(s) for s in waiting), CONNECT_TIMEOUT_S + 10,
                   message="connections with no CONNECT closed at the deadline")
        wait_until(lambda: _fds(broker) <= before, 10,
                   message=lambda: f"broker fds back to {before} (now {_fds(broker)})")
        device = RecordingClient(broker.port, "van-12", "van-12", USERS["van-12"])
        assert device.connect() == "Success"
        device.close()
        assert "no CONNECT from" in broker.log_tail(400)
    finally:
        for socks in sockets.values():
            for sock in socks:
                sock.close()


def _device_socket(broker: BrokerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
    sock.sendall(_connect_packet("van-12", USERS["van-12"]))
    assert sock.recv(4) == b"\x20\x02\x00\x00"
    return sock


def _read_packets(sock: socket.socket, want: int) -> list[bytes]:
    """Read `want` 4-byte acks (PUBREC, PUBCOMP) or until the broker closes the socket."""
    data = b""
    while len(data) < 4 * want:
        try:
            chunk = sock.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    return [data[i:i + 4] for i in range(0, len(data) - len(data) % 4, 4)]


def test_unreleased_qos2_messages_are_bounded(broker: BrokerProcess) -> None:
    """A device that sends QoS 2 PUBLISHes and never PUBRELs gets QOS2_INFLIGHT_MAX
    PUBRECs (resends of one packet id count once), then is disconnected with a log line
    saying why; amqtt kept every one, up to 65,535 per client."""
    sock = _device_socket(broker)
    try:
        for _ in range(3):  # the same packet id again: the broker still holds one
            sock.sendall(_publish_qos2(1, b"x" * 1000))
        assert _read_packets(sock, 3) == [b"\x50\x02\x00\x01"] * 3
        sock.sendall(b"".join(_publish_qos2(i, b"x" * 1000)
                              for i in range(2, QOS2_INFLIGHT_MAX + 51)))
        pubrecs = _read_packets(sock, QOS2_INFLIGHT_MAX + 49)
        assert len(pubrecs) == QOS2_INFLIGHT_MAX - 1, "PUBRECs before the disconnect"
        assert closed_by_peer(sock) or _read_packets(sock, 1) == []
    finally:
        sock.close()
    wait_until(lambda: "too many QoS 2 messages not released" in broker.log_tail(400), 10,
               message="the disconnect logged")


def test_an_honest_qos2_client_is_not_limited(broker: BrokerProcess) -> None:
    """A client that releases each QoS 2 message (PUBREL after PUBREC) sends more than
    QOS2_INFLIGHT_MAX of them on one connection, and every one is routed."""
    watcher = RecordingClient(broker.port, "watcher", "waystation-server",
                              USERS["waystation-server"])
    assert watcher.connect() == "Success" and watcher.subscribe(UP, qos=2) == 2
    sock = _device_socket(broker)
    count = 2 * QOS2_INFLIGHT_MAX
    try:
        for i in range(1, count + 1):
            sock.sendall(_publish_qos2(i, i.to_bytes(4, "big")))
            assert _read_packets(sock, 1) == [b"\x50\x02" + struct.pack("!H", i)]
            sock.sendall(b"\x62\x02" + struct.pack("!H", i))  # PUBREL
            assert _read_packets(sock, 1) == [b"\x70\x02" + struct.pack("!H", i)]  # PUBCOMP
        wait_until(lambda: len(watcher.received(UP)) >= count, 20, message="every message")
        assert sorted(int.from_bytes(m.payload, "big") for m in watcher.received(UP)) \
            == list(range(1, count + 1))
    finally:
        sock.close()
        watcher.close()


# A 3-byte PUBLISH whose topic claims 5 bytes, then a 10-byte PUBLISH whose body, read
# from where the lie leaves amqtt, starts a PUBLISH of 268,435,455 bytes.
SHIFTED = (bytes([0x30, 0x03, 0x00, 0x05, 0x61])
           + bytes([0x30, 0x0A, 0xAA, 0xBB, 0x30, 0xFF, 0xFF, 0xFF, 0x7F, 0x00, 0x01, 0x78]))


def test_a_field_past_its_packet_end_is_refused_before_it_is_read() -> None:
    """amqtt reading the lying PUBLISH through the guarded reader is stopped at the topic
    that runs past the packet, before it reads a byte of the next packet."""

    async def main() -> None:
        stream = asyncio.StreamReader()
        stream.feed_data(SHIFTED + b"z" * 1000)
        with pytest.raises(MalformedPacket):
            await PublishPacket.from_stream(LimitedReader(stream, DEFAULT_MAX_PACKET, "peer"))
        # only the fixed header and the topic length were read: the rest is still there
        assert await stream.readexactly(len(SHIFTED) - 4) == SHIFTED[4:]

    asyncio.run(main())


def test_a_packet_that_shifts_the_framing_cannot_pass_the_size_limit(
        broker: BrokerProcess) -> None:
    """Over TCP: the lying PUBLISH followed by 50 MB drops the sender at once, the broker
    does not grow by what it sent, and the device logs in and publishes again.
    (amqtt 0.12.1 buffered 200 MiB for it under a 260 KB limit.)"""
    assert broker.proc is not None
    process = psutil.Process(broker.proc.pid)
    before = process.memory_info().rss
    sock = _device_socket(broker)
    sent = 0
    try:
        sock.sendall(SHIFTED)
        chunk = b"z" * (1 << 20)
        while sent < 50_000_000:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    finally:
        sock.close()
    assert sent < 50_000_000, "the broker read the whole 50 MB"
    grown = process.memory_info().rss - before
    assert grown < 20_000_000, f"broker grew by {grown} bytes"
    wait_until(lambda: "malformed packet" in broker.log_tail(400), 10, message="logged")
    watcher = RecordingClient(broker.port, "watcher", "waystation-server",
                              USERS["waystation-server"])
    device = RecordingClient(broker.port, "van-12", "van-12", USERS["van-12"])
    try:
        assert watcher.connect() == "Success" and watcher.subscribe(UP) == 1
        assert device.connect() == "Success"
        device.publish(UP, b"after")
        assert watcher.wait_for(UP, b"after")
    finally:
        device.close()
        watcher.close()


def test_packets_behind_an_unreleased_qos2_message_are_not_kept(
        broker: BrokerProcess) -> None:
    """A device leaves one QoS 2 message unreleased and sends 60,000 PINGREQs (reading
    every PINGRESP): the broker does not grow with them (amqtt kept each packet's task
    behind the unreleased one, ~640 bytes per PINGREQ), and the message is still routed
    when its PUBREL comes at last."""
    assert broker.proc is not None
    process = psutil.Process(broker.proc.pid)
    watcher = RecordingClient(broker.port, "watcher", "waystation-server",
                              USERS["waystation-server"])
    assert watcher.connect() == "Success" and watcher.subscribe(UP, qos=2) == 2
    sock = _device_socket(broker)
    try:
        sock.sendall(_publish_qos2(7, b"late"))
        assert _read_packets(sock, 1) == [b"\x50\x02\x00\x07"]
        before = process.memory_info().rss
        for _ in range(6):
            sock.sendall(b"\xc0\x00" * 10_000)
            got = b""
            while len(got) < 20_000:
                chunk = sock.recv(65536)
                assert chunk, "the broker closed the connection"
                got += chunk
        grown = process.memory_info().rss - before
        assert grown < 12_000_000, f"broker grew by {grown} bytes for 60,000 PINGREQs"
        assert watcher.received(UP) == []
        sock.sendall(b"\x62\x02\x00\x07")  # PUBREL
        assert _read_packets(sock, 1) == [b"\x70\x02\x00\x07"]  # PUBCOMP
        assert watcher.wait_for(UP, b"late")
    finally:
        sock.close()
        watcher.close()


def test_a_client_that_stops_inside_a_packet_is_disconnected(broker: BrokerProcess) -> None:
    """A device (keepalive 2 s, a will on its status topic) sends half a PUBLISH and
    nothing more: the broker drops it after 1.5 times its keepalive, as a silent client,
    and publishes its will. (amqtt's keepalive covered only the wait between packets:
    such a client stayed connected for ever.)"""
    status = f"{PREFIX}/van-12/status"
    watcher = RecordingClient(broker.port, "watcher", "waystation-server",
                              USERS["waystation-server"])
    assert watcher.connect() == "Success" and watcher.subscribe(status) == 1
    body = (mqtt_string("MQTT") + bytes([4, 0xCE]) + struct.pack("!H", 2)
            + mqtt_string("van-12") + mqtt_string(status) + mqtt_string("gone")
            + mqtt_string("van-12") + mqtt_string(USERS["van-12"]))
    sock = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
    try:
        sock.sendall(bytes([0x10]) + remaining_length(len(body)) + body)
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        publish = (bytes([0x32]) + remaining_length(2 + len(UP) + 2 + 1000) + mqtt_string(UP)
                   + b"\x00\x01")
        sock.sendall(publish + b"x" * 500)
        wait_until(lambda: closed_by_peer(sock), 10, message="the stalled client dropped")
        assert watcher.wait_for(status, b"gone")
        assert "client stopped in the middle of a packet" in broker.log_tail(400)
    finally:
        sock.close()
        watcher.close()


def test_a_slow_link_finishing_a_packet_is_not_cut_off(broker: BrokerProcess) -> None:
    """A device (keepalive 2 s) whose 20 kB PUBLISH takes ~6 s to arrive, a piece every
    0.8 s, gets its PUBACK: bytes still arriving count as activity, as with Mosquitto."""
    body = (mqtt_string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 2) + mqtt_string("van-12")
            + mqtt_string("van-12") + mqtt_string(USERS["van-12"]))
    sock = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
    try:
        sock.sendall(bytes([0x10]) + remaining_length(len(body)) + body)
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        payload = b"x" * 20_000
        publish = (bytes([0x32]) + remaining_length(2 + len(UP) + 2 + len(payload))
                   + mqtt_string(UP) + b"\x00\x05" + payload)
        piece = len(publish) // 8 + 1
        for start in range(0, len(publish), piece):
            sock.sendall(publish[start:start + piece])
            time.sleep(0.8)  # the pace of a slow link, on purpose
        assert _read_packets(sock, 1) == [b"\x40\x02\x00\x05"]  # PUBACK
    finally:
        sock.close()


def test_a_publish_with_qos_3_closes_the_connection(broker: BrokerProcess) -> None:
    """MQTT 3.1.1 §3.3.1.2: a PUBLISH with both QoS bits set closes the connection, once
    logged (amqtt kept the connection and logged a traceback per packet)."""
    sock = _device_socket(broker)
    try:
        sock.sendall((bytes([0x36, 0x06]) + mqtt_string("x") + b"\x00\x01y") * 100)
        wait_until(lambda: closed_by_peer(sock), 10, message="the connection closed")
    finally:
        sock.close()
    wait_until(lambda: "PUBLISH with QoS 3" in broker.log_tail(400), 10, message="logged")
    assert "Task exception was never retrieved" not in broker.log_tail(400)


def test_a_reconnect_storm_of_one_device_leaves_nothing_behind(
        broker: BrokerProcess) -> None:
    """16 connections of one device id log in (clean and persistent sessions), publish
    and leave, over and over for 8 s, each taking over the one before: every attempt
    gets its CONNACK and PUBACK, and afterwards the broker holds no socket but its
    listener. (amqtt: a take-over racing the connection it took over, still starting,
    hung both, and each race leaked a socket in CLOSE_WAIT: 17 in 20 s.)"""
    assert broker.proc is not None
    process = psutil.Process(broker.proc.pid)
    before = _fds(broker)
    deadline = time.monotonic() + 8
    outcomes: list[str] = []

    def storm(clean: bool) -> None:
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
                    body = (mqtt_string("MQTT") + bytes([4, 0xC2 if clean else 0xC0])
                            + struct.pack("!H", 60) + mqtt_string("van-12") + mqtt_string("van-12")
                            + mqtt_string(USERS["van-12"]))
                    sock.sendall(bytes([0x10]) + remaining_length(len(body)) + body)
                    if sock.recv(4)[:1] != b"\x20":
                        continue  # taken over before its CONNACK: fine
                    sock.sendall(bytes([0x32]) + remaining_length(len(UP) + 5) + mqtt_string(UP)
                                 + b"\x00\x01z")
                    sock.recv(4)
                outcomes.append("ok")
            except OSError as exc:  # a timeout is a hung broker; a reset is a take-over
                outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=storm, args=(i % 2 == 0,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("ok") > 100
    assert "TimeoutError" not in outcomes, f"{outcomes.count('TimeoutError')} attempts hung"
    wait_until(lambda: _fds(broker) <= before, 15, message=lambda: (
        f"broker fds back to {before}: {_fds(broker)}, "
        f"{[c.status for c in process.net_connections()]}"))
    device = RecordingClient(broker.port, "van-12", "van-12", USERS["van-12"])
    assert device.connect() == "Success"
    device.close()
