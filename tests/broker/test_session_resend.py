"""A QoS 1 message a persistent session's connection did not acknowledge before it ended
(a clean DISCONNECT, a take-over by the client's next connection) is sent again to the
session's next connection (MQTT 3.1.1 §4.4), as it went the first time: live.

amqtt dropped it: a connection's stop gave up its PUBACK waits and forgot the messages,
and what was routed to a connection while it stopped went nowhere. The merge server,
reconnecting, then got a device's status published at that moment only as the retained
replay, or not at all (tests/broker/test_mqtt_retained.py failed so once in a CI run;
the embedded broker hands such messages back since: broker.embedded.amqtt_handler)."""

from __future__ import annotations

import socket
import struct
from queue import Queue

import pytest

from tests.broker.test_mqtt_link import STATUS, device_link
from tests.fixtures_brokers import FAST_BACKOFF, SERVER_USER, USERS, BrokerProcess
from tests.raw_mqtt import mqtt_string, remaining_length
from waystation.mqtt import MqttLink

DISCONNECT = b"\xe0\x00"



def _packet(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + remaining_length(len(body)) + body


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """One packet: (first byte, body)."""
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "connection closed by the broker"
            data += chunk
        return data
    first, length, shift = exactly(1)[0], 0, 0
    while True:
        digit = exactly(1)[0]
        length += (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            return first, exactly(length)


def _silent_server(broker: BrokerProcess) -> socket.socket:
    """merge-1 on a persistent session, subscribed to `STATUS`, acknowledging nothing."""
    sock = socket.create_connection((broker.host, broker.port), timeout=10)
    sock.sendall(_packet(0x10, mqtt_string("MQTT") + bytes([4, 0xC0]) + struct.pack("!H", 60)
                         + mqtt_string("merge-1") + mqtt_string(SERVER_USER)
                         + mqtt_string(USERS[SERVER_USER])))
    assert _read_packet(sock) == (0x20, b"\x00\x00"), "CONNACK, no session present"
    sock.sendall(_packet(0x82, struct.pack("!H", 1) + mqtt_string(STATUS) + b"\x01"))
    assert _read_packet(sock) == (0x90, b"\x00\x01\x01"), "SUBACK, QoS 1"
    return sock


@pytest.mark.parametrize("ending", ["disconnect", "take-over"])
def test_a_message_not_acknowledged_goes_again_to_the_next_connection(
        any_broker: BrokerProcess, links: list[MqttLink], ending: str) -> None:
    """The server's connection gets a device's status and ends without acknowledging
    it; its next connection (the same persistent session) gets it again, live."""
    live: Queue[bytes] = Queue()
    dev = device_link(links, any_broker)
    dev.start()
    assert dev.wait_connected(10)
    with _silent_server(any_broker) as old:
        assert dev.publish(STATUS, b"unacknowledged", qos=1, retain=True)
        first, body = _read_packet(old)
        assert first & 0xF6 == 0x32 and b"unacknowledged" in body, (first, body)
        if ending == "disconnect":
            old.sendall(DISCONNECT)
        srv = MqttLink(client_id="merge-1", host=any_broker.host, port=any_broker.port,
                       username=SERVER_USER, password=USERS[SERVER_USER],
                       backoff=FAST_BACKOFF, on_message=lambda t, p: live.put(p),
                       on_retained=lambda t, p: None)
        links.append(srv)
        srv.subscribe(STATUS, qos=1)
        srv.start()
        assert srv.wait_connected(10)
        assert live.get(timeout=10) == b"unacknowledged"
