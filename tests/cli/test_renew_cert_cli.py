"""`waystation device renew-cert`: wrong input is refused with a reason the operator can
act on; a device without capability cert_renew gets the manual path and, with --out,
new files like `device add` writes (key 0600, CN = the device, signed by the client
CA); running it again supersedes the renewal under way."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from broker.server.registry import add_device
from broker.server.store import open_store
from tests.tlsca import CertificateAuthority, make_ca
from waystation.cli.entry import main
from waystation.config import ServerConfig, load_config


def server_config(tmp: Path, ca: CertificateAuthority | None) -> Path:
    lines = [f'data_dir = "{tmp / "server"}"', "[enrol]"]
    if ca is not None:
        lines += [f'ca_file = "{ca.cert_path}"', f'client_ca_cert = "{ca.cert_path}"',
                  f'client_ca_key = "{ca.key_path}"', "client_cert_days = 100"]
    path = tmp / "server.toml"
    path.write_text("\n".join(lines) + "\n")
    store = open_store(load_config(ServerConfig, path, {}))
    try:
        add_device(store, "van-1", ["r1"], 1000)
    finally:
        store.close()
    return path


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return make_ca(tmp_path / "ca", name="device CA")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["device", "renew-cert", *argv], env={})
    out = capsys.readouterr()
    return code, out.out, out.err


def test_wrong_input_is_refused_with_a_reason(tmp_path: Path, ca: CertificateAuthority,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(server_config(tmp_path, ca))
    code, _, err = run(capsys, "ghost", "--config", cfg)
    assert code != 0 and "not registered" in err
    for days in ("0", "99999"):
        code, _, err = run(capsys, "van-1", "--days", days, "--config", cfg)
        assert code != 0 and "between 1 and 3650" in err
    code, _, err = run(capsys, "van-1", "--days", "soon", "--config", cfg)
    assert code == 2 and "invalid int value" in err
    code, _, err = run(capsys, "../etc", "--config", cfg)
    assert code == 2


def test_server_without_client_ca_says_what_to_set(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    cfg = str(server_config(tmp_path, None))
    code, _, err = run(capsys, "van-1", "--config", cfg)
    assert code != 0 and "enrol.client_ca_cert" in err


def test_device_without_the_capability_gets_the_manual_path(
        tmp_path: Path, ca: CertificateAuthority, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(server_config(tmp_path, ca))
    code, out, _ = run(capsys, "van-1", "--config", cfg)
    assert code == 0 and "has not said it understands certificate renewal" in out
    assert "--out DIR" in out
    code, out, _ = run(capsys, "van-1", "--out", str(tmp_path / "manual"), "--json",
                       "--config", cfg)
    doc = json.loads(out)
    assert code == 0 and doc["device_speaks_cert_renew"] is False and doc["days"] == 100
    key = Path(doc["files"]["key"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(Path(doc["files"]["cert"]).read_bytes())
    assert cert.subject.rfc4514_string() == "CN=van-1" and cert.issuer == ca.cert.subject
    # The second order superseded the first: one renewal, one open command.
    code, out, _ = run(capsys, "van-1", "--json", "--config", cfg)
    again = json.loads(out)
    assert again["renewal"] != doc["renewal"]
    code = main(["device", "list", "--json", "--config", cfg], env={})
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["client_cert"]["renewal"]["id"] == again["renewal"]
    assert rows[0]["client_cert"]["renewal"]["stage"] == "asked"
