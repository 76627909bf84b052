"""The log lines one client can make a real embedded broker write are bounded
(broker.embedded.log_limits): hostile clients over TCP repeat what amqtt 0.12.1 logged a
line for each time (10,000 times: unknown PUBACKs, publishes the ACL refuses, QoS 1
messages never PUBACKed), and the broker writes a few lines saying how many there were,
while a well-behaved client's events still appear at once."""

from __future__ import annotations

import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.broker.test_embedded_hostile import _connect_packet
from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess, start_embedded
from tests.helpers import RecordingClient, wait_until
from tests.raw_mqtt import mqtt_string, remaining_length

N = 10_000
WINDOW_S = 4.0
MAX_LINES = 12
"""Lines a flood of N may cost with a WINDOW_S window: one at its start and one per window
it lasts (the floods here last under 30 s), counted generously."""
MAX_BYTES = 6000


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """An embedded broker at log level info that holds back repeats for WINDOW_S."""
    proc = start_embedded(tmp_path / "broker",
                          extra_args=["--log-level", "info",
                                      "--log-repeat-window-s", str(WINDOW_S)])
    yield proc
    proc.stop()


def _log(broker: BrokerProcess) -> bytes:
    return broker.log_path.read_bytes()


def _accounted(lines: list[str]) -> int:
    """Events the lines stand for: one each, or the count a summary line gives."""
    total = 0
    for line in lines:
        count = re.search(r"more_like_it=(\d+)|\((\d+) more like it", line)
        total += int(count.group(1) or count.group(2)) if count else 1
    return total


class _Device:
    """van-12 over a raw socket: logs in, reads everything, acknowledges nothing."""

    def __init__(self, broker: BrokerProcess) -> None:
        self.sock = socket.create_connection(("127.0.0.1", broker.port), timeout=10)
        self.sock.sendall(_connect_packet("van-12", USERS["van-12"]))
        assert self.sock.recv(4) == b"\x20\x02\x00\x00"
        self.received = 0
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None

    def read_in_background(self) -> None:
        self.sock.settimeout(0.2)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self.received += len(data)

    def close(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.join(5)
        self.sock.close()


def _publish(topic: str, packet_id: int, payload: bytes) -> bytes:
    body = mqtt_string(topic) + struct.pack("!H", packet_id) + payload
    return bytes([0x32]) + remaining_length(len(body)) + body


def _unknown_pubacks(broker: BrokerProcess, device: _Device,
                     server: RecordingClient, n: int) -> None:
    device.sock.sendall(b"".join(b"\x40\x02" + struct.pack("!H", i + 1) for i in range(n)))


def _refused_publishes(broker: BrokerProcess, device: _Device,
                       server: RecordingClient, n: int) -> None:
    device.sock.sendall(b"".join(_publish(f"{PREFIX}/van-7/up", i + 1, b"x")
                                 for i in range(n)))


def _never_pubacked(broker: BrokerProcess, device: _Device, server: RecordingClient,
                    n: int) -> None:
    down = f"{PREFIX}/van-12/down"
    device._stop.set()
    assert device._reader is not None
    device._reader.join(5)
    body = struct.pack("!H", 1) + mqtt_string(down) + b"\x01"
    device.sock.settimeout(10)
    device.sock.sendall(bytes([0x82]) + remaining_length(len(body)) + body)
    assert device.sock.recv(5) == b"\x90\x03\x00\x01\x01"
    device._stop.clear()
    device.read_in_background()
    sent = [server.client.publish(down, b"delta %05d" % i, qos=1) for i in range(n)]
    wait_until(lambda: all(m.mid in server.state.pubacks for m in sent), 60,
               message="the server's publishes PUBACKed by the broker")


Flood = Callable[[BrokerProcess, _Device, RecordingClient, int], None]
FLOODS: dict[str, tuple[Flood, str, int]] = {
    "unknown PUBACKs": (_unknown_pubacks, "Received PUBACK for unknown pending message", N),
    "publishes the ACL refuses": (_refused_publishes, "acl denied", N),
    # 2,000: each one waits out its PUBACK timeout before it is logged (10,000 took 21 s
    # of the suite; amqtt 0.12.1 wrote ~22,000 lines for 2,000)
    "QoS 1 messages never PUBACKed": (_never_pubacked, "client did not acknowledge a message",
                                      2_000),
}


@pytest.mark.parametrize("flood", list(FLOODS))
def test_a_client_repeating_itself_costs_a_bounded_log(broker: BrokerProcess,
                                                       flood: str) -> None:
    """10,000 repeats of one thing amqtt or the ACL logs per packet add at most
    MAX_LINES lines (amqtt 0.12.1: 10,001 lines for unknown PUBACKs or refused publishes,
    111,179 lines and 10.5 MB for messages never PUBACKed), and those lines still count
    every one of them; the other device's refusal and the server's messages are not held
    back meanwhile."""
    do, marker, n = FLOODS[flood]
    wait_until(lambda: b"embedded broker ready" in _log(broker), 10, message="broker ready")
    before = _log(broker)
    device = _Device(broker)
    device.read_in_background()
    other = RecordingClient(broker.port, "van-7", "van-7", USERS["van-7"])
    server = RecordingClient(broker.port, SERVER_USER, SERVER_USER, USERS[SERVER_USER])
    try:
        assert other.connect() == "Success" and server.connect() == "Success"
        assert server.subscribe(f"{PREFIX}/+/up") == 1
        do(broker, device, server, n)

        def ours() -> list[str]:
            added = _log(broker)[len(before):].decode(errors="replace")
            return [line for line in added.splitlines() if marker in line
                    and "user=van-7" not in line]

        wait_until(lambda: _accounted(ours()) >= n, 60,
                   message=lambda: f"{n} {flood} counted in the log: {ours()[-3:]}")
        # The well-behaved device's events while van-12's are held back:
        other.publish(f"{PREFIX}/van-12/up", b"not mine")  # refused, and logged
        wait_until(lambda: b"user=van-7" in _log(broker)[len(before):], 10,
                   message="van-7's refusal logged at once")
        other.publish(f"{PREFIX}/van-7/up", b"mine")
        server.wait_for(f"{PREFIX}/van-7/up", b"mine")
    finally:
        device.close()
        other.close()
        server.close()
    added = _log(broker)[len(before):]
    lines = added.decode(errors="replace").splitlines()
    assert _accounted([line for line in lines if marker in line
                       and "user=van-7" not in line]) == n, lines[-5:]
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n" + "\n".join(lines[:20])
    assert len(added) <= MAX_BYTES, f"{len(added)} bytes"
    assert "Traceback" not in added.decode(errors="replace")
