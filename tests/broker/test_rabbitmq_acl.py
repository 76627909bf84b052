"""A three-node RabbitMQ cluster with broker.rabbitmq.definitions passes the ACL contract,
and what the cluster does with sessions, retained statuses and wills across nodes."""

from __future__ import annotations

import pytest

from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerAclContract, BrokerProcess
from tests.helpers import RecordingClient, wait_until
from tests.rabbitmq_cluster import RabbitCluster

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


@pytest.fixture
def cluster(rabbit_cluster: RabbitCluster) -> RabbitCluster:
    """The package's cluster."""
    return rabbit_cluster


class _NodeBroker(BrokerProcess):
    """One cluster node seen through the BrokerProcess interface the contract uses."""

    def __init__(self, cluster: RabbitCluster, index: int) -> None:
        node = cluster.nodes[index]
        super().__init__(f"rabbitmq-{index + 1}", [], host="127.0.0.1", port=node.mqtt_port,
                         workdir=node.dir, password_file=node.dir / "none")
        self.cluster = cluster
        self.proc = node.proc

    def log_tail(self, lines: int = 40) -> str:
        return self.cluster.log_tails(lines)


FORBIDDEN_PUBLISH = [f"{PREFIX}/van-7/up", f"{PREFIX}/van-7/status", f"{PREFIX}/elsewhere",
                     f"{PREFIX}/van-7/down", f"{PREFIX}/van-12/down"]
FORBIDDEN_FILTERS = ["#", f"{PREFIX}/#", f"{PREFIX}/+/down", f"{PREFIX}/+/up",
                     f"{PREFIX}/van-7/down", f"{PREFIX}/van-7/up", "+/van-12/down",
                     f"{PREFIX}/+/status"]


class TestRabbitMqAcl(BrokerAclContract):
    """The ACL contract against node 2 of the cluster.

    RabbitMQ 3.10 answers a forbidden PUBLISH or SUBSCRIBE by closing the connection
    (no PUBACK, no SUBACK 0x80) and a bad login with "bad user name or password"; the
    tests of those cases are overridden below to assert exactly that, and that nothing
    forbidden got through.
    """

    retained_on_wildcards = False

    @pytest.fixture
    def broker(self, cluster: RabbitCluster) -> BrokerProcess:
        """The broker under test."""
        return _NodeBroker(cluster, 1)

    def _closed_after(self, broker: BrokerProcess, action: str, topic: str) -> None:
        dev = self.device(broker, "van-12")
        if action == "publish":
            dev.client.publish(topic, b"forged", qos=1)
        else:
            dev.client.subscribe(topic, 1)
        wait_until(lambda: dev.state.disconnects, 10, message=f"{action} {topic} closes")
        assert dev.state.pubacks == set() and dev.state.subacks == {}

    def forge(self, broker: BrokerProcess, topic: str) -> None:
        """RabbitMQ closes the connection of a device publishing where it may not."""
        self._closed_after(broker, "publish", topic)

    def test_device_cannot_publish_as_another_device(self, broker: BrokerProcess) -> None:
        """A publish on another device's topics, or on any down topic, closes the
        device's connection and reaches nobody."""
        srv = self.server(broker)
        victim = self.device(broker, "van-7")
        assert victim.subscribe(f"{PREFIX}/van-7/down") == 1
        for topic in FORBIDDEN_PUBLISH:
            self._closed_after(broker, "publish", topic)
        self.device(broker, "van-12").publish(f"{PREFIX}/van-12/up", b"marker")
        srv.wait_for(f"{PREFIX}/van-12/up", b"marker")
        assert [m for m in srv.received() + victim.received() if m.payload == b"forged"] == []

    def test_device_cannot_publish_on_any_down_topic(self, broker: BrokerProcess) -> None:
        """Covered with every other forbidden publish above (one connection each)."""
        self._closed_after(broker, "publish", f"{PREFIX}/van-12/down")

    @pytest.mark.parametrize("topic_filter", FORBIDDEN_FILTERS)
    def test_device_subscriptions_beyond_its_down_get_nothing(
        self, broker: BrokerProcess, topic_filter: str
    ) -> None:
        """A subscription beyond the device's own down closes its connection; its own
        down subscription still works and carries only its messages."""
        self._closed_after(broker, "subscribe", topic_filter)
        dev = self.device(broker, "van-12")
        assert dev.subscribe(f"{PREFIX}/van-12/down") == 1
        srv = self.server(broker)
        srv.publish(f"{PREFIX}/van-7/down", b"private")
        srv.publish(f"{PREFIX}/van-12/down", b"marker")
        dev.wait_for(f"{PREFIX}/van-12/down", b"marker")
        assert [m.payload for m in dev.received()] == [b"marker"]

    @pytest.mark.parametrize("user,password", [
        ("van-12", "wrong"), ("nobody", "pw-van-12"), ("van-12", ""),
    ])
    def test_bad_credentials_are_refused(
        self, broker: BrokerProcess, user: str, password: str
    ) -> None:
        """Wrong password, unknown user, empty password: CONNACK refuses (code 4)."""
        c = self.client(broker, user, password=password)
        assert c.state.connacks == ["Bad user name or password"]

    def test_anonymous_is_refused(self, broker: BrokerProcess) -> None:
        """No username, no connection (mqtt.allow_anonymous = false)."""
        c = self.client(broker, None, client_id="anon-1")
        assert c.state.connacks == ["Bad user name or password"]

    def test_retained_status_reaches_a_later_subscriber(self, broker: BrokerProcess) -> None:
        """A retained status reaches a later exact-topic subscriber on the same node, but
        not a wildcard subscriber: RabbitMQ 3.10 looks retained messages up by exact topic
        only (so presence cannot be rebuilt from them: the AMQP intake does not try)."""
        dev = self.device(broker, "van-12")
        dev.publish(f"{PREFIX}/van-12/status", b'{"on":true}', retain=True)
        exact = self.server(broker, subscribe=f"{PREFIX}/van-12/status")
        assert exact.wait_for(f"{PREFIX}/van-12/status", b'{"on":true}').retain
        wide = self.client(broker, SERVER_USER, client_id="waystation-server-wide")
        assert wide.subscribe(f"{PREFIX}/+/status") == 1
        dev.publish(f"{PREFIX}/van-12/up", b"marker")
        marker = self.server(broker, subscribe=f"{PREFIX}/+/up")
        dev.publish(f"{PREFIX}/van-12/up", b"marker")
        marker.wait_for(f"{PREFIX}/van-12/up", b"marker")
        assert wide.received() == []


def _client(cluster: RabbitCluster, node: int, user: str, client_id: str | None = None,
            **kw: object) -> RecordingClient:
    c = RecordingClient(cluster.mqtt_port(node), client_id or user, user, USERS[user],
                        **kw)  # type: ignore[arg-type]
    return c


def test_device_on_one_node_reaches_the_server_on_another(cluster: RabbitCluster) -> None:
    """Routing is cluster-wide: up from node 1 reaches a server on node 3, down goes back."""
    srv = _client(cluster, 2, SERVER_USER, "srv-x")
    dev = _client(cluster, 0, "van-12")
    try:
        assert srv.connect() == "Success" and dev.connect() == "Success"
        assert srv.subscribe(f"{PREFIX}/+/up") == 1
        assert dev.subscribe(f"{PREFIX}/van-12/down") == 1
        dev.publish(f"{PREFIX}/van-12/up", b"hi")
        srv.wait_for(f"{PREFIX}/van-12/up", b"hi")
        srv.publish(f"{PREFIX}/van-12/down", b"ack")
        dev.wait_for(f"{PREFIX}/van-12/down", b"ack")
    finally:
        dev.close()
        srv.close()


def test_device_cannot_open_another_devices_session(cluster: RabbitCluster) -> None:
    """Logged in as van-12 under van-7's client id, a device gets none of van-7's queued
    messages: the plugin refuses it van-7's session queue."""
    victim = _client(cluster, 0, "van-7", clean_session=False)
    assert victim.connect() == "Success"
    assert victim.subscribe(f"{PREFIX}/van-7/down") == 1
    victim.close()
    srv = _client(cluster, 1, SERVER_USER, "srv-y")
    thief = _client(cluster, 2, "van-12", client_id="van-7", clean_session=False)
    try:
        assert srv.connect() == "Success"
        srv.publish(f"{PREFIX}/van-7/down", b"private")
        result = thief.connect()
        received = thief.received()
        assert result != "Success" or thief.state.disconnects, (result, received)
        assert [m for m in received if m.payload == b"private"] == []
    finally:
        thief.close()
        srv.close()
    back = _client(cluster, 1, "van-7", clean_session=False)
    try:
        assert back.connect() == "Success"
        back.wait_for(f"{PREFIX}/van-7/down", b"private")
    finally:
        back.close()


def test_retained_status_is_kept_per_node(cluster: RabbitCluster) -> None:
    """A retained status published on node 1 is delivered to an exact subscriber on
    node 1 only: RabbitMQ 3.10 keeps retained messages per node, not cluster-wide."""
    dev = _client(cluster, 0, "van-7")
    here = _client(cluster, 0, SERVER_USER, "srv-here")
    there = _client(cluster, 2, SERVER_USER, "srv-there")
    try:
        assert dev.connect() == "Success"
        dev.publish(f"{PREFIX}/van-7/status", b'{"on":false}', retain=True)
        assert here.connect() == "Success" and there.connect() == "Success"
        assert here.subscribe(f"{PREFIX}/van-7/status") == 1
        assert here.wait_for(f"{PREFIX}/van-7/status", b'{"on":false}').retain
        assert there.subscribe(f"{PREFIX}/van-7/status") == 1
        dev.publish(f"{PREFIX}/van-7/status", b"marker")
        there.wait_for(f"{PREFIX}/van-7/status", b"marker")
        assert [m.payload for m in there.received()] == [b"marker"]
    finally:
        for c in (dev, here, there):
            c.close()
