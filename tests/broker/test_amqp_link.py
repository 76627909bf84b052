"""broker.server.amqp_link against a real three-node RabbitMQ cluster: devices' MQTT up and
status reach the server over AMQP, an up message is redelivered until it is settled, and
the server's down publishes reach the device's MQTT session with QoS 1."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.server.amqp_link import AmqpLink, routing_key_to_topic, topic_to_routing_key
from broker.server.intake.fair import Item
from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS
from tests.helpers import RecordingClient, wait_until
from tests.rabbitmq_cluster import RabbitCluster
from waystation.mqtt import Backoff

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

LEVEL = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(st.lists(LEVEL, min_size=1, max_size=5))
def test_topic_and_routing_key_round_trip(levels: list[str]) -> None:
    """MQTT topic <-> routing key as RabbitMQ's plugin maps them ('/' and '.' swapped)."""
    topic = "/".join(levels)
    key = topic_to_routing_key(topic)
    assert key.count(".") == len(levels) - 1
    assert routing_key_to_topic(key) == topic


def _item(payload: bytes) -> Item:
    """An up message as the server's intake hands it back to be settled."""
    return Item(kind="up", device="van-12", payload=payload, size=len(payload))


class _Server:
    """An AmqpLink with a queue of what it received."""

    def __init__(self, cluster: RabbitCluster, server_id: str, nodes: list[int]) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.link = AmqpLink(nodes=[("127.0.0.1", cluster.amqp_port(i)) for i in nodes],
                             username=SERVER_USER, password=USERS[SERVER_USER],
                             prefix=PREFIX, server_id=server_id, prefetch=50,
                             backoff=Backoff(initial=0.05, maximum=0.5),
                             on_message=lambda t, p: self.inbox.put((t, p)))

    def __enter__(self) -> _Server:
        self.link.start()
        assert self.link.wait_connected(30), self.link.last_error
        return self

    def __exit__(self, *exc: object) -> None:
        self.link.stop()

    def next_up(self, timeout: float = 15) -> tuple[str, bytes]:
        while True:
            topic, payload = self.inbox.get(timeout=timeout)
            if topic.endswith("/up"):
                return topic, payload


@pytest.fixture
def device(rabbit_cluster: RabbitCluster) -> Iterator[RecordingClient]:
    """van-12 on node 1, subscribed to its down topic with a persistent session."""
    c = RecordingClient(rabbit_cluster.mqtt_port(0), "van-12", "van-12", USERS["van-12"],
                        clean_session=False)
    assert c.connect() == "Success"
    assert c.subscribe(f"{PREFIX}/van-12/down") == 1
    yield c
    c.close()


def test_up_and_status_arrive_over_amqp(rabbit_cluster: RabbitCluster,
                                        device: RecordingClient) -> None:
    """A device's MQTT up and status messages reach the server's link as MQTT topics."""
    with _Server(rabbit_cluster, "link-a", [2]) as srv:
        device.publish(f"{PREFIX}/van-12/status", b'{"on":true}', retain=True)
        device.publish(f"{PREFIX}/van-12/up", b'{"n":1}')
        got = {srv.inbox.get(timeout=15), srv.inbox.get(timeout=15)}
        assert got == {(f"{PREFIX}/van-12/status", b'{"on":true}'),
                       (f"{PREFIX}/van-12/up", b'{"n":1}')}
        srv.link.settle([_item(p) for t, p in got if t.endswith("/up")])


def test_unsettled_up_is_redelivered_and_settled_up_is_not(
        rabbit_cluster: RabbitCluster, device: RecordingClient) -> None:
    """An up message a server took but never settled (it died) goes to the next server;
    once settled, it is gone from the queue."""
    with _Server(rabbit_cluster, "link-b", [1]) as first:
        device.publish(f"{PREFIX}/van-12/up", b"unsettled-1")
        assert first.next_up() == (f"{PREFIX}/van-12/up", b"unsettled-1")
    with _Server(rabbit_cluster, "link-c", [2]) as second:
        _topic, payload = second.next_up()
        assert payload == b"unsettled-1"
        second.link.settle([_item(payload)])
        device.publish(f"{PREFIX}/van-12/up", b"marker-1")
        _, marker = second.next_up()
        assert marker == b"marker-1"
        second.link.settle([_item(marker)])
    with _Server(rabbit_cluster, "link-d", [0]) as third:
        device.publish(f"{PREFIX}/van-12/up", b"marker-2")
        assert third.next_up()[1] == b"marker-2"
        assert third.inbox.empty()


def test_down_publish_reaches_the_device_with_qos1(rabbit_cluster: RabbitCluster,
                                                  device: RecordingClient) -> None:
    """The server's publish on a device's down topic arrives through MQTT, QoS 1, even
    when server and device are on different nodes."""
    with _Server(rabbit_cluster, "link-e", [2]) as srv:
        assert srv.link.publish(f"{PREFIX}/van-12/down", b'{"type":"ack"}')
        got = device.wait_for(f"{PREFIX}/van-12/down", b'{"type":"ack"}')
        assert got.qos == 1


def test_wrong_password_keeps_retrying_and_says_why(rabbit_cluster: RabbitCluster) -> None:
    """A refused login is reported in last_error and retried; publish says False."""
    link = AmqpLink(nodes=[("127.0.0.1", rabbit_cluster.amqp_port(0))], username=SERVER_USER,
                    password="wrong", prefix=PREFIX, server_id="link-bad",
                    backoff=Backoff(initial=0.05, maximum=0.2))
    link.start()
    try:
        wait_until(lambda: link.last_error, 20, message="a login error")
        assert "ACCESS_REFUSED" in (link.last_error or "") or "Auth" in (link.last_error or "")
        assert not link.connected
        assert link.publish(f"{PREFIX}/van-12/down", b"x") is False
    finally:
        link.stop()
