"""Devices on Mosquitto's TLS listener, as deployed: enrolled by `device add`, refused when wrong.

The broker runs the production config (deploy/mosquitto/mosquitto.conf: TLS listener for
devices, plain loopback listener for the server) with a throwaway CA from tests/tlsca.py.
Devices are enrolled with `waystation device add` and the server config's `[enrol]`
section: the password variant (`ca_file`), and the client-certificate variant the config
documents (`require_certificate true` + `use_identity_as_username true`, a device CA of
its own, `[enrol] client_ca_cert/client_ca_key`). Raw attempts use plain paho clients.
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.e2e.fleet import MOSQUITTO, Fleet
from tests.helpers import RecordingClient
from tests.tlsca import make_ca, make_client_cert

pytestmark = [
    pytest.mark.e2e, pytest.mark.mosquitto,
    pytest.mark.skipif(MOSQUITTO is None, reason="the mosquitto binary is not installed"),
]

ONLINE = 'waystation_server_devices{state="online"}'


def make_fleet(root: Path, *, client_certs: bool = False) -> Fleet:
    """A started Mosquitto fleet whose devices are enrolled on the TLS listener."""
    fleet = Fleet(root, "mosquitto", device_tls=True, client_certs=client_certs, metrics=True)
    fleet.start()
    return fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Devices log in with their password over TLS (the shipped configuration)."""
    with make_fleet(tmp_path) as f:
        yield f


@pytest.fixture
def cert_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """Devices log in with a client certificate from their own CA."""
    with make_fleet(tmp_path, client_certs=True) as f:
        yield f


def listener_of(fleet: Fleet, client_id: str) -> int:
    """The listener port the client `client_id` last connected through (Mosquitto's log:
    "New connection from ADDR on port P." then "New client connected from ADDR as ID")."""
    log = fleet.broker.log_path.read_text() if fleet.broker is not None else ""
    opened = dict(re.findall(r"New connection from (\S+) on port (\d+)\.", log))
    clients = re.findall(r"New client connected from (\S+) as (\S+) ", log)
    addrs = [addr for addr, cid in clients if cid == client_id]
    assert addrs, f"{client_id} never connected:\n{fleet.broker_log_tail()}"
    return int(opened[addrs[-1]])


def tls_connections(fleet: Fleet) -> int:
    """How many TCP connections the TLS listener has accepted so far."""
    assert fleet.broker is not None
    return fleet.broker.log_path.read_text().count(f" on port {fleet.tls_port}.")


def context(fleet: Fleet, cert: Path | None = None, key: Path | None = None,
            ca: Path | None = None) -> ssl.SSLContext:
    """A client TLS context verifying the broker (fleet CA unless `ca`), with a client
    certificate when given."""
    assert fleet.ca is not None
    ctx = ssl.create_default_context(cafile=str(ca or fleet.ca.cert_path))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def attempt(fleet: Fleet, client_id: str, username: str | None, password: str | None,
            tls: ssl.SSLContext) -> tuple[str, RecordingClient]:
    """Connect a raw paho client to the TLS listener: the CONNACK reason ("Success",
    "Not authorized"), "no CONNACK" when the broker drops the connection first, or the
    TLS error raised by the handshake."""
    assert fleet.tls_port is not None
    client = RecordingClient(fleet.tls_port, client_id, username, password, tls=tls)
    try:
        return client.connect(timeout=10), client
    except (ssl.SSLError, OSError) as exc:
        return f"TLS error: {exc}", client


def write_and_expect(fleet: Fleet, dev: str, key: str, count: int) -> None:
    """`dev` creates inventory/`key` and adds 1 to its stock `count` times."""
    ag = fleet.agent(dev)
    ag.put("inventory", key, {"depot": "depot-7", "sku": key})
    for _ in range(count):
        ag.increment("inventory", key, "stock", 1)


# --------------------------------------------------------------------------- (a)

def test_agent_enrolled_by_device_add_syncs_over_verified_tls(fleet: Fleet) -> None:
    """`device add` with [enrol] ca_file: the agent verifies the broker, syncs over TLS."""
    assert fleet.ca is not None
    for dev in ("van-1", "van-2"):
        fleet.add_device(dev, ["depot-7"])
        cfg = fleet.agent_config(dev)
        tls = cfg.mqtt.tls
        assert (cfg.mqtt.host, cfg.mqtt.port) == ("127.0.0.1", fleet.tls_port)
        assert tls is not None and tls.ca_file is not None and not tls.insecure
        assert tls.ca_file.read_bytes() == fleet.ca.cert_path.read_bytes()
        assert tls.cert_file is None  # a password login, over TLS
        fleet.start_agent(dev)
    write_and_expect(fleet, "van-1", "sku-1", 25)
    # van-2 edits the record once the server's delta has brought it (creating it would
    # need its scope field).
    fleet.wait(lambda: fleet.agent("van-2").get("inventory", "sku-1") is not None, 30,
               what="sku-1 reaching van-2")
    fleet.agent("van-2").put("inventory", "sku-1", {"bin": "A-3"})
    fleet.wait_converged("van-1", "van-2", timeout=30)
    assert fleet.value("inventory", "sku-1", "stock") == 25
    assert fleet.value("inventory", "sku-1", "bin") == "A-3"
    # Devices came in through the TLS listener, the server through the loopback one.
    assert listener_of(fleet, "van-1") == listener_of(fleet, "van-2") == fleet.tls_port
    assert listener_of(fleet, "waystation-server-1") == fleet.port
    fleet.wait(lambda: fleet.metrics()[ONLINE] == 2, 30, what="both devices online")


# --------------------------------------------------------------------------- (b)

def test_client_certificate_enrolment_syncs_without_a_password(cert_fleet: Fleet) -> None:
    """`device add` with [enrol] client_ca_*: the issued certificate alone logs the
    device in on the cert-required listener, and it syncs."""
    fleet = cert_fleet
    assert fleet.device_ca is not None
    fleet.add_device("van-1", ["depot-7"])
    tls = fleet.agent_config("van-1").mqtt.tls
    assert tls is not None and tls.cert_file is not None and tls.key_file is not None
    cert = x509.load_pem_x509_certificate(tls.cert_file.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "van-1"
    assert cert.issuer == fleet.device_ca.cert.subject
    # No password at all: only the certificate can be what logs it in.
    fleet.edit_agent_config("van-1", lambda data: data["mqtt"].pop("password"))
    assert fleet.agent_config("van-1").mqtt.password is None
    fleet.start_agent("van-1")
    write_and_expect(fleet, "van-1", "sku-1", 10)
    fleet.wait_converged("van-1", timeout=30)
    assert fleet.value("inventory", "sku-1", "stock") == 10
    assert listener_of(fleet, "van-1") == fleet.tls_port


def test_cert_listener_refuses_missing_and_foreign_certificates(cert_fleet: Fleet,
                                                                tmp_path: Path) -> None:
    """No client certificate, or one signed by another CA (a stranger's, or the broker's
    own CA that is not the device CA): refused at the TLS handshake."""
    fleet = cert_fleet
    assert fleet.ca is not None
    fleet.add_device("van-1", ["depot-7"])
    issued = fleet.agent_config("van-1").mqtt.tls
    assert issued is not None and issued.cert_file is not None and issued.key_file is not None
    password = fleet.passwords["van-1"]
    stranger = make_client_cert(make_ca(tmp_path / "stranger", name="Stranger CA"),
                                tmp_path / "stranger-cert", "van-1")
    broker_signed = make_client_cert(fleet.ca, tmp_path / "broker-signed", "van-1")
    refused = {
        "no certificate (right password)": context(fleet),
        "stranger's CA": context(fleet, stranger.cert_path, stranger.key_path),
        "the broker's CA": context(fleet, broker_signed.cert_path, broker_signed.key_path),
    }
    for what, ctx in refused.items():
        outcome, client = attempt(fleet, "van-1", "van-1", password, ctx)
        client.close()
        assert outcome != "Success", what
        assert outcome == "no CONNACK" or outcome.startswith("TLS error"), (what, outcome)
    log = fleet.broker_log_tail(200)
    assert log.count("peer did not return a certificate") == 1, log
    assert log.count("certificate verify failed") == 2, log
    # The control: the certificate `device add` issued is accepted by the same client.
    outcome, client = attempt(fleet, "van-1", "van-1", None,
                              context(fleet, issued.cert_file, issued.key_file))
    client.close()
    assert outcome == "Success", fleet.broker_log_tail()


# --------------------------------------------------------------------------- (c)

@pytest.mark.parametrize("fault", ["wrong-password", "wrong-ca"])
def test_refused_agent_keeps_its_writes_until_fixed(fleet: Fleet, tmp_path: Path,
                                                    fault: str) -> None:
    """A refused agent (wrong password / CA) retries, says offline, loses nothing."""
    fleet.add_device("van-1", ["depot-7"])
    path = fleet.agent_config_path("van-1")
    good = path.read_text()
    if fault == "wrong-password":
        def breaks(data: dict[str, Any]) -> None:
            data["mqtt"]["password"] = "not-the-password-1"
        expected = "Not authorized"
    else:
        stranger = make_ca(tmp_path / "stranger", name="Stranger CA")

        def breaks(data: dict[str, Any]) -> None:
            data["mqtt"]["tls"]["ca_file"] = str(stranger.cert_path)
        expected = "CERTIFICATE_VERIFY_FAILED"
    fleet.edit_agent_config("van-1", breaks)
    write_and_expect(fleet, "van-1", "sku-1", 20)

    before = tls_connections(fleet)
    agent = fleet.start_agent("van-1", wait=False)
    failure = agent.wait_event("mqtt connection attempt failed",
                               where=lambda e: expected in str(e.get("reason")))
    print(f"\n{fault}: {failure['reason']}")
    # It keeps trying (with backoff), and says what people need to know.
    fleet.wait(lambda: tls_connections(fleet) >= before + 3, 30,
               what="three connection attempts", interval=0.1)
    assert agent.running and not agent.events("connected")
    status = fleet.agent_status("van-1")
    assert status["online"] is False and status["pending"] == 21
    assert "waiting for connection" in status["summary"]
    assert fleet.scope_seq("depot-7") == 0 and fleet.record("inventory", "sku-1") is None
    assert fleet.metrics()[ONLINE] == 0

    # Fixed config, restarted daemon: everything written meanwhile syncs, once.
    assert fleet.stop_agent("van-1") == 0
    path.write_text(good)
    fleet.start_agent("van-1")
    fleet.wait_converged("van-1", timeout=30)
    assert fleet.value("inventory", "sku-1", "stock") == 20
    assert fleet.scope_seq("depot-7") == 21
    assert fleet.agent("van-1").dead_letters() == []


# --------------------------------------------------------------------------- topics

@pytest.mark.parametrize("login", ["password", "certificate"])
def test_device_cannot_use_another_devices_topics(tmp_path: Path, login: str) -> None:
    """A logged-in device publishing on another's up/status reaches no server; one
    subscribing to other devices' down topics receives nothing of theirs."""
    with make_fleet(tmp_path, client_certs=login == "certificate") as fleet:
        fleet.add_device("van-2", ["depot-7"])
        fleet.add_device("snoop-1", ["depot-7"])
        fleet.start_agent("van-2")
        fleet.wait(lambda: fleet.metrics()[ONLINE] == 1, 30, what="van-2 online")
        if login == "certificate":
            tls = fleet.agent_config("snoop-1").mqtt.tls
            assert tls is not None and tls.cert_file is not None
            # Its own certificate, but claiming the victim's name: the broker takes the
            # certificate's CN as the username.
            ctx = context(fleet, tls.cert_file, tls.key_file)
            outcome, snoop = attempt(fleet, "van-2", "van-2", None, ctx)
        else:
            outcome, snoop = attempt(fleet, "snoop-1", "snoop-1", fleet.passwords["snoop-1"],
                                     context(fleet))
        try:
            assert outcome == "Success", fleet.broker_log_tail()
            assert "as snoop-1 " in fleet.broker_log_tail(20)   # whatever it asked for
            own_down = "waystation/snoop-1/down"
            for topic in ("waystation/van-2/down", "waystation/+/down", "waystation/#",
                          own_down):
                assert snoop.subscribe(topic) in (1, 0x80), topic

            # The victim works: acks (and its catch-up answers) go to van-2's down.
            write_and_expect(fleet, "van-2", "sku-1", 5)
            fleet.wait_drained("van-2")

            forged = {"type": "changes", "v": 1, "dev": "van-2", "sv": 1, "ch": [
                {"n": 999_999, "h": "0190000000000000", "c": "inventory", "k": "forged-1",
                 "s": "depot-7", "b": 0, "op": "put", "f": {"depot": "depot-7"},
                 "i": {"stock": 1000}}]}
            snoop.publish("waystation/van-2/up", json.dumps(forged).encode())
            snoop.publish("waystation/van-2/status",
                          json.dumps({"type": "status", "v": 1, "dev": "van-2",
                                      "on": False}).encode(), retain=True)
            # The marker: a catch-up on its own up topic, answered on its own down. The
            # server handles one client's messages in order; the forged ones came first.
            snoop.publish("waystation/snoop-1/up", json.dumps(
                {"type": "catchup", "v": 1, "dev": "snoop-1", "req": "marker",
                 "cp": {"depot-7": 0}}).encode())
            snoop.wait_for(own_down)
            fleet.wait(lambda: any(json.loads(m.payload).get("type") == "checkpoint"
                                   for m in snoop.received(own_down)), 15,
                       what="the marker's checkpoint")
        finally:
            snoop.close()

        # Besides its own down topic it may read only what every device may: the merge
        # servers' retained announcements (PROTOCOL.md §7.12), never another device's topics.
        got = {m.topic for m in snoop.received()}
        public = {t for t in got if t.startswith("waystation/_server/")}
        assert got - public == {own_down}
        assert all(t.endswith("/state") for t in public), public
        assert fleet.record("inventory", "forged-1") is None
        with fleet.store.read() as txn:
            assert txn.get_outcome("van-2", 999_999) is None
        assert [d for d in fleet.server_dead_letters() if d["device"] == "van-2"] == []
        assert fleet.metrics()[ONLINE] == 1   # the forged "offline" never reached it
        assert fleet.value("inventory", "sku-1", "stock") == 5
        fleet.wait_converged("van-2", timeout=30)
