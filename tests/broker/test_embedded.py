"""The embedded amqtt broker: the ACL contract, plus what our amqtt fixes guarantee."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from broker.embedded.amqtt_broker import BrokerSettings, EmbeddedBrokerError, serve
from broker.embedded.passwords import delete_password_entry, write_password_entry
from tests.fixtures_brokers import (
    PREFIX,
    SERVER_USER,
    USERS,
    BrokerAclContract,
    BrokerProcess,
    start_embedded,
)
from tests.helpers import RecordingClient, free_port, port_open, wait_until
from tests.tlsca import make_ca, make_client_cert, make_server_cert
from waystation.config import BrokerConfig, BrokerTlsConfig, LogConfig
from waystation.mqtt import MqttLink, TlsSettings


class TestEmbeddedAcl(BrokerAclContract):
    """The ACL contract against the embedded broker."""

    @pytest.fixture
    def broker(self, embedded_broker: BrokerProcess) -> BrokerProcess:
        """The broker under test."""
        return embedded_broker



def connect(made: list[RecordingClient], broker: BrokerProcess, client_id: str, user: str | None,
            password: str | None = None, **kw: object) -> RecordingClient:
    client = RecordingClient(broker.port, client_id, user,
                             USERS.get(user or "", "") if password is None else password,
                             **kw)  # type: ignore[arg-type]
    made.append(client)
    client.connect()
    return client


def test_device_must_use_its_id_as_client_id(
    embedded_broker: BrokerProcess, clients: list[RecordingClient]
) -> None:
    """Right password but client id != username: refused (servers are exempt)."""
    assert connect(clients, embedded_broker, "van-7", "van-12").state.connacks == [
        "Not authorized"]
    assert connect(clients, embedded_broker, "something", "van-12").state.connacks == [
        "Not authorized"]
    assert connect(clients, embedded_broker, "merge-1", SERVER_USER).state.connacks == [
        "Success"]


@pytest.mark.parametrize("clean_session", [True, False])
def test_refused_connect_cannot_take_over_a_device_session(
    embedded_broker: BrokerProcess, clients: list[RecordingClient], clean_session: bool
) -> None:
    """Stock amqtt drops/takes over the session before checking credentials; ours does not."""
    victim = connect(clients, embedded_broker, "van-12", "van-12", clean_session=False)
    assert victim.subscribe(f"{PREFIX}/van-12/down") == 1
    for user, password in (("van-7", USERS["van-7"]), ("van-12", "wrong")):
        intruder = connect(clients, embedded_broker, "van-12", user, password,
                           clean_session=clean_session)
        assert intruder.state.connacks == ["Not authorized"]
    server = connect(clients, embedded_broker, "merge-1", SERVER_USER)
    server.publish(f"{PREFIX}/van-12/down", b"still-here")
    victim.wait_for(f"{PREFIX}/van-12/down", b"still-here")
    assert victim.state.disconnects == []


@pytest.mark.parametrize("clean_session", [False, True], ids=["persistent", "clean"])
def test_a_session_taken_over_stays_with_the_new_connection(
    embedded_broker: BrokerProcess, clients: list[RecordingClient], clean_session: bool
) -> None:
    """A device that reconnects before the broker saw its old connection end (a new
    certificate, a NAT that rebinds) takes its persistent session over: the new
    connection gets the session's messages, and the old connection's end publishes no
    will over the device's fresh status. Stock amqtt marked a persistent session
    disconnected, so the device heard nothing until it reconnected again, and left the
    old connection of a clean session open, its will published whenever it ended."""
    status, down = f"{PREFIX}/van-12/status", f"{PREFIX}/van-12/down"
    server = connect(clients, embedded_broker, "merge-1", SERVER_USER)
    assert server.subscribe(status) == 1
    will = (status, b"off", True)
    old = connect(clients, embedded_broker, "van-12", "van-12", clean_session=clean_session,
                  will=will)
    assert old.subscribe(down) == 1
    new = connect(clients, embedded_broker, "van-12", "van-12", clean_session=clean_session,
                  will=will)
    assert new.state.connacks == ["Success"]
    assert new.state.session_present == [not clean_session]
    wait_until(lambda: old.state.disconnects, 10, message="the old connection closed")
    if clean_session:
        assert new.subscribe(down) == 1
    new.publish(status, b"on", retain=True)
    server.publish(down, b"after the take-over")
    assert new.wait_for(down, b"after the take-over").qos == 1
    server.wait_for(status, b"on")
    new.publish(status, b"still on", retain=True)
    server.wait_for(status, b"still on")
    assert [m.payload for m in server.received(status)] == [b"on", b"still on"]
    assert new.state.disconnects == []


def test_a_clean_disconnect_racing_the_next_connect_leaves_it_hearing(
    embedded_broker: BrokerProcess, clients: list[RecordingClient]
) -> None:
    """What the agent does to log in again (a new password, a new certificate): a clean
    DISCONNECT and at once a new CONNECT of the same persistent session. Whichever the
    broker handles first, the new connection hears what is sent to the device. The old
    connection's end marked the session disconnected after the take-over when the two
    overlapped (1 in ~5 password rotations in the e2e test went deaf)."""
    down = f"{PREFIX}/van-12/down"
    server = connect(clients, embedded_broker, "merge-1", SERVER_USER)
    current = connect(clients, embedded_broker, "van-12", "van-12", clean_session=False)
    assert current.subscribe(down) == 1
    for i in range(40):
        current.client.disconnect()  # no wait: the next CONNECT races it
        nxt = connect(clients, embedded_broker, "van-12", "van-12", clean_session=False)
        assert nxt.state.connacks == ["Success"], i
        marker = f"round {i}".encode()
        server.publish(down, marker)
        nxt.wait_for(down, marker, timeout=5)
        current.client.loop_stop()
        current = nxt


def test_will_on_a_foreign_topic_is_refused(
    embedded_broker: BrokerProcess, clients: list[RecordingClient]
) -> None:
    """amqtt publishes wills unchecked, so a will the device may not publish refuses CONNECT."""
    bad = connect(clients, embedded_broker, "van-12", "van-12",
                  will=(f"{PREFIX}/van-7/down", b"forged", False))
    assert bad.state.connacks == ["Not authorized"]
    good = connect(clients, embedded_broker, "van-12", "van-12",
                   will=(f"{PREFIX}/van-12/status", b"off", True))
    assert good.state.connacks == ["Success"]


def test_enrolment_and_removal_apply_without_restart(
    embedded_broker: BrokerProcess, clients: list[RecordingClient]
) -> None:
    """`device add` (a new line) lets a device in; `device remove` keeps it out; no restart."""
    assert connect(clients, embedded_broker, "van-50", "van-50", "pw-50").state.connacks == [
        "Not authorized"]
    write_password_entry(embedded_broker.password_file, "van-50", "pw-50")
    assert connect(clients, embedded_broker, "van-50", "van-50", "pw-50").state.connacks == [
        "Success"]
    delete_password_entry(embedded_broker.password_file, "van-50")
    assert connect(clients, embedded_broker, "van-50", "van-50", "pw-50").state.connacks == [
        "Not authorized"]


def test_retained_messages_are_not_leaked_to_other_devices(
    embedded_broker: BrokerProcess, clients: list[RecordingClient]
) -> None:
    """Stock amqtt sends a connecting client every retained message matching anyone's
    subscription; ours sends retained messages only for the client's own subscriptions."""
    server = connect(clients, embedded_broker, "merge-1", SERVER_USER)
    assert server.subscribe(f"{PREFIX}/#") == 1
    server.publish(f"{PREFIX}/van-7/down", b"secret", retain=True)
    server.publish(f"{PREFIX}/van-7/status", b"public", retain=True)
    device = connect(clients, embedded_broker, "van-12", "van-12")
    assert device.subscribe(f"{PREFIX}/van-12/down") == 1
    server.publish(f"{PREFIX}/van-12/down", b"marker")
    device.wait_for(f"{PREFIX}/van-12/down", b"marker")
    assert [m.payload for m in device.received()] == [b"marker"]


def test_tls_listener_with_client_certificates(tmp_path: Path) -> None:
    """TLS listener requiring client certs: a device cert's CN stands in for the password."""
    ca = make_ca(tmp_path / "ca")
    server_cert = make_server_cert(ca, tmp_path / "srv")
    device_cert = make_client_cert(ca, tmp_path / "dev", "van-12")
    tls_port = free_port()
    broker = start_embedded(tmp_path / "b", extra_args=[
        "--tls-port", str(tls_port), "--tls-cert", str(server_cert.cert_path),
        "--tls-key", str(server_cert.key_path), "--tls-ca", str(ca.cert_path),
        "--tls-require-client-cert"])
    try:
        wait_until(lambda: port_open("127.0.0.1", tls_port), 10, message="TLS listener")
        with_cert = MqttLink(
            client_id="van-12", host="127.0.0.1", port=tls_port, username="van-12",
            tls=TlsSettings(ca=str(ca.cert_path), cert=str(device_cert.cert_path),
                            key=str(device_cert.key_path)))
        with with_cert:
            assert with_cert.wait_connected(10), with_cert.last_error
            assert with_cert.tcp_nodelay
        without_cert = MqttLink(
            client_id="van-7", host="127.0.0.1", port=tls_port, username="van-7",
            password=USERS["van-7"], tls=TlsSettings(ca=str(ca.cert_path)))
        with without_cert:
            wait_until(lambda: without_cert.last_error, 10, message="TLS refusal")
            assert not without_cert.connected
    finally:
        broker.stop()


def test_settings_from_the_pydantic_config(tmp_path: Path) -> None:
    """BrokerSettings.from_config maps waystation.config.BrokerConfig field by field."""
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    cfg = BrokerConfig(
        host="0.0.0.0", port=1999, tls_port=8883, data_dir=tmp_path / "data",
        tls=BrokerTlsConfig(cert_file=tmp_path / "c.pem", key_file=tmp_path / "k.pem",
                            ca_file=tmp_path / "ca.pem", require_client_cert=True),
        server_users=["merge-a", "merge-b"], prefix="fleet", log=LogConfig(level="debug"),
        connect_timeout_s=2.5,
    )
    s = BrokerSettings.from_config(cfg)
    assert s.connect_timeout_s == 2.5
    assert (s.host, s.port, s.tls_port, s.prefix) == ("0.0.0.0", 1999, 8883, "fleet")
    assert s.password_file == tmp_path / "data" / "passwd"
    assert s.tls_cert == tmp_path / "c.pem" and s.tls_key == tmp_path / "k.pem"
    assert s.tls_ca == tmp_path / "ca.pem" and s.tls_require_client_cert
    assert s.server_users == {"merge-a", "merge-b"}
    assert s.log_level == "debug" and not s.allow_anonymous
    listeners = s.amqtt_config()["listeners"]
    assert listeners["default"]["bind"] == "0.0.0.0:1999"
    assert listeners["tls"]["bind"] == "0.0.0.0:8883" and listeners["tls"]["ssl"]


def test_serve_creates_missing_password_file_and_stops_on_event(tmp_path: Path) -> None:
    """serve(): empty 0600 password file if missing, ready() once listening, stop -> closed."""
    port = free_port()
    settings = BrokerSettings(port=port, password_file=tmp_path / "d" / "passwd",
                              server_users=frozenset({SERVER_USER}))
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            loop.run_until_complete(serve(settings, ready=ready.set, stop=stop))
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    try:
        wait_until(lambda: ready.is_set() or errors, 20, message="broker ready")
        assert not errors, errors
        assert port_open("127.0.0.1", port)
        assert (tmp_path / "d" / "passwd").read_text() == ""
        assert stat.S_IMODE((tmp_path / "d" / "passwd").stat().st_mode) == 0o600
        anyone = RecordingClient(port, "van-12", "van-12", "pw")
        try:
            assert anyone.connect() == "Not authorized"
        finally:
            anyone.close()
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(20)
    assert not thread.is_alive() and not errors, errors
    assert not port_open("127.0.0.1", port)
    loop.close()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """A port already taken raises EmbeddedBrokerError (a WaystationError), not a traceback."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = BrokerSettings(port=taken.getsockname()[1],
                                  password_file=tmp_path / "passwd")
        with pytest.raises(EmbeddedBrokerError, match="could not start"):
            asyncio.run(serve(settings, stop=asyncio.Event()))


def test_broker_run_loads_config_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    """broker_run(args, env) reads the TOML config, serves, and SIGTERM ends it with 0."""
    port = free_port()
    config = tmp_path / "broker.toml"
    config.write_text(f'port = {port}\ndata_dir = "data"\nserver_users = ["{SERVER_USER}"]\n')
    code = ("import argparse, sys; from broker.embedded.amqtt_broker import broker_run; "
            f"sys.exit(broker_run(argparse.Namespace(config={str(config)!r}), {{}}))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_until(lambda: port_open("127.0.0.1", port) or proc.poll() is not None, 20,
                   message="broker_run listening")
        assert proc.poll() is None
        assert (tmp_path / "data" / "passwd").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "no device can connect until one is enrolled" in text
    assert "embedded broker stopped" in text


def test_module_entry_point_reports_bad_options() -> None:
    """`python -m broker.embedded` with an impossible TLS setup exits 2 with one line."""
    proc = subprocess.run(
        [sys.executable, "-m", "broker.embedded", "--tls-port", "8883"],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: broker: tls_port needs")
