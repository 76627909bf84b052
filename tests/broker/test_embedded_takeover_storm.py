"""A device's reconnect storm on an embedded broker that was frozen (SIGSTOP, a paused
VM) longer than the device's keepalive: resumed, the broker finds the device's old
connection and a queue of CONNECTs of the same client id, the first from attempts the
device gave up on (closed), the last its live one. The last connection keeps the
session: it hears what is sent to the device, and no earlier connection's will follows
its fresh status (broker.embedded.attach_turns, fix 7 of broker.embedded.amqtt_broker).

Before the fix the CONNECTs took the old connection over at once: all stopped it, the
first to attach was stopped by no one, and its end (its client long gone) published the
will and marked the session disconnected under the live connection, which then heard
nothing (tests/e2e/test_fault_pairs_frozen.py: van-1 never got van-2's changes)."""

from __future__ import annotations

import os
import signal
import socket
import struct

import pytest

from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_until
from tests.raw_mqtt import mqtt_string, remaining_length

STATUS = f"{PREFIX}/van-12/status"
DOWN = f"{PREFIX}/van-12/down"
WILL = (STATUS, b"off", True)



def _client(made: list[RecordingClient], broker: BrokerProcess, client_id: str, user: str,
            **kw: object) -> RecordingClient:
    client = RecordingClient(broker.port, client_id, user, USERS[user],
                             **kw)  # type: ignore[arg-type]
    made.append(client)
    return client


def _connect_packet() -> bytes:
    """CONNECT of van-12: persistent session, will `WILL` (QoS 1, retained)."""
    flags = 0x80 | 0x40 | 0x20 | 0x08 | 0x04  # user, password, will retain, will QoS 1, will
    body = (mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", 5)
            + mqtt_string("van-12") + mqtt_string(WILL[0]) + mqtt_string(WILL[1])
            + mqtt_string("van-12") + mqtt_string(USERS["van-12"]))
    return b"\x10" + remaining_length(len(body)) + body


def _given_up(broker: BrokerProcess) -> None:
    """A connection attempt the device gave up on: its CONNECT sent, then closed."""
    with socket.create_connection((broker.host, broker.port), timeout=5) as sock:
        sock.sendall(_connect_packet())


@pytest.mark.parametrize("old_silent", [True, False])
@pytest.mark.parametrize("given_up", [1, 3])
def test_the_last_of_a_reconnect_storm_keeps_the_session_and_the_status(
        embedded_broker: BrokerProcess, clients: list[RecordingClient], given_up: int,
        old_silent: bool) -> None:
    """`given_up` abandoned CONNECTs, then the live one, while the broker is frozen; the
    old connection silent (its client frozen too: the broker still holds it open) or
    closed."""
    server = _client(clients, embedded_broker, "merge-1", SERVER_USER)
    server.connect()
    assert server.subscribe(STATUS) == 1
    old = _client(clients, embedded_broker, "van-12", "van-12", clean_session=False,
                  will=WILL)
    assert old.connect() == "Success"
    assert old.subscribe(DOWN) == 1
    old.publish(STATUS, b"on-old", retain=True)
    server.wait_for(STATUS, b"on-old")
    assert embedded_broker.proc is not None
    pid = embedded_broker.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        if old_silent:
            old.client.loop_stop()  # frozen too: its socket stays open, nothing read
        else:
            old.abort()
        for _ in range(given_up):
            _given_up(embedded_broker)
        new = _client(clients, embedded_broker, "van-12", "van-12", clean_session=False,
                      will=WILL)
        new.client.connect(embedded_broker.host, embedded_broker.port, keepalive=30)
        new.client.loop_start()
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: new.state.connacks, 10, message="the last CONNECT answered")
    assert new.state.connacks == ["Success"]
    new.publish(STATUS, b"on", retain=True)
    server.wait_for(STATUS, b"on")
    for i in range(3):
        marker = f"after the storm {i}".encode()
        server.publish(DOWN, marker)
        new.wait_for(DOWN, marker, timeout=5)
    # Whatever the earlier connections' ends did, it was before the fresh status.
    new.publish(STATUS, b"still on", retain=True)
    server.wait_for(STATUS, b"still on")
    seen = [m.payload for m in server.received(STATUS)]
    assert seen[seen.index(b"on"):] == [b"on", b"still on"], seen
    assert new.state.disconnects == []
