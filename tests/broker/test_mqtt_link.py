"""MqttLink, the one paho adapter: connect, QoS 1 both ways, self-healing reconnects."""

from __future__ import annotations

import itertools
import random
import statistics
import threading
import time
from queue import Empty, Queue

import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from broker.embedded.passwords import write_password_entry
from tests.fixtures_brokers import FAST_BACKOFF, PREFIX, SERVER_USER, USERS, BrokerProcess
from tests.helpers import RecordingClient, wait_until
from waystation.config import MqttConfig
from waystation.mqtt import Backoff, MqttLink, Will, backoff_delay, backoff_delays

UP = f"{PREFIX}/van-12/up"
DOWN = f"{PREFIX}/van-12/down"
STATUS = f"{PREFIX}/van-12/status"


class Inbox:
    """Thread-safe collector for on_message / on_connect / on_disconnect calls."""

    def __init__(self) -> None:
        self.messages: Queue[tuple[str, bytes]] = Queue()
        self.connects: list[bool] = []
        self.disconnects: list[str] = []
        self._lock = threading.Lock()

    def on_message(self, topic: str, payload: bytes) -> None:
        self.messages.put((topic, payload))

    def on_connect(self, session_present: bool) -> None:
        with self._lock:
            self.connects.append(session_present)

    def on_disconnect(self, reason: str) -> None:
        with self._lock:
            self.disconnects.append(reason)

    def get(self, timeout: float = 10.0) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)



def device_link(made: list[MqttLink], broker: BrokerProcess, inbox: Inbox | None = None,
                **kw: object) -> MqttLink:
    inbox = inbox or Inbox()
    link = MqttLink(client_id="van-12", host=broker.host, port=broker.port, username="van-12",
                    password=USERS["van-12"], backoff=FAST_BACKOFF,
                    on_message=inbox.on_message, on_connect=inbox.on_connect,
                    on_disconnect=inbox.on_disconnect, **kw)  # type: ignore[arg-type]
    made.append(link)
    return link


def server_link(made: list[MqttLink], broker: BrokerProcess, inbox: Inbox | None = None,
                client_id: str = "merge-1") -> MqttLink:
    inbox = inbox or Inbox()
    link = MqttLink(client_id=client_id, host=broker.host, port=broker.port,
                    username=SERVER_USER, password=USERS[SERVER_USER], backoff=FAST_BACKOFF,
                    on_message=inbox.on_message, on_connect=inbox.on_connect)
    made.append(link)
    return link


# ------------------------------------------------------------------ backoff (pure)


def test_backoff_stays_between_floor_and_growing_ceiling() -> None:
    """Attempt n waits in [initial, min(max, initial * 2**(n+1))]; the ceiling caps at max."""
    policy = Backoff(initial=0.5, maximum=30.0)
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2 ** (attempt + 1))
        samples = [backoff_delay(attempt, policy, rng) for _ in range(400)]
        assert min(samples) >= 0.5 and max(samples) <= ceiling
        # full jitter: the whole range is used, not just its top
        assert max(samples) > 0.5 + 0.8 * (ceiling - 0.5)
        assert min(samples) < 0.5 + 0.2 * (ceiling - 0.5)
    assert backoff_delay(10_000, policy, rng) <= 30.0


def test_backoff_grows_and_is_jittered() -> None:
    """Typical delays grow with the attempt number, and two clients do not move in step."""
    policy = Backoff(initial=0.1, maximum=100.0)
    rng = random.Random(1)
    medians = [statistics.median(backoff_delay(n, policy, rng) for _ in range(300))
               for n in range(8)]
    assert all(later > earlier * 1.5 for earlier, later in itertools.pairwise(medians))
    a = backoff_delays(policy, random.Random(2))
    b = backoff_delays(policy, random.Random(3))
    assert [next(a) for _ in range(6)] != [next(b) for _ in range(6)]


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    """The same seed gives the same series (deterministic tests of callers)."""
    policy = Backoff()
    first = backoff_delays(policy, random.Random(42))
    second = backoff_delays(policy, random.Random(42))
    assert [next(first) for _ in range(10)] == [next(second) for _ in range(10)]


@pytest.mark.parametrize("kw", [{"initial": 0.0}, {"initial": 2.0, "maximum": 1.0},
                                {"multiplier": 0.5}])
def test_backoff_rejects_nonsense(kw: dict[str, float]) -> None:
    """A zero floor, a max below the floor or a shrinking multiplier is refused."""
    with pytest.raises(ValueError):
        Backoff(**kw)


# ------------------------------------------------------------------ with brokers


def test_connects_publishes_and_receives_qos1(
    embedded_broker: BrokerProcess, links: list[MqttLink]
) -> None:
    """Device up -> server, server down -> device, both QoS 1, sockets with TCP_NODELAY."""
    dev_in, srv_in = Inbox(), Inbox()
    srv = server_link(links, embedded_broker, srv_in)
    srv.subscribe(f"{PREFIX}/+/up")
    dev = device_link(links, embedded_broker, dev_in)
    dev.subscribe(DOWN)
    assert not dev.publish(UP, b"too early")  # not started: refused, not queued
    srv.start()
    dev.start()
    assert dev.wait_connected(10) and srv.wait_connected(10)
    assert dev.wait_subscribed(DOWN, 10) and srv.wait_subscribed(f"{PREFIX}/+/up", 10)
    assert dev.tcp_nodelay is True and srv.tcp_nodelay is True
    assert dev.publish(UP, b"change-1")
    assert srv_in.get() == (UP, b"change-1")
    assert srv.publish(DOWN, b"ack-1")
    assert dev_in.get() == (DOWN, b"ack-1")
    assert dev_in.connects == [False]


def test_refused_subscription_is_reported(
    embedded_broker: BrokerProcess, links: list[MqttLink]
) -> None:
    """wait_subscribed is False for a topic the ACL refuses, True for the allowed one."""
    dev = device_link(links, embedded_broker)
    dev.subscribe(f"{PREFIX}/van-7/down")
    dev.subscribe(DOWN)
    dev.start()
    assert dev.wait_subscribed(DOWN, 10)
    assert not dev.wait_subscribed(f"{PREFIX}/van-7/down", 10)


def test_reconnects_by_itself_after_broker_kill_and_restart(
    any_broker: BrokerProcess, links: list[MqttLink]
) -> None:
    """kill -9 the broker: publish says False while it is down; after a restart on the same
    port the link reconnects, re-subscribes if the session was lost, and traffic flows."""
    dev_in, srv_in = Inbox(), Inbox()
    dev = device_link(links, any_broker, dev_in)
    dev.subscribe(DOWN)
    srv = server_link(links, any_broker, srv_in)
    srv.subscribe(f"{PREFIX}/+/up")
    dev.start()
    srv.start()
    assert dev.wait_subscribed(DOWN, 10) and srv.wait_subscribed(f"{PREFIX}/+/up", 10)

    with capture_logs() as logs:
        any_broker.kill()
        wait_until(lambda: not dev.connected and not srv.connected, 15, message="links down")
        assert dev.publish(UP, b"while-down") is False
        wait_until(lambda: dev.last_error is not None, 10, message="a failed reconnect attempt")
    assert dev_in.disconnects and not dev.connected
    # An accepted connection that died is no refused attempt (it once logged "connection
    # ended ... before the broker accepted it" and counted as a refused certificate).
    assert not [e for e in logs if "before the broker accepted" in str(e.get("reason"))]

    any_broker.start()
    assert dev.wait_connected(15) and srv.wait_connected(15)
    assert dev.wait_subscribed(DOWN, 10) and srv.wait_subscribed(f"{PREFIX}/+/up", 10)
    assert len(dev_in.connects) == 2
    wait_until(lambda: dev.publish(UP, b"after-restart"), 10, message="publish accepted")
    assert srv_in.get() == (UP, b"after-restart")
    assert srv.publish(DOWN, b"welcome-back")
    assert dev_in.get() == (DOWN, b"welcome-back")


def test_shared_subscription_survives_a_graceful_mosquitto_restart(
    mosquitto_broker: BrokerProcess, links: list[MqttLink]
) -> None:
    """Mosquitto restores a kept session after a restart but not its shared subscriptions:
    the link subscribes again although the session is present, so a merge server on
    `$share/...` still hears every device."""
    shared = f"$share/waystation/{PREFIX}/+/up"
    srv_in = Inbox()
    srv = server_link(links, mosquitto_broker, srv_in)
    srv.subscribe(shared)
    srv.start()
    assert srv.wait_subscribed(shared, 10)

    mosquitto_broker.stop()  # SIGTERM: the session is saved with the database
    mosquitto_broker.start()
    wait_until(lambda: len(srv_in.connects) == 2, 15, message="reconnected")
    assert srv_in.connects == [False, True]  # the broker says it kept the session
    assert srv.wait_subscribed(shared, 10)
    dev = RecordingClient(mosquitto_broker.port, "van-12", "van-12", USERS["van-12"])
    try:
        assert dev.connect() == "Success"
        dev.publish(UP, b"after-restart")
    finally:
        dev.close()
    assert srv_in.get() == (UP, b"after-restart")


def test_persistent_session_queues_while_device_is_away(
    any_broker: BrokerProcess, links: list[MqttLink]
) -> None:
    """clean_session=False by default: what the server sends while the device is offline
    is waiting for it when it comes back, and the broker reports the session present."""
    first = device_link(links, any_broker)
    first.subscribe(DOWN)
    first.start()
    assert first.wait_subscribed(DOWN, 10)
    first.stop()
    srv = RecordingClient(any_broker.port, "merge-1", SERVER_USER, USERS[SERVER_USER])
    try:
        assert srv.connect() == "Success"
        srv.publish(DOWN, b"queued-while-away")  # returns once the broker PUBACKed it
    finally:
        srv.close()

    back_in = Inbox()
    back = device_link(links, any_broker, back_in)
    back.subscribe(DOWN)
    back.start()
    assert back_in.get() == (DOWN, b"queued-while-away")
    assert back_in.connects == [True]


@pytest.mark.parametrize("clean", [True, False])
def test_stop_clean_or_abrupt_controls_the_will(
    any_broker: BrokerProcess, links: list[MqttLink], clean: bool
) -> None:
    """stop(clean=True) disconnects politely (no will); stop(clean=False) makes it fire."""
    watcher = RecordingClient(any_broker.port, "watch-1", SERVER_USER, USERS[SERVER_USER])
    try:
        watcher.connect()
        assert watcher.subscribe(f"{PREFIX}/+/status") == 1
        dev = device_link(links, any_broker, will=Will(STATUS, b'{"on":false}'))
        dev.start()
        assert dev.wait_connected(10)
        assert dev.publish(STATUS, b'{"on":true}', retain=True)
        watcher.wait_for(STATUS, b'{"on":true}')
        dev.stop(clean=clean)
        # marker after the stop: once it arrives, a will would have arrived before it
        van7 = RecordingClient(any_broker.port, "van-7", "van-7", USERS["van-7"])
        try:
            van7.connect()
            van7.publish(f"{PREFIX}/van-7/status", b"marker")
        finally:
            van7.close()
        if clean:
            watcher.wait_for(f"{PREFIX}/van-7/status", b"marker")
            assert watcher.received(STATUS)[-1].payload == b'{"on":true}'
        else:
            watcher.wait_for(STATUS, b'{"on":false}')
    finally:
        watcher.close()


def test_clean_stop_of_a_long_connection_logs_no_connack_timeout(
    embedded_broker: BrokerProcess, links: list[MqttLink]
) -> None:
    """Stopping a connection that stood longer than connect_timeout is no failed attempt:
    it once logged `mqtt connection attempt failed ... no CONNACK` at every clean stop
    (the connect timeout was measured from the attempt, not only until the CONNACK)."""
    dev = device_link(links, embedded_broker, connect_timeout=0.2)
    dev.start()
    assert dev.wait_connected(10)
    up_since = time.monotonic()
    wait_until(lambda: time.monotonic() - up_since > 0.5, timeout=5)
    with capture_logs() as logs:
        dev.stop()
    assert not [e for e in logs if e["event"] == "mqtt connection attempt failed"], logs
    assert "CONNACK" not in (dev.last_error or "")


def test_never_gives_up_until_enrolled(
    embedded_broker: BrokerProcess, links: list[MqttLink]
) -> None:
    """Refused (unknown user), the link keeps retrying with backoff and gets in once the
    device is enrolled, with no help from the caller."""
    link = MqttLink(client_id="van-77", host=embedded_broker.host, port=embedded_broker.port,
                    username="van-77", password="pw-77", backoff=FAST_BACKOFF)
    links.append(link)
    link.start()
    wait_until(lambda: "refused" in (link.last_error or ""), 10, message="refusal reported")
    assert not link.connected
    write_password_entry(embedded_broker.password_file, "van-77", "pw-77")
    assert link.wait_connected(15)
    assert link.last_error is None


def test_failing_callback_does_not_kill_the_link(
    embedded_broker: BrokerProcess, links: list[MqttLink]
) -> None:
    """An exception in on_message is logged; later messages still arrive."""
    seen: Queue[bytes] = Queue()

    def handler(topic: str, payload: bytes) -> None:
        seen.put(payload)
        if payload == b"boom":
            raise RuntimeError("handler bug")

    dev = MqttLink(client_id="van-12", host=embedded_broker.host, port=embedded_broker.port,
                   username="van-12", password=USERS["van-12"], on_message=handler)
    links.append(dev)
    dev.subscribe(DOWN)
    srv = server_link(links, embedded_broker)
    dev.start()
    srv.start()
    assert dev.wait_subscribed(DOWN, 10) and srv.wait_connected(10)
    assert srv.publish(DOWN, b"boom") and srv.publish(DOWN, b"fine")
    assert [seen.get(timeout=10), seen.get(timeout=10)] == [b"boom", b"fine"]
    assert dev.connected
    with pytest.raises(Empty):
        seen.get_nowait()


def test_from_config_uses_the_pydantic_mqtt_config(
    embedded_broker: BrokerProcess, links: list[MqttLink]
) -> None:
    """MqttLink.from_config(MqttConfig) connects; the username defaults to the client id."""
    cfg = MqttConfig(host=embedded_broker.host, port=embedded_broker.port,
                     password=SecretStr(USERS["van-12"]), keepalive_s=20)
    link = MqttLink.from_config(cfg, client_id="van-12", backoff=FAST_BACKOFF)
    links.append(link)
    link.start()
    assert link.wait_connected(10), link.last_error
    assert link.keepalive == 20
