"""`waystation device add` for a TLS fleet: the `[enrol]` section of the server config."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from broker.embedded.passwords import read_password_file, verify_password
from tests.tlsca import make_ca
from waystation.cli import main
from waystation.config import AgentConfig, load_config


def _server_toml(tmp_path: Path, enrol: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(f'data_dir = "server"\n[mqtt]\nport = 1883\n[enrol]\n{enrol}\n')
    return path


def test_device_add_writes_tls_settings_ca_and_client_cert(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With [enrol] set, the agent config uses TLS on the public broker name, the CA is
    copied next to it, the login goes to enrol.password_file and a client certificate
    with CN = device id is issued by the client CA."""
    ca = make_ca(tmp_path / "ca")
    conf = _server_toml(tmp_path, (
        f'broker_host = "mqtt.fleet.example"\nbroker_port = 8883\n'
        f'ca_file = "{ca.cert_path}"\npassword_file = "{tmp_path / "mosq" / "passwd"}"\n'
        f'client_ca_cert = "{ca.cert_path}"\nclient_ca_key = "{ca.key_path}"\n'))
    code = main(["device", "add", "van-3", "--scope", "r1", "--out", str(tmp_path / "out"),
                 "--config", str(conf)], env={})
    out = capsys.readouterr()
    assert code == 0, out.err
    agent = load_config(AgentConfig, tmp_path / "out" / "van-3.toml", {})
    assert (agent.mqtt.host, agent.mqtt.port) == ("mqtt.fleet.example", 8883)
    assert agent.mqtt.tls is not None
    assert agent.mqtt.tls.ca_file == tmp_path / "out" / "ca.pem"
    assert (tmp_path / "out" / "ca.pem").read_bytes() == ca.cert_path.read_bytes()
    assert agent.mqtt.tls.cert_file == tmp_path / "out" / "van-3.crt"
    cert = x509.load_pem_x509_certificate((tmp_path / "out" / "van-3.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "van-3"
    assert cert.issuer == x509.load_pem_x509_certificate(ca.cert_path.read_bytes()).subject
    assert (tmp_path / "out" / "van-3.key").stat().st_mode & 0o777 == 0o600
    stored = read_password_file(tmp_path / "mosq" / "passwd")["van-3"]
    assert verify_password(stored, agent.mqtt.resolved_password({}) or "")


def test_device_add_says_when_each_broker_takes_the_login(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The embedded deployment of the operator guide (no config) is told that its broker
    takes the new login by itself; the line spoke of Mosquitto's SIGHUP alone, leaving
    the operator to wonder whether the embedded broker needed a restart."""
    env = {"WAYSTATION_SERVER__DATA_DIR": str(tmp_path / "server"),
           "WAYSTATION_BROKER__DATA_DIR": str(tmp_path / "broker")}
    assert main(["device", "add", "van-1", "--scope", "route-1", "--out",
                 str(tmp_path / "van-1")], env=env) == 0
    out = capsys.readouterr().out
    assert "the embedded broker picks it up at the next connection" in out
    assert "systemctl reload mosquitto" in out


def test_device_add_refuses_a_missing_ca_file(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A CA path that does not exist is refused before anything is registered."""
    conf = _server_toml(tmp_path, f'ca_file = "{tmp_path / "nope.pem"}"\n'
                                  f'password_file = "{tmp_path / "passwd"}"')
    code = main(["device", "add", "van-3", "--scope", "r1", "--out", str(tmp_path / "out"),
                 "--config", str(conf)], env={})
    err = capsys.readouterr().err
    assert code != 0 and "enrol.ca_file" in err
    assert not (tmp_path / "out" / "van-3.toml").exists()
    assert not (tmp_path / "passwd").exists()


def test_enrol_client_ca_needs_both_halves_and_tls(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A client CA certificate without its key, or without TLS, is a config error."""
    conf = _server_toml(tmp_path, f'client_ca_cert = "{tmp_path / "c.pem"}"')
    code = main(["device", "list", "--config", str(conf)], env={})
    assert code == 2 and "client_ca_key" in capsys.readouterr().err


def test_device_wipe_resync_disable_enable(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`device wipe/resync` queue commands for the device; `disable/enable` flip it;
    an unknown device is refused with a one-line error."""
    from broker.server import registry
    from broker.server.store import open_store
    from waystation.config import ServerConfig

    conf = _server_toml(tmp_path, f'password_file = "{tmp_path / "passwd"}"')
    assert main(["device", "add", "van-4", "--scope", "r1", "--out", str(tmp_path / "out"),
                 "--config", str(conf)], env={}) == 0
    assert main(["device", "wipe", "van-4", "--config", str(conf)], env={}) == 0
    assert main(["device", "resync", "van-4", "--config", str(conf)], env={}) == 0
    assert main(["device", "disable", "van-4", "--config", str(conf)], env={}) == 0
    out = capsys.readouterr().out
    assert "wipe queued for van-4" in out and "disabled" in out
    store = open_store(load_config(ServerConfig, conf, {}))
    try:
        with store.read() as txn:
            cmds = sorted(row.cmd for row in txn.commands("van-4"))
            enabled = txn.get_device("van-4").enabled  # type: ignore[union-attr]
        assert cmds == ["resync", "wipe"] and enabled is False
    finally:
        store.close()
    assert main(["device", "enable", "van-4", "--config", str(conf)], env={}) == 0
    assert main(["device", "wipe", "van-99", "--config", str(conf)], env={}) != 0
    assert "van-99" in capsys.readouterr().err
    assert registry is not None


def test_device_add_systemd_header_names_the_client_certificate(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With a client CA, the install note atop a `--systemd` config names the device's
    certificate and key, which the config points at (an operator installing only what
    the note listed had an agent that could not log in)."""
    ca = make_ca(tmp_path / "ca")
    conf = _server_toml(tmp_path, (
        f'ca_file = "{ca.cert_path}"\npassword_file = "{tmp_path / "passwd"}"\n'
        f'client_ca_cert = "{ca.cert_path}"\nclient_ca_key = "{ca.key_path}"\n'))
    out = tmp_path / "sd"
    assert main(["device", "add", "van-7", "--scope", "r1", "--out", str(out), "--systemd",
                 "--config", str(conf)], env={}) == 0
    text = (out / "van-7.toml").read_text()
    note = text[:text.index("device_id")]
    assert 'cert_file = "/etc/waystation/van-7.crt"' in text
    assert "van-7.crt and van-7.key" in note and "/etc/waystation/" in note
    assert (out / "van-7.crt").is_file() and (out / "van-7.key").is_file()
    assert load_config(AgentConfig, out / "van-7.toml", {}).device_id == "van-7"


def test_device_add_systemd_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`device add --systemd` writes a config for the unit's fixed layout: password in a
    separate 0600 file read through ${CREDENTIALS_DIRECTORY}, CA and schema under
    /etc/waystation, state in /var/lib/waystation/agent-ID (waystation-agent@ID's
    StateDirectory); portable mode keeps every path
    relative to the config (nothing points into the --out directory)."""
    ca = make_ca(tmp_path / "ca")
    schema = tmp_path / "fleet.toml"
    schema.write_text(Path(__file__).resolve().parents[2].joinpath(
        "schemas", "examples", "fleet.toml").read_text())
    conf = tmp_path / "server.toml"
    conf.write_text(f'data_dir = "server"\nschema_file = "{schema}"\n[enrol]\n'
                    f'ca_file = "{ca.cert_path}"\npassword_file = "{tmp_path / "passwd"}"\n')
    out = tmp_path / "sd"
    assert main(["device", "add", "van-5", "--scope", "r1", "--out", str(out), "--systemd",
                 "--config", str(conf)], env={}) == 0
    text = (out / "van-5.toml").read_text()
    assert 'password_file = "${CREDENTIALS_DIRECTORY}/mqtt-password"' in text
    assert "password =" not in text
    assert 'ca_file = "/etc/waystation/ca.pem"' in text
    assert 'schema_file = "/etc/waystation/fleet.toml"' in text
    assert 'data_dir = "/var/lib/waystation/agent-van-5"' in text  # the template's
    secret = out / "van-5.mqtt-password"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert verify_password(read_password_file(tmp_path / "passwd")["van-5"],
                           secret.read_text().strip())
    assert (out / "fleet.toml").read_text() == schema.read_text()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text(secret.read_text())
    agent = load_config(AgentConfig, out / "van-5.toml", {})
    assert agent.mqtt.resolved_password({"CREDENTIALS_DIRECTORY": str(creds)}) == \
        secret.read_text().strip()
    portable = tmp_path / "pt"
    assert main(["device", "add", "van-6", "--scope", "r1", "--out", str(portable),
                 "--config", str(conf)], env={}) == 0
    text = (portable / "van-6.toml").read_text()
    assert str(portable) not in text and 'schema_file = "van-6.schema.toml"' in text
    assert 'data_dir = "van-6-data"' in text  # its own store, next to the config
    loaded = load_config(AgentConfig, portable / "van-6.toml", {})
    assert loaded.data_dir == portable / "van-6-data"
    capsys.readouterr()
