"""Packets MQTT 3.1.1 forbids, sent to a real embedded broker over TCP (fix 13,
broker.embedded.protocol_checks): each is refused with the right CONNACK code or its
connection closed, and the broker goes on serving; an MQTT 5 or MQTT 3.1 client (real
paho) learns that its protocol version is refused instead of being dropped unanswered."""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess, start_embedded
from tests.helpers import RecordingClient, wait_until
from tests.raw_mqtt import mqtt_string, remaining_length

UP, DOWN = f"{PREFIX}/van-12/up", f"{PREFIX}/van-12/down"
CONNACK_OK, CONNACK_PROTOCOL = b"\x20\x02\x00\x00", b"\x20\x02\x00\x01"
PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"




def _connect(user: str = "van-12", *, name: bytes = b"MQTT", level: int = 4,
             flags: int = 0xC2, first: int = 0x10, will: tuple[str, bytes] | None = None,
             client_id: str | None = None) -> bytes:
    body = mqtt_string(name) + bytes([level, flags]) + struct.pack("!H", 60)
    if level == 5:
        body += b"\x00"  # no properties
    body += mqtt_string(client_id or user)
    if will is not None:
        body += mqtt_string(will[0]) + mqtt_string(will[1])
    body += mqtt_string(user) + mqtt_string(USERS[user])
    return bytes([first]) + remaining_length(len(body)) + body


def _subscribe(topic: str, qos: int = 1, first: int = 0x82) -> bytes:
    body = b"\x00\x01" + mqtt_string(topic) + bytes([qos])
    return bytes([first]) + remaining_length(len(body)) + body


def _publish(topic: str | bytes) -> bytes:
    body = mqtt_string(topic) + b"\x00\x01" + b"x"
    return bytes([0x32]) + remaining_length(len(body)) + body


def _connect_strings(client_id: bytes = b"van-12", user: bytes = b"van-12",
                     will_topic: bytes | None = None) -> bytes:
    """A device's CONNECT with these bytes as its client id, user name and will topic
    (the device's password)."""
    flags = 0xC2 | (0x04 if will_topic is not None else 0)
    body = mqtt_string(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 60)
    body += mqtt_string(client_id)
    if will_topic is not None:
        body += mqtt_string(will_topic) + mqtt_string(b"gone")
    body += mqtt_string(user) + mqtt_string(USERS["van-12"])
    return b"\x10" + remaining_length(len(body)) + body


DEVICE, SERVER = _connect(), _connect(SERVER_USER, client_id="srv-1")
WILL = f"{PREFIX}/van-12/status"

STATUS = f"{PREFIX}/van-12/status".encode()
# MQTT-1.5.3-1/-2: closed without a CONNACK, as by Mosquitto 2.0.11 (amqtt: CONNACK 5)
NOT_MQTT_STRINGS = {
    "client id not UTF-8": _connect_strings(client_id=b"van-12\xff"),
    "client id with U+0000": _connect_strings(client_id=b"van\x00-12"),
    "client id with a surrogate": _connect_strings(client_id=b"van-12\xed\xa0\x80"),
    "client id overlong UTF-8": _connect_strings(client_id=b"van-12\xc0\xaf"),
    "user name not UTF-8": _connect_strings(user=b"van-12\xff"),
    "user name with U+0000": _connect_strings(user=b"van-12\x00"),
    "will topic not UTF-8": _connect_strings(will_topic=STATUS + b"\xff"),
    "will topic with U+0000": _connect_strings(will_topic=STATUS + b"\x00"),
    # MQTT-1.5.3 only says SHOULD NOT for these, and lets a server close: Mosquitto does
    "client id with U+0001": _connect_strings(client_id=b"van-12\x01"),
    "client id with U+001F": _connect_strings(client_id=b"van\x1f-12"),
    "client id with U+007F": _connect_strings(client_id=b"van-12\x7f"),
    "client id with U+0085": _connect_strings(client_id="van-12\x85".encode()),
    "client id with U+FFFF": _connect_strings(client_id="van-12\uffff".encode()),
    "client id with U+FDD0": _connect_strings(client_id="van-12\ufdd0".encode()),
    "user name with U+0009": _connect_strings(user=b"van-12\t"),
    "will topic with U+001B": _connect_strings(will_topic=STATUS + b"\x1b"),
}

# name: (packets, what the broker answers before closing; None: it keeps the connection)
REFUSED: dict[str, tuple[list[bytes], bytes]] = {
    **{name: ([packet], b"") for name, packet in NOT_MQTT_STRINGS.items()},
    "MQTT 5 CONNECT": ([_connect(level=5)], CONNACK_PROTOCOL),
    "MQTT 3.1 CONNECT (MQIsdp)": ([_connect(name=b"MQIsdp", level=3)], CONNACK_PROTOCOL),
    "unknown protocol level": ([_connect(level=9)], CONNACK_PROTOCOL),
    "unknown protocol name": ([_connect(name=b"FOO")], b""),
    "CONNECT reserved flag": ([_connect(flags=0xC3)], b""),
    "CONNECT fixed-header flags": ([_connect(first=0x11)], b""),
    "will QoS 3": ([_connect(flags=0xC2 | 0x04 | 0x18, will=(WILL, b"gone"))], b""),
    "will QoS without a will": ([_connect(flags=0xC2 | 0x08)], b""),
    "will retain without a will": ([_connect(flags=0xC2 | 0x20)], b""),
    "PUBLISH before CONNECT": ([_publish(UP)], b""),
    "second CONNECT": ([DEVICE, DEVICE], CONNACK_OK),
    "SUBSCRIBE QoS 3": ([DEVICE, _subscribe(DOWN, 3)], CONNACK_OK),
    "SUBSCRIBE QoS byte with reserved bits": ([DEVICE, _subscribe(DOWN, 0x41)], CONNACK_OK),
    "SUBSCRIBE fixed-header flags": ([DEVICE, _subscribe(DOWN, first=0x80)], CONNACK_OK),
    "filter with # in the middle": ([SERVER, _subscribe(f"{PREFIX}/#/up")], CONNACK_OK),
    "filter with + sharing a level": ([SERVER, _subscribe(f"{PREFIX}/a+/up")], CONNACK_OK),
    "filter with a NUL": ([SERVER, _subscribe(f"{PREFIX}/x\x00")], CONNACK_OK),
    "PUBLISH to a + wildcard": ([DEVICE, _publish(f"{PREFIX}/van-12/+")], CONNACK_OK),
    "PUBLISH to a # wildcard": ([SERVER, _publish(f"{PREFIX}/#")], CONNACK_OK),
    "PUBLISH to a NUL topic": ([SERVER, _publish(f"{PREFIX}/x\x00/down")], CONNACK_OK),
    "PUBLISH to an empty topic": ([DEVICE, _publish("")], CONNACK_OK),
    "PUBLISH to a topic not UTF-8": ([SERVER, _publish(f"{PREFIX}/x".encode() + b"\xff")],
                                     CONNACK_OK),
    "PUBREL fixed-header flags": ([DEVICE, b"\x60\x02\x00\x01"], CONNACK_OK),
    "PINGREQ fixed-header flags": ([DEVICE, b"\xc1\x00"], CONNACK_OK),
    "CONNACK from a client": ([DEVICE, CONNACK_OK], CONNACK_OK),
}
ACL_REFUSED = {  # refused by the ACL (SUBACK 0x80), the connection kept: unchanged
    "$SYS/#": "$SYS/#",
    "$share from a device": f"$share/g/{PREFIX}/+/up",
    "# from a device": "#",
}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One embedded broker for the module: every probe leaves it as it found it."""
    proc = start_embedded(Path(tmp_path_factory.mktemp("protocol")) / "broker")
    yield proc
    proc.stop()


def _exchange(port: int, packets: list[bytes], timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send `packets` (each after the broker had a moment to answer the one before) and
    read until the broker closes the socket: (what it sent, whether it closed)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = b""
    try:
        for packet in packets:
            try:
                sock.sendall(packet)
            except OSError:
                return got, True
            if packet is not packets[-1]:
                got += _read_some(sock, 0.3)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([sock], [], [], deadline - time.monotonic())[0]:
                break
            try:
                chunk = sock.recv(65536)
            except OSError:
                return got, True
            if not chunk:
                return got, True
            got += chunk
        return got, False
    finally:
        sock.close()


def _read_some(sock: socket.socket, wait: float) -> bytes:
    if not select.select([sock], [], [], wait)[0]:
        return b""
    try:
        return sock.recv(65536)
    except OSError:
        return b""


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_forbidden_packet_is_refused_and_its_connection_closed(
        broker: BrokerProcess, name: str) -> None:
    """The broker answers what MQTT 3.1.1 says (a CONNACK 0x01 for another protocol
    version, nothing more otherwise) and closes the connection; amqtt 0.12.1 granted
    "QoS 3", kept wildcard publishers and flag-breaking clients connected, and dropped
    MQTT 5 and 3.1 clients without a CONNACK."""
    packets, answer = REFUSED[name]
    got, closed = _exchange(broker.port, packets)
    assert closed, f"{name}: connection left open (got {got.hex(' ')})"
    assert got == answer, f"{name}: got {got.hex(' ')}, expected {answer.hex(' ')}"


def test_connect_strings_are_refused_as_by_mosquitto(mosquitto_broker: BrokerProcess) -> None:
    """Mosquitto closes each connection whose CONNECT has a client id, user name or
    will topic that is not an MQTT string, without a CONNACK: what the embedded broker
    is held to above (and a well-formed CONNECT gets its CONNACK from both)."""
    for name, packet in NOT_MQTT_STRINGS.items():
        assert _exchange(mosquitto_broker.port, [packet]) == (b"", True), name
    got, closed = _exchange(mosquitto_broker.port, [_connect_strings()], timeout=0.5)
    assert got == CONNACK_OK and not closed


def test_a_password_is_binary_data(broker: BrokerProcess) -> None:
    """A password that is not UTF-8 is not refused as a string (MQTT 3.1.1 §3.1.3.5): the
    login is judged, CONNACK 5 for a wrong one, and the connection closed."""
    body = (mqtt_string(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60)
            + mqtt_string(b"van-12") + mqtt_string(b"van-12") + mqtt_string(b"pw\xff\x00"))
    packet = b"\x10" + remaining_length(len(body)) + body
    assert _exchange(broker.port, [packet]) == (b"\x20\x02\x00\x05", True)


@pytest.mark.parametrize("name", list(ACL_REFUSED))
def test_filters_the_acl_refuses_keep_the_connection(broker: BrokerProcess, name: str) -> None:
    """`$SYS`, `$share` and `#` from a device are well-formed filters: SUBACK 0x80 from
    the ACL, and the connection goes on (a PINGREQ is answered)."""
    sock = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    try:
        sock.sendall(DEVICE)
        assert _read_some(sock, 5) == CONNACK_OK
        sock.sendall(_subscribe(ACL_REFUSED[name]))
        assert _read_some(sock, 5) == b"\x90\x03\x00\x01\x80"
        sock.sendall(PINGREQ)
        assert _read_some(sock, 5) == PINGRESP
    finally:
        sock.close()


def _paho_connack(port: int, protocol: MQTTProtocolVersion) -> str:
    reasons: list[str] = []
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id="van-12", protocol=protocol, reconnect_on_failure=False)
    client.username_pw_set("van-12", USERS["van-12"])
    client.on_connect = lambda c, u, f, reason, p: reasons.append(str(reason))
    client.on_disconnect = lambda c, u, f, reason, p: reasons.append(f"disconnect {reason}")
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    try:
        wait_until(lambda: reasons, 10, message="paho's CONNACK or disconnect")
    finally:
        client.disconnect()
        client.loop_stop()
    return reasons[0]


@pytest.mark.parametrize(("protocol", "hint"), [
    (MQTTProtocolVersion.MQTTv5, "the client speaks MQTT 5"),
    (MQTTProtocolVersion.MQTTv31, "the client speaks MQTT 3.1"),
])
def test_paho_on_another_protocol_version_is_told_so(
        broker: BrokerProcess, protocol: MQTTProtocolVersion, hint: str) -> None:
    """Real paho clients speaking MQTT 5 and MQTT 3.1 get CONNACK 0x01, which paho
    reports as an unsupported or unacceptable protocol version, and the broker's log
    says what to change (amqtt dropped both with no CONNACK and no hint)."""
    reason = _paho_connack(broker.port, protocol)
    assert "protocol version" in reason.lower(), reason
    wait_until(lambda: hint in broker.log_tail(200), 10, message="the hint logged")


def test_a_huge_client_id_costs_bounded_log(broker: BrokerProcess) -> None:
    """A device CONNECT with a 65,535-byte client id is refused (CONNACK 5, client id
    is not its username) with log lines of bounded length: amqtt's line and the auth
    plugin's each carried the whole id (131 KB of log per attempt)."""
    before = broker.log_path.stat().st_size
    got, closed = _exchange(broker.port, [_connect(client_id="v" * 65_535)])
    assert closed and got == b"\x20\x02\x00\x05"
    wait_until(lambda: "client id differs" in broker.log_tail(20), 10, message="logged")
    assert broker.log_path.stat().st_size - before < 4_000


def test_devices_keep_working_after_the_probes(broker: BrokerProcess) -> None:
    """After every probe the broker still routes an honest device's messages."""
    watcher = RecordingClient(broker.port, "watcher", SERVER_USER, USERS[SERVER_USER])
    device = RecordingClient(broker.port, "van-12", "van-12", USERS["van-12"])
    try:
        assert watcher.connect() == "Success" and watcher.subscribe(UP) == 1
        assert device.connect() == "Success"
        device.publish(UP, b"still here")
        assert watcher.wait_for(UP, b"still here")
    finally:
        device.close()
        watcher.close()
