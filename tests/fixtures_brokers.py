"""Real brokers in subprocesses for tests, and the ACL contract every broker must pass.

    embedded_broker      ``python -m broker.embedded`` (amqtt + our plugins) on a free port
    mosquitto_broker     ``mosquitto -c <generated conf>`` with the design's pattern ACL
    any_broker           each of the two in turn (parametrized)

Each broker gets its own temporary directory with a password file (``USERS``, written
by ``broker.embedded.passwords``, so Mosquitto reading it is itself a compatibility check), its
config and its log. ``BrokerProcess`` can ``stop()`` (SIGTERM), ``kill()`` (SIGKILL, as
a crash), ``start()`` again on the same port, or ``restart()``.

Mosquitto tests are skipped, saying why, only when the binary is not installed.
"""

from __future__ import annotations

import getpass
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from queue import Queue

import pytest

from broker.embedded.acl import mosquitto_acl_lines
from broker.embedded.passwords import write_password_entry
from tests.helpers import (
    RecordingClient,
    free_port,
    peer_socket_nodelay,
    port_open,
    terminate,
    wait_until,
)
from waystation.mqtt import Backoff, MqttLink

__all__ = [
    "MOSQUITTO",
    "PREFIX",
    "SERVER_USER",
    "USERS",
    "BrokerAclContract",
    "BrokerProcess",
    "any_broker",
    "embedded_broker",
    "mosquitto_broker",
    "start_embedded",
    "start_mosquitto",
]

PREFIX = "waystation"
SERVER_USER = "waystation-server"
USERS = {"van-12": "pw-van-12", "van-7": "pw-van-7", SERVER_USER: "pw-server"}
MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                           if Path("/usr/sbin/mosquitto").exists() else None)
FAST_BACKOFF = Backoff(initial=0.05, maximum=0.5)


class BrokerProcess:
    """One broker subprocess on a fixed host:port (kept across restarts)."""

    def __init__(self, name: str, argv: list[str], *, host: str, port: int, workdir: Path,
                 password_file: Path) -> None:
        self.name, self.argv = name, argv
        self.host, self.port = host, port
        self.workdir, self.password_file = workdir, password_file
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """mqtt://host:port"""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        """Start the process and wait until it accepts TCP connections."""
        assert not self.running, f"{self.name} already running"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, start_new_session=True)
        wait_until(lambda: (port_open(self.host, self.port)
                            or self._died_early()), timeout,
                   message=lambda: f"{self.name} listening on {self.port}:\n{self.log_tail()}")
        if not self.running:
            raise AssertionError(f"{self.name} exited at start:\n{self.log_tail()}")
        return self

    def _died_early(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait: the broker must exit 0 within `timeout` (AssertionError with
        its log otherwise; SIGKILLed first when it hangs). Returns the exit code (the
        earlier one when it had already ended, e.g. killed on purpose)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        if not terminate(self.proc, timeout):
            raise AssertionError(f"{self.name} ignored SIGTERM for {timeout} s:\n"
                                 f"{self.log_tail()}")
        if self.proc.returncode != 0:
            raise AssertionError(f"{self.name} exited {self.proc.returncode} on SIGTERM, "
                                 f"not 0:\n{self.log_tail()}")
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (kill -9): the broker dies with no chance to save or say goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(15)
        wait_until(lambda: not port_open(self.host, self.port), 10,
                   message=f"{self.name} port {self.port} closed")

    def restart(self, *, hard: bool = False) -> BrokerProcess:
        """Stop (or kill, when ``hard``) and start again on the same port."""
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the broker's log, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def write_users(path: Path) -> Path:
    """The test fleet's password file (our writer, Mosquitto's format)."""
    for user, password in USERS.items():
        write_password_entry(path, user, password)
    return path


def start_embedded(workdir: Path, port: int | None = None,
                   extra_args: Sequence[str] = ()) -> BrokerProcess:
    """Start ``python -m broker.embedded`` in ``workdir`` on ``port`` (a free one by default)."""
    workdir.mkdir(parents=True, exist_ok=True)
    password_file = write_users(workdir / "passwd")
    port = port or free_port()
    argv = [sys.executable, "-m", "broker.embedded", "--host", "127.0.0.1",
            "--port", str(port), "--password-file", str(password_file),
            "--data-dir", str(workdir / "data"), "--prefix", PREFIX,
            "--server-user", SERVER_USER, "--log-level", "debug", *extra_args]
    return BrokerProcess("embedded", argv, host="127.0.0.1", port=port, workdir=workdir,
                         password_file=password_file).start()


def mosquitto_conf(workdir: Path, port: int, password_file: Path, acl_file: Path) -> str:
    """A Mosquitto 2.0 config: the design's ACL, Nagle off, persistence saved every second."""
    return "\n".join([
        f"listener {port} 127.0.0.1",
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
        "set_tcp_nodelay true",
        "persistence true",
        f"persistence_location {workdir}/",
        "autosave_interval 1",
        "max_queued_messages 100000",
        "max_inflight_messages 100",
        # mosquitto started as root switches to this user; keep the one that owns the files
        f"user {getpass.getuser()}",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_type subscribe",
        "connection_messages true",
        "",
    ])


def start_mosquitto(workdir: Path, port: int | None = None) -> BrokerProcess:
    """Start Mosquitto in ``workdir`` on ``port`` with a generated config."""
    assert MOSQUITTO is not None
    workdir.mkdir(parents=True, exist_ok=True)
    password_file = write_users(workdir / "passwd")
    acl_file = workdir / "acl"
    acl_file.write_text("\n".join(mosquitto_acl_lines(prefix=PREFIX,
                                                      server_users={SERVER_USER})) + "\n")
    os.chmod(acl_file, 0o600)
    port = port or free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(mosquitto_conf(workdir, port, password_file, acl_file))
    return BrokerProcess("mosquitto", [MOSQUITTO, "-c", str(conf)], host="127.0.0.1",
                         port=port, workdir=workdir, password_file=password_file).start()


def _skip_without_mosquitto() -> None:
    if MOSQUITTO is None:
        pytest.skip("the mosquitto binary is not installed (apt-get install mosquitto)")


@pytest.fixture
def embedded_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A fresh embedded broker subprocess (stopped at teardown)."""
    broker = start_embedded(tmp_path / "embedded")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    """A fresh Mosquitto subprocess with the pattern ACL (stopped at teardown)."""
    _skip_without_mosquitto()
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(params=["embedded", "mosquitto"])
def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerProcess]:
    """Each broker kind in turn."""
    if request.param == "mosquitto":
        _skip_without_mosquitto()
        broker = start_mosquitto(tmp_path / "mosquitto")
    else:
        broker = start_embedded(tmp_path / "embedded")
    try:
        yield broker
    finally:
        broker.stop()


# ------------------------------------------------------------------ the ACL contract


class BrokerAclContract:
    """What every broker in front of Waystation must do, checked with plain paho clients.

    A subclass named ``Test...`` provides the ``broker`` fixture. Every "refused" check
    is closed by a marker message that must arrive after the refused one would have.
    """

    clients: list[RecordingClient]

    @pytest.fixture(autouse=True)
    def _track_clients(self) -> Iterator[None]:
        self.clients = []
        yield
        for client in self.clients:
            client.close()

    def client(self, broker: BrokerProcess, user: str | None, *, client_id: str | None = None,
               password: str | None = None, clean_session: bool = True,
               will: tuple[str, bytes, bool] | None = None) -> RecordingClient:
        """A connected (or refused) recording client; closed after the test."""
        c = RecordingClient(
            broker.port, client_id or user or "anon",
            user, USERS.get(user or "", "") if password is None else password,
            clean_session=clean_session, will=will,
        )
        self.clients.append(c)
        c.connect()
        return c

    def device(self, broker: BrokerProcess, dev: str, **kw: object) -> RecordingClient:
        """A device connected as itself; asserts it was accepted."""
        c = self.client(broker, dev, **kw)  # type: ignore[arg-type]
        assert c.state.connacks[-1] == "Success", broker.log_tail()
        return c

    def server(self, broker: BrokerProcess, subscribe: str = f"{PREFIX}/#") -> RecordingClient:
        """The server user, subscribed to ``subscribe``."""
        c = self.client(broker, SERVER_USER, client_id="waystation-server-test")
        assert c.state.connacks[-1] == "Success", broker.log_tail()
        assert c.subscribe(subscribe) == 1
        return c

    def test_device_publishes_on_its_own_up_and_status(self, broker: BrokerProcess) -> None:
        """A device's up and status messages reach the server."""
        srv = self.server(broker)
        dev = self.device(broker, "van-12")
        dev.publish(f"{PREFIX}/van-12/up", b"hello")
        dev.publish(f"{PREFIX}/van-12/status", b'{"on":true}', retain=True)
        srv.wait_for(f"{PREFIX}/van-12/up", b"hello")
        srv.wait_for(f"{PREFIX}/van-12/status", b'{"on":true}')

    def test_device_cannot_publish_as_another_device(self, broker: BrokerProcess) -> None:
        """A publish on another device's up or status is dropped (marker arrives, it does not)."""
        srv = self.server(broker)
        dev = self.device(broker, "van-12")
        dev.publish(f"{PREFIX}/van-7/up", b"forged")
        dev.publish(f"{PREFIX}/van-7/status", b"forged")
        dev.publish(f"{PREFIX}/elsewhere", b"forged")
        dev.publish(f"{PREFIX}/van-12/up", b"marker")
        srv.wait_for(f"{PREFIX}/van-12/up", b"marker")
        assert [m for m in srv.received() if m.payload == b"forged"] == []
        assert dev.state.disconnects == []  # refused publishes are PUBACKed and dropped

    def test_device_cannot_publish_on_any_down_topic(self, broker: BrokerProcess) -> None:
        """Only the server speaks on down topics: a device's publish there is dropped."""
        srv = self.server(broker)
        victim = self.device(broker, "van-7")
        assert victim.subscribe(f"{PREFIX}/van-7/down") == 1
        dev = self.device(broker, "van-12")
        dev.publish(f"{PREFIX}/van-7/down", b"forged")
        dev.publish(f"{PREFIX}/van-12/down", b"forged")
        dev.publish(f"{PREFIX}/van-12/up", b"marker")
        srv.wait_for(f"{PREFIX}/van-12/up", b"marker")
        srv.client.publish(f"{PREFIX}/van-7/down", b"from-server", qos=1)
        victim.wait_for(f"{PREFIX}/van-7/down", b"from-server")
        assert [m for m in srv.received() + victim.received() if m.payload == b"forged"] == []

    refuses_wide_subscriptions = True
    """Whether the broker answers a forbidden SUBSCRIBE with 0x80. Mosquitto 2.0 grants
    it and then delivers only what the read ACL allows, which is just as safe."""

    @pytest.mark.parametrize("topic_filter", [
        "#", f"{PREFIX}/#", f"{PREFIX}/+/down", f"{PREFIX}/+/up", f"{PREFIX}/van-7/down",
        f"{PREFIX}/van-7/up", "+/van-12/down", f"{PREFIX}/+/status",
    ])
    def test_device_subscriptions_beyond_its_down_get_nothing(
        self, broker: BrokerProcess, topic_filter: str
    ) -> None:
        """A wider subscription is refused (0x80) or at least delivers nothing of others'."""
        dev = self.device(broker, "van-12")
        code = dev.subscribe(topic_filter)
        if self.refuses_wide_subscriptions:
            assert code == 0x80
        assert dev.subscribe(f"{PREFIX}/van-12/down") == 1
        other = self.device(broker, "van-7")
        other.publish(f"{PREFIX}/van-7/up", b"private")
        srv = self.server(broker)
        srv.publish(f"{PREFIX}/van-7/down", b"private")
        srv.publish(f"{PREFIX}/van-12/down", b"marker")
        dev.wait_for(f"{PREFIX}/van-12/down", b"marker")
        assert [m.payload for m in dev.received()] == [b"marker"]

    def test_device_gets_what_the_server_sends_it(self, broker: BrokerProcess) -> None:
        """The server's message on a device's down topic reaches that device, QoS 1."""
        dev = self.device(broker, "van-12")
        assert dev.subscribe(f"{PREFIX}/van-12/down") == 1
        srv = self.server(broker)
        srv.publish(f"{PREFIX}/van-12/down", b"ack")
        assert dev.wait_for(f"{PREFIX}/van-12/down", b"ack").qos == 1

    @pytest.mark.parametrize("user,password", [
        ("van-12", "wrong"), ("nobody", "pw-van-12"), ("van-12", ""),
    ])
    def test_bad_credentials_are_refused(
        self, broker: BrokerProcess, user: str, password: str
    ) -> None:
        """Wrong password, unknown user, empty password: CONNACK refuses."""
        c = self.client(broker, user, password=password)
        assert c.state.connacks == ["Not authorized"]

    def test_anonymous_is_refused(self, broker: BrokerProcess) -> None:
        """No username, no connection."""
        c = self.client(broker, None, client_id="anon-1")
        assert c.state.connacks == ["Not authorized"]

    def test_server_receives_every_device_up(self, broker: BrokerProcess) -> None:
        """One subscription to {prefix}/+/up gets every device's up messages."""
        srv = self.server(broker, subscribe=f"{PREFIX}/+/up")
        for dev in ("van-12", "van-7"):
            self.device(broker, dev).publish(f"{PREFIX}/{dev}/up", dev.encode())
        srv.wait_for(f"{PREFIX}/van-12/up", b"van-12")
        srv.wait_for(f"{PREFIX}/van-7/up", b"van-7")

    def test_retained_status_reaches_a_later_subscriber(self, broker: BrokerProcess) -> None:
        """A retained status is delivered, flagged retained, to whoever subscribes later."""
        dev = self.device(broker, "van-12")
        dev.publish(f"{PREFIX}/van-12/status", b'{"on":true}', retain=True)
        srv = self.server(broker, subscribe=f"{PREFIX}/+/status")
        message = srv.wait_for(f"{PREFIX}/van-12/status", b'{"on":true}')
        assert message.retain

    retained_on_wildcards = True
    """Whether a wildcard subscription gets the retained messages it matches. RabbitMQ's
    MQTT plugin delivers retained messages only to exact-topic subscriptions."""

    def test_devices_read_but_never_write_server_announcements(
        self, broker: BrokerProcess
    ) -> None:
        """A device subscribes to its server group's announcements (PROTOCOL.md §7.12) and
        gets them (the retained one, where the broker gives retained messages to wildcard
        subscriptions); its own publish there is dropped, only servers announce."""
        topic = f"{PREFIX}/_server/main/server-1/state"
        srv = self.server(broker)
        dev = self.device(broker, "van-12")
        assert dev.subscribe(f"{PREFIX}/_server/main/+/state") == 1
        srv.publish(topic, b'{"on":true}', retain=True)
        srv.wait_for(topic, b'{"on":true}')
        dev.wait_for(topic, b'{"on":true}')
        if self.retained_on_wildcards:
            later = self.device(broker, "van-7")
            assert later.subscribe(f"{PREFIX}/_server/main/+/state") == 1
            assert later.wait_for(topic, b'{"on":true}').retain
        dev.close()
        for forged in (topic, f"{PREFIX}/_server/main/van-12/state"):
            self.forge(broker, forged)
        self.device(broker, "van-12").publish(f"{PREFIX}/van-12/up", b"marker")
        srv.wait_for(f"{PREFIX}/van-12/up", b"marker")
        assert [m for m in srv.received() if m.payload == b"forged"] == []
        srv.publish(topic, b"", retain=True)  # clear the retained announcement again

    def forge(self, broker: BrokerProcess, topic: str) -> None:
        """Device van-12 publishes (retained) on a topic it may not publish on; the
        broker drops it."""
        forger = self.device(broker, "van-12")
        forger.publish(topic, b"forged", retain=True)
        forger.close()

    def test_will_fires_on_abrupt_disconnect(self, broker: BrokerProcess) -> None:
        """A device that vanishes gets its last will published (and retained) on status."""
        srv = self.server(broker, subscribe=f"{PREFIX}/+/status")
        dev = self.device(broker, "van-12", clean_session=False,
                          will=(f"{PREFIX}/van-12/status", b'{"on":false}', True))
        dev.abort()
        srv.wait_for(f"{PREFIX}/van-12/status", b'{"on":false}')
        later = self.client(broker, SERVER_USER, client_id="waystation-server-later")
        assert later.subscribe(f"{PREFIX}/van-12/status") == 1
        assert later.wait_for(f"{PREFIX}/van-12/status", b'{"on":false}').retain

    def test_broker_sets_tcp_nodelay_on_client_sockets(self, broker: BrokerProcess) -> None:
        """The broker's end of a client connection has TCP_NODELAY (read from its process)."""
        dev = self.device(broker, "van-12")
        sock: object = dev.client.socket()
        client_port = sock.getsockname()[1]  # type: ignore[attr-defined]
        assert broker.proc is not None
        assert peer_socket_nodelay(broker.proc.pid, broker.port, client_port) is True

    def test_qos1_round_trip_is_fast(self, broker: BrokerProcess) -> None:
        """device -> server -> device over QoS 1 with MqttLink: median well under 20 ms.

        Nagle's algorithm against delayed ACKs would stall round trips by 40 ms or more in
        every batch; a machine loaded by other work (parallel test workers) only delays
        some. So a batch of 50 whose median is over the bound is measured again, up to
        three batches: the best median still has to be under 20 ms.
        """
        replies: Queue[bytes] = Queue()
        srv: MqttLink | None = None

        def echo(topic: str, payload: bytes) -> None:
            assert srv is not None
            srv.publish(topic.replace("/up", "/down"), payload)

        srv = MqttLink(client_id="waystation-server-rtt", host=broker.host, port=broker.port,
                       username=SERVER_USER, password=USERS[SERVER_USER], on_message=echo)
        dev = MqttLink(client_id="van-12", host=broker.host, port=broker.port,
                       username="van-12", password=USERS["van-12"],
                       on_message=lambda t, p: replies.put(p))
        srv.subscribe(f"{PREFIX}/+/up")
        dev.subscribe(f"{PREFIX}/van-12/down")
        batches: list[list[float]] = []
        with srv, dev:
            assert srv.wait_subscribed(f"{PREFIX}/+/up", 10)
            assert dev.wait_subscribed(f"{PREFIX}/van-12/down", 10)
            assert dev.tcp_nodelay and srv.tcp_nodelay
            while len(batches) < 3 and not any(statistics.median(b) < 20 for b in batches):
                times = []
                for i in range(50):
                    started = time.perf_counter()
                    assert dev.publish(f"{PREFIX}/van-12/up", b"%d" % i)
                    assert replies.get(timeout=10) == b"%d" % i
                    times.append((time.perf_counter() - started) * 1000)
                batches.append(times)
        medians = [statistics.median(b) for b in batches]
        print(f"\n{broker.name}: QoS-1 echo round trip median {min(medians):.2f} ms "
              f"(best of {len(batches)} batches of 50; medians {medians})")
        assert min(medians) < 20, batches
