"""`MqttLink(on_retained=...)`: a retained message the broker sends on subscribe is told
apart from a live one (the merge server must not read a replayed status's `t` as how far
the device's clock is now, `broker.server.clockskew`), and what a broker queued in a
persistent session while the link was away comes as live: old, yet not retained."""

from __future__ import annotations

from queue import Queue

from tests.broker.test_mqtt_link import STATUS, device_link
from tests.fixtures_brokers import FAST_BACKOFF, SERVER_USER, USERS, BrokerProcess
from tests.helpers import RecordingClient
from waystation.mqtt import MqttLink


def test_retained_on_subscribe_goes_to_on_retained_and_live_to_on_message(
        any_broker: BrokerProcess, links: list[MqttLink]) -> None:
    """The replay on subscribe reaches `on_retained` only; a publish after it reaches
    `on_message`, retained or not; statuses queued in the session while the server was
    away reach `on_message` (live by the flag, though old: the pair rule of clockskew)."""
    live: Queue[bytes] = Queue()
    replayed: Queue[bytes] = Queue()

    def server() -> MqttLink:
        link = MqttLink(client_id="merge-1", host=any_broker.host, port=any_broker.port,
                        username=SERVER_USER, password=USERS[SERVER_USER],
                        backoff=FAST_BACKOFF, on_message=lambda t, p: live.put(p),
                        on_retained=lambda t, p: replayed.put(p))
        links.append(link)
        link.subscribe(STATUS, qos=1)
        return link

    dev = device_link(links, any_broker)
    dev.start()
    assert dev.wait_connected(10)
    assert dev.publish(STATUS, b"before", retain=True)
    # Stored before the server subscribes: the embedded broker PUBACKs a message before
    # it routes it, so a subscription taken at once may get it live (seen under load).
    probe = RecordingClient(any_broker.port, "merge-probe", SERVER_USER, USERS[SERVER_USER])
    try:
        assert probe.connect() == "Success"
        assert probe.subscribe(STATUS) == 1
        assert probe.wait_for(STATUS, b"before").retain
    finally:
        probe.close()
    srv = server()
    srv.start()
    assert replayed.get(timeout=10) == b"before"
    assert srv.wait_connected(10)
    assert dev.publish(STATUS, b"after", retain=True)
    assert live.get(timeout=10) == b"after"
    assert replayed.empty()
    srv.stop()
    links.remove(srv)
    assert dev.publish(STATUS, b"while-away", qos=1, retain=True)
    again = server()
    again.start()
    assert live.get(timeout=10) == b"while-away"
