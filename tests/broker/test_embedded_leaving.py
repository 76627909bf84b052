"""A client that leaves right after publishing, on a starved embedded broker: every
message the broker PUBACKed is routed (broker.embedded.amqtt_overrides).

amqtt's session monitor wakes every second and empties the queues of any clean session
it finds disconnected, among them the messages the client sent, was PUBACKed for, and
the broker had not routed yet. On an idle machine the broker routes them within
milliseconds of the disconnect, before a wake-up; on a loaded one (CI at load 6.7) a
wake-up fell in between and the tail of the flood was lost: here the broker is starved
(stopped most of the time) so that the routing after the disconnect spans wake-ups."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_for_progress
from tests.raw_mqtt import mqtt_string, remaining_length

UP = f"{PREFIX}/van-12/up"
FLOOD = 2000
DISCONNECT = b"\xe0\x00"


@contextmanager
def _starved(broker: BrokerProcess, run_s: float = 0.01, stopped_s: float = 0.04
             ) -> Iterator[None]:
    """The broker process runs `run_s` out of every `run_s + stopped_s` (SIGSTOP and
    SIGCONT): a machine so loaded that it gets a fifth of a core."""
    assert broker.proc is not None
    pid, done = broker.proc.pid, threading.Event()

    def cycle() -> None:
        while not done.wait(run_s):
            os.kill(pid, signal.SIGSTOP)
            done.wait(stopped_s)
            os.kill(pid, signal.SIGCONT)

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        os.kill(pid, signal.SIGCONT)


def _connect() -> bytes:
    body = (mqtt_string("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60)
            + mqtt_string("van-12") + mqtt_string("van-12") + mqtt_string(USERS["van-12"]))
    return b"\x10" + remaining_length(len(body)) + body


def _publish(packet_id: int) -> bytes:
    body = mqtt_string(UP) + struct.pack("!H", packet_id) + _payload(packet_id)
    return b"\x32" + remaining_length(len(body)) + body


def _payload(packet_id: int) -> bytes:
    return packet_id.to_bytes(4, "big") + b"x" * 96


def _pubacks(data: bytes) -> set[int]:
    """The packet ids of the PUBACKs in `data` (the CONNACK's 4 bytes first)."""
    assert data[:4] == b"\x20\x02\x00\x00", data[:4]
    acked, i = set(), 4
    while i + 4 <= len(data):
        assert data[i:i + 2] == b"\x40\x02", data[i:i + 4]
        acked.add(struct.unpack("!H", data[i + 2:i + 4])[0])
        i += 4
    assert i == len(data)
    return acked


def _read_to_end(sock: socket.socket) -> bytes:
    sock.settimeout(30)  # per read: the broker answers within seconds, even starved
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_what_a_client_sent_before_it_left_is_routed_on_a_starved_broker(
        embedded_broker: BrokerProcess) -> None:
    """A device sends 2000 QoS 1 messages and DISCONNECT in one go while the broker is
    starved. Every message the broker PUBACKed reaches the connected watcher and the
    away server. (Old code: the last 300-1200 of them were PUBACKed and never routed.)"""
    srv = RecordingClient(embedded_broker.port, "merge-1", SERVER_USER, USERS[SERVER_USER],
                          clean_session=False)
    assert srv.connect() == "Success" and srv.subscribe(f"{PREFIX}/+/up") == 1
    srv.close()
    watcher = RecordingClient(embedded_broker.port, "watcher", SERVER_USER,
                              USERS[SERVER_USER])
    assert watcher.connect() == "Success" and watcher.subscribe(UP) == 1
    try:
        with socket.create_connection(("127.0.0.1", embedded_broker.port)) as dev, \
                _starved(embedded_broker):
            dev.sendall(_connect() + b"".join(_publish(i) for i in range(1, FLOOD + 1))
                        + DISCONNECT)
            acked = _pubacks(_read_to_end(dev))
            assert len(acked) == FLOOD
            want = {_payload(i) for i in acked}
            wait_for_progress(lambda: len(watcher.received(UP)), len(want), idle_s=15,
                              message="every PUBACKed message routed to the watcher")
        assert {m.payload for m in watcher.received(UP)} == want
    finally:
        watcher.close()
    back = RecordingClient(embedded_broker.port, "merge-1", SERVER_USER, USERS[SERVER_USER],
                           clean_session=False)
    assert back.connect() == "Success"
    try:
        wait_for_progress(lambda: len(back.received(UP)), len(want), idle_s=15,
                          message="every PUBACKed message kept for the away server")
        assert {m.payload for m in back.received(UP)} == want
    finally:
        back.close()


def test_what_a_client_sent_before_a_new_connection_took_over_is_routed(
        embedded_broker: BrokerProcess) -> None:
    """A device sends 2000 QoS 1 messages on a starved broker and, at once, connects
    again with the same client id (a clean session) on a second socket, as after a link
    it took for dead: the broker closes the first connection, and every message it
    PUBACKed there reaches the watcher. (Old code: the new connection's clean session
    deleted the old one with the messages not routed yet.)"""
    watcher = RecordingClient(embedded_broker.port, "watcher", SERVER_USER,
                              USERS[SERVER_USER])
    assert watcher.connect() == "Success" and watcher.subscribe(UP) == 1
    try:
        with socket.create_connection(("127.0.0.1", embedded_broker.port)) as first, \
                socket.create_connection(("127.0.0.1", embedded_broker.port)) as second:
            first.sendall(_connect())
            assert first.recv(4) == b"\x20\x02\x00\x00"
            with _starved(embedded_broker):
                first.sendall(b"".join(_publish(i) for i in range(1, FLOOD + 1)))
                second.sendall(_connect())
                acked = _pubacks(b"\x20\x02\x00\x00" + _read_to_end(first))
                second.settimeout(30)
                assert second.recv(4) == b"\x20\x02\x00\x00"
                assert acked, "nothing PUBACKed before the take-over"
                want = {_payload(i) for i in acked}
                wait_for_progress(lambda: len(watcher.received(UP)), len(want), idle_s=15,
                                  message="every PUBACKed message routed to the watcher")
            print(f"{len(acked)} of {FLOOD} PUBACKed on the first connection")
        assert {m.payload for m in watcher.received(UP)} == want
    finally:
        watcher.close()
