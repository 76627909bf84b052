"""deploy/mosquitto/mosquitto.conf and acl, checked against a real Mosquitto.

The broker is started from the shipped file itself: `render_conf` (in tests/mosquitto_prod.py,
shared with the end-to-end fleet) rewrites only what must differ on a test machine (file
paths into tmp_path, ports to free ones, both listeners on loopback, the unprivileged
`user` to the test's own) and asserts it found every line it rewrites, so the semantics
under test are exactly the production ones.

Mosquitto drops a publish that the ACL denies *silently* (MQTT 3.1.1 has no way to say
no; the publisher still gets its PUBACK), so "never delivered" is checked with a marker:
the same client then publishes something it may publish, and once the marker has
arrived, the denied message, processed before it, would have arrived too.
"""

from __future__ import annotations

import signal
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.embedded.acl import mosquitto_acl_lines
from broker.embedded.passwords import write_password_entry
from tests.helpers import free_port, port_open, wait_until
from tests.mosquitto_prod import (
    ACL,
    CONF,
    MOSQUITTO,
    directives,
    render_conf,
    write_production_conf,
)
from tests.tlsca import CertificateAuthority, IssuedCert, make_ca, make_server_cert

SERVER_USER = "waystation-server"
DEVICES = ("van-1", "van-2", "van-3")
DEADLINE_S = 15.0

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed "
                       "(apt-get install mosquitto; scripts/test.sh does it)"),
]


def password(user: str) -> str:
    """Every test user's password (tests only)."""
    return f"pw-{user}-secret"


# ------------------------------------------------------------------------- the broker

class Mosquitto:
    """A mosquitto process run from the rendered production config."""

    def __init__(self, workdir: Path, conf: Path, port: int, tls_port: int,
                 ca: CertificateAuthority) -> None:
        self.workdir = workdir
        self.conf = conf
        self.port = port
        self.tls_port = tls_port
        self.ca = ca
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start mosquitto and wait until both listeners accept connections."""
        assert MOSQUITTO is not None
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                         stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc
        wait_until(lambda: proc.poll() is not None
                   or (port_open("127.0.0.1", self.port) and port_open("127.0.0.1", self.tls_port)),
                   DEADLINE_S, message=lambda: f"mosquitto listening:\n{self.log_text()}")
        if proc.poll() is not None:
            raise AssertionError(f"mosquitto exited with {proc.returncode}:\n{self.log_text()}")

    def stop(self) -> int:
        """SIGTERM (a graceful shutdown, which saves the database); the exit status."""
        proc = self.proc
        if proc is None:
            return 0
        self.proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise

    def log_text(self) -> str:
        """What mosquitto logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertificateAuthority, IssuedCert]:
    """A throwaway CA and a broker certificate for 127.0.0.1/localhost."""
    base = tmp_path_factory.mktemp("mosquitto-ca")
    authority = make_ca(base / "ca")
    return authority, make_server_cert(authority, base / "server")


@pytest.fixture
def broker(tmp_path: Path, ca: tuple[CertificateAuthority, IssuedCert]) -> Iterator[Mosquitto]:
    """Mosquitto from the production config, with the server user and DEVICES enrolled."""
    authority, server_cert = ca
    port, tls_port = free_port(), free_port()
    while tls_port == port:
        tls_port = free_port()
    conf = write_production_conf(tmp_path, port=port, tls_port=tls_port,
                                 ca=authority.cert_path, cert=server_cert.cert_path,
                                 key=server_cert.key_path)
    for user in (SERVER_USER, *DEVICES):
        write_password_entry(tmp_path / "passwd", user, password(user))
    proc = Mosquitto(tmp_path, conf, port, tls_port, authority)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


# ------------------------------------------------------------------------- the clients

class Peer:
    """A paho client that records what happens to it, for assertions with deadlines."""

    def __init__(self, broker: Mosquitto, user: str | None, *, client_id: str | None = None,
                 secret: str | None = None, clean: bool = True, tls: bool = False,
                 ca_file: Path | None = None, v5: bool = False) -> None:
        self.user = user or "(anonymous)"
        cid = client_id or user or "anonymous"
        if v5:
            self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid,
                                      protocol=mqtt.MQTTv5)
        else:
            self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid,
                                      clean_session=clean, protocol=mqtt.MQTTv311)
        if user is not None:
            self.client.username_pw_set(user, password(user) if secret is None else secret)
        self.client.max_inflight_messages_set(100)
        self.port = broker.tls_port if tls else broker.port
        if tls:
            self.client.tls_set(ca_certs=str(ca_file or broker.ca.cert_path))
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.connack: str | None = None
        self.disconnects: list[str] = []
        self.messages: list[tuple[str, bytes, bool]] = []
        self.subacks: dict[int, list[str]] = {}
        self.pubacks: dict[int, str] = {}
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish

    # paho callbacks (its network thread)
    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        with self.lock:
            self.connack = str(rc)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        with self.lock:
            self.disconnects.append(str(rc))

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, codes: Any, _p: Any) -> None:
        with self.lock:
            self.subacks[mid] = [str(code) for code in codes]

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self.lock:
            self.pubacks[mid] = str(rc)

    # test-side API
    def connect(self) -> str:
        """Connect and wait for the CONNACK; its reason ("Success", "Not authorized")."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.thread = threading.Thread(target=self._network, name=f"paho-{self.user}",
                                       daemon=True)
        self.thread.start()
        wait_until(lambda: self.connack is not None, DEADLINE_S, message=f"{self.user}: CONNACK")
        assert self.connack is not None
        return self.connack

    def connected(self) -> Peer:
        """connect(), asserting success."""
        result = self.connect()
        assert result == "Success", f"{self.user} refused: {result}"
        return self

    def subscribe(self, *filters: str) -> list[str]:
        """Subscribe (QoS 1) and wait for the SUBACK; the granted codes."""
        rc, mid = self.client.subscribe([(f, 1) for f in filters])
        assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None
        wait_until(lambda: mid in self.subacks, DEADLINE_S, message=f"{self.user}: SUBACK")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> str:
        """Publish with QoS 1 and wait for the PUBACK; its reason (v5) or "Success"."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish failed: {info.rc}"
        wait_until(lambda: info.mid in self.pubacks, DEADLINE_S, message=f"{self.user}: PUBACK")
        return self.pubacks[info.mid]

    def publish_many(self, topic: str, payloads: list[bytes], timeout: float) -> None:
        """Publish all with QoS 1 (windowed by paho), then wait for every PUBACK."""
        infos = []
        for payload in payloads:
            info = self.client.publish(topic, payload, qos=1)
            assert info.rc == mqtt.MQTT_ERR_SUCCESS
            infos.append(info)
        wait_until(lambda: all(i.is_published() for i in infos), timeout,
                   message=lambda: f"{self.user}: "
                   f"{sum(not i.is_published() for i in infos)} PUBACKs still missing")

    def received(self, topic: str | None = None) -> list[bytes]:
        """Payloads received so far (on `topic`, or on any)."""
        with self.lock:
            return [p for t, p, _ in self.messages if topic is None or t == topic]

    def topics(self) -> set[str]:
        """Topics of everything received so far."""
        with self.lock:
            return {t for t, _, _ in self.messages}

    def wait_for(self, topic: str, payload: bytes, timeout: float = DEADLINE_S) -> bool:
        """Wait until `payload` has arrived on `topic` (AssertionError at the deadline)."""
        wait_until(lambda: payload in self.received(topic), timeout,
                   message=f"{self.user}: {payload[:40]!r} on {topic}")
        return True

    def _network(self) -> None:
        # paho's own loop_start() reconnects by itself (and sleeps a second before each
        # try); here a lost connection stays lost, so the tests see every disconnect.
        while self.client.loop(timeout=0.05) == mqtt.MQTT_ERR_SUCCESS:
            pass

    def close(self) -> None:
        """Disconnect cleanly; the network thread ends with the connection."""
        self.client.disconnect()
        if self.thread is not None:
            self.thread.join(timeout=DEADLINE_S)
            assert not self.thread.is_alive(), f"{self.user}: network thread did not end"


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    """Makes Peer objects; closes them all at teardown."""
    made: list[Peer] = []

    def make(broker: Mosquitto, user: str, **kwargs: Any) -> Peer:
        peer = Peer(broker, user, **kwargs)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def up(dev: str) -> str:
    """A device's up topic."""
    return f"waystation/{dev}/up"


def down(dev: str) -> str:
    """A device's down topic."""
    return f"waystation/{dev}/down"


def status(dev: str) -> str:
    """A device's status topic."""
    return f"waystation/{dev}/status"


SHARED_UP = "$share/waystation/waystation/+/up"


# ------------------------------------------------------------------------------ tests

def test_rendered_conf_keeps_every_setting_but_paths_and_ports(tmp_path: Path) -> None:
    """The test copy differs from the shipped config only in paths, ports and user."""
    original = CONF.read_text()
    rendered = render_conf(original, workdir=tmp_path, port=1, tls_port=2, ca=tmp_path / "c",
                           cert=tmp_path / "s", key=tmp_path / "k", user="nobody")
    before, after = directives(original), directives(rendered)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert changed <= {"user", "password_file", "acl_file", "persistence_location", "listener",
                       "cafile", "certfile", "keyfile"}


def test_conf_sets_the_deliberate_settings() -> None:
    """Every setting the design depends on is set, to the value it depends on."""
    found = directives(CONF.read_text())
    expected = {
        "per_listener_settings": "false", "allow_anonymous": "false",
        "persistence": "true", "autosave_interval": "60", "autosave_on_changes": "false",
        "max_queued_messages": "100000", "max_queued_bytes": "0",
        "max_inflight_messages": "100", "set_tcp_nodelay": "true",
        "max_packet_size": "266240", "persistent_client_expiration": "30d",
        "tls_version": "tlsv1.2", "require_certificate": "false",
        "use_username_as_clientid": "true",
    }
    for name, value in expected.items():
        assert found.get(name) == [value], f"{name}: {found.get(name)}"
    assert found["listener"] == ["1883 127.0.0.1", "8883"]
    assert 262144 < int(found["max_packet_size"][0]) <= 262144 + 8192


def test_acl_file_matches_the_acl_module() -> None:
    """deploy/mosquitto/acl holds exactly the rules broker.embedded.acl generates for Mosquitto."""
    def rules(lines: list[str]) -> list[str]:
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    shipped = rules(ACL.read_text().splitlines())
    generated = rules(mosquitto_acl_lines(prefix="waystation", server_users=[SERVER_USER]))
    assert shipped == generated


def test_starts_and_accepts_an_enrolled_device(broker: Mosquitto,
                                               peers: Callable[..., Peer]) -> None:
    """The shipped config starts; an enrolled device logs in and reaches the server."""
    server = peers(broker, SERVER_USER, client_id="server-1").connected()
    assert server.subscribe(SHARED_UP, "waystation/+/status") == ["Granted QoS 1"] * 2
    device = peers(broker, "van-1").connected()
    assert device.subscribe(down("van-1")) == ["Granted QoS 1"]
    device.publish(up("van-1"), b'{"type":"hello","v":1}')
    device.publish(status("van-1"), b'{"on":true}', retain=True)
    assert server.wait_for(up("van-1"), b'{"type":"hello","v":1}')
    assert server.wait_for(status("van-1"), b'{"on":true}')
    server.publish(down("van-1"), b"ack")
    assert device.wait_for(down("van-1"), b"ack")


@pytest.mark.parametrize("user,secret", [("van-1", "wrong"), ("stranger", "pw"), ("van-1", "")])
def test_wrong_credentials_are_refused(broker: Mosquitto, peers: Callable[..., Peer],
                                       user: str, secret: str) -> None:
    """A wrong password, an unknown user or an empty password is refused at CONNECT."""
    assert peers(broker, user, secret=secret).connect() == "Not authorized"


def test_anonymous_client_is_refused(broker: Mosquitto, peers: Callable[..., Peer]) -> None:
    """A client without a username is refused (allow_anonymous false)."""
    assert peers(broker, None).connect() == "Not authorized"


@pytest.mark.parametrize("topic", [up("van-2"), status("van-2"), down("van-2"), down("van-1")])
def test_device_cannot_publish_outside_its_own_topics(broker: Mosquitto,
                                                      peers: Callable[..., Peer],
                                                      topic: str) -> None:
    """A device's publish on another device's up/status or on any down is dropped."""
    server = peers(broker, SERVER_USER, client_id="server-1").connected()
    server.subscribe(SHARED_UP, "waystation/+/status", "waystation/+/down")
    victim = peers(broker, "van-2").connected()
    victim.subscribe(down("van-2"))
    attacker = peers(broker, "van-1").connected()
    attacker.subscribe(down("van-1"))
    # MQTT 3.1.1 cannot refuse a publish: the PUBACK says nothing about the ACL.
    assert attacker.publish(topic, b"forged") == "Success"
    attacker.publish(up("van-1"), b"marker")
    assert server.wait_for(up("van-1"), b"marker")
    assert b"forged" not in server.received()
    assert b"forged" not in victim.received()
    assert b"forged" not in attacker.received()


def test_mqtt5_publisher_is_told_not_authorized(broker: Mosquitto,
                                                peers: Callable[..., Peer]) -> None:
    """Over MQTT 5 a denied publish gets a PUBACK with reason "Not authorized"."""
    server = peers(broker, SERVER_USER, client_id="server-1").connected()
    server.subscribe(SHARED_UP)
    device = peers(broker, "van-1", v5=True).connected()
    assert device.publish(up("van-2"), b"forged") == "Not authorized"
    assert device.publish(up("van-1"), b"marker") == "Success"
    assert server.wait_for(up("van-1"), b"marker")
    assert b"forged" not in server.received()


def test_device_cannot_read_another_devices_down(broker: Mosquitto,
                                                 peers: Callable[..., Peer]) -> None:
    """A device subscribing to others' down topics (even by wildcard) receives nothing."""
    server = peers(broker, SERVER_USER, client_id="server-1").connected()
    victim = peers(broker, "van-2").connected()
    victim.subscribe(down("van-2"))
    snoop = peers(broker, "van-1").connected()
    # Mosquitto 2.0 grants the SUBACK and filters every message against the ACL instead.
    snoop.subscribe(down("van-1"), down("van-2"), "waystation/+/down", "waystation/#", "#")
    server.publish(down("van-2"), b"private")
    server.publish(down("van-1"), b"marker")
    assert victim.wait_for(down("van-2"), b"private")
    assert snoop.wait_for(down("van-1"), b"marker")
    assert snoop.topics() == {down("van-1")}


def test_only_the_server_reads_device_status(broker: Mosquitto,
                                             peers: Callable[..., Peer]) -> None:
    """Presence (retained status) reaches the server user but no other device."""
    other = peers(broker, "van-2").connected()
    other.publish(status("van-2"), b'{"on":true}', retain=True)
    snoop = peers(broker, "van-1").connected()
    snoop.subscribe(down("van-1"), "waystation/+/status")   # retained ones come now, if at all
    server = peers(broker, SERVER_USER, client_id="server-1").connected()
    server.subscribe("waystation/+/status")
    assert server.wait_for(status("van-2"), b'{"on":true}')
    other.publish(status("van-2"), b'{"on":false}', retain=True)
    assert server.wait_for(status("van-2"), b'{"on":false}')
    server.publish(down("van-1"), b"marker")
    assert snoop.wait_for(down("van-1"), b"marker")
    assert snoop.topics() == {down("van-1")}


def test_shared_subscription_by_the_server_user(broker: Mosquitto,
                                                peers: Callable[..., Peer]) -> None:
    """Two servers on $share/waystation/waystation/+/up split the ups, each once."""
    first = peers(broker, SERVER_USER, client_id="server-1").connected()
    second = peers(broker, SERVER_USER, client_id="server-2").connected()
    assert first.subscribe(SHARED_UP) == ["Granted QoS 1"]
    assert second.subscribe(SHARED_UP) == ["Granted QoS 1"]
    device = peers(broker, "van-1").connected()
    sent = [f"change-{i}".encode() for i in range(40)]
    device.publish_many(up("van-1"), sent, timeout=DEADLINE_S)
    assert wait_until(lambda: len(first.received()) + len(second.received()) >= len(sent))
    got = first.received() + second.received()
    assert sorted(got) == sorted(sent)          # every message once, none twice
    assert first.received() and second.received()   # and the load was shared


def test_device_id_cannot_be_taken_over_on_the_tls_listener(broker: Mosquitto,
                                                            peers: Callable[..., Peer]) -> None:
    """A device connecting with another's client id over TLS does not kick it off."""
    owner = peers(broker, "van-1", tls=True).connected()
    owner.subscribe(down("van-1"))
    intruder = peers(broker, "van-2", client_id="van-1", tls=True).connected()
    server = peers(broker, SERVER_USER, client_id="server-1").connected()
    server.publish(down("van-1"), b"for-van-1")
    assert owner.wait_for(down("van-1"), b"for-van-1")
    assert owner.disconnects == []
    assert intruder.received() == []
    assert "as van-2 " in broker.log_text()   # the intruder got its own username as id


def test_tls_listener_verified_with_the_ca(broker: Mosquitto, peers: Callable[..., Peer]) -> None:
    """A device verifying the broker with the fleet CA connects and syncs over TLS."""
    server = peers(broker, SERVER_USER, client_id="server-1").connected()
    server.subscribe(SHARED_UP)
    device = peers(broker, "van-1", tls=True).connected()
    sock = device.client.socket()
    assert isinstance(sock, ssl.SSLSocket)
    assert sock.version() in ("TLSv1.2", "TLSv1.3")
    device.publish(up("van-1"), b"over-tls")
    assert server.wait_for(up("van-1"), b"over-tls")


def test_tls_listener_refused_with_a_wrong_ca(broker: Mosquitto, tmp_path: Path,
                                              peers: Callable[..., Peer]) -> None:
    """A device that trusts another CA refuses the broker's certificate."""
    other = make_ca(tmp_path / "other-ca", name="Some other CA")
    device = peers(broker, "van-1", tls=True, ca_file=other.cert_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        device.connect()


def test_tls_listener_needs_the_password_too(broker: Mosquitto,
                                             peers: Callable[..., Peer]) -> None:
    """TLS alone is not authentication: a wrong password is refused on 8883 as well."""
    assert peers(broker, "van-1", secret="wrong", tls=True).connect() == "Not authorized"


def test_oversized_packet_disconnects_the_sender(broker: Mosquitto,
                                                 peers: Callable[..., Peer]) -> None:
    """A 256 KiB payload passes; one past max_packet_size is dropped with its sender."""
    server = peers(broker, SERVER_USER, client_id="server-1").connected()
    server.subscribe(SHARED_UP)
    device = peers(broker, "van-1").connected()
    largest = b"x" * 262144
    device.publish(up("van-1"), largest)
    assert server.wait_for(up("van-1"), largest)
    device.client.publish(up("van-1"), b"y" * 270000, qos=1)
    assert wait_until(lambda: bool(device.disconnects))
    device.close()
    assert all(len(p) <= 262144 for p in server.received())


def _queue_for_offline_device(broker: Mosquitto, peers: Callable[..., Peer], dev: str,
                              count: int) -> list[bytes]:
    """Give `dev` a persistent session, take it offline, and queue `count` downs for it."""
    device = peers(broker, dev, clean=False).connected()
    device.subscribe(down(dev))
    device.close()
    assert wait_until(lambda: f"Client {dev} disconnected" in broker.log_text())
    server = peers(broker, SERVER_USER, client_id="server-1").connected()
    sent = [f"delta-{i:05d}".encode() for i in range(count)]
    server.publish_many(down(dev), sent, timeout=30)
    server.close()
    return sent


def _drain(broker: Mosquitto, peers: Callable[..., Peer], dev: str,
           expected: int) -> list[bytes]:
    """Reconnect `dev` to its persistent session and collect what was queued."""
    device = peers(broker, dev, clean=False).connected()
    wait_until(lambda: len(device.received()) >= expected, 30,
               message=lambda: f"{expected} messages ({len(device.received())} so far)")
    return device.received()


def test_offline_device_receives_more_than_the_default_queue(
        broker: Mosquitto, peers: Callable[..., Peer]) -> None:
    """2,000 QoS-1 messages queued for an offline device all arrive (default cap: 1,000)."""
    sent = _queue_for_offline_device(broker, peers, "van-3", 2000)
    got = _drain(broker, peers, "van-3", len(sent))
    assert sorted(set(got)) == sent


def test_graceful_restart_keeps_queued_messages(broker: Mosquitto,
                                                peers: Callable[..., Peer]) -> None:
    """Messages queued for an offline device survive a SIGTERM and restart (persistence)."""
    sent = _queue_for_offline_device(broker, peers, "van-3", 2000)
    assert broker.stop() == 0
    assert (broker.workdir / "data" / "mosquitto.db").stat().st_size > 0
    broker.start()
    got = _drain(broker, peers, "van-3", len(sent))
    assert sorted(set(got)) == sent
