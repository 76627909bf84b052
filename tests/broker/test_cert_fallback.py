"""The link's client-certificate choice (`waystation.mqtt` CertProvider with
`agent.clientcert.ClientCerts`) against the embedded broker's cert-required TLS
listener: the newest certificate is tried first, and one the broker refuses (here: a
stranger CA's) makes the next attempt use the previous one, so a bad renewal never
locks the device out."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.clientcert import DIR_NAME, STATE, ClientCerts
from tests.fixtures_brokers import BrokerProcess, start_embedded
from tests.helpers import free_port, port_open, wait_until
from tests.tlsca import (
    CertificateAuthority,
    IssuedCert,
    make_ca,
    make_client_cert,
    make_server_cert,
)
from waystation.mqtt import MqttLink, TlsSettings

DEV = "van-12"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return make_ca(tmp_path / "ca")


@pytest.fixture
def tls_broker(tmp_path: Path, ca: CertificateAuthority) -> Iterator[tuple[BrokerProcess, int]]:
    server_cert = make_server_cert(ca, tmp_path / "srv")
    tls_port = free_port()
    broker = start_embedded(tmp_path / "b", extra_args=[
        "--tls-port", str(tls_port), "--tls-cert", str(server_cert.cert_path),
        "--tls-key", str(server_cert.key_path), "--tls-ca", str(ca.cert_path),
        "--tls-require-client-cert"])
    try:
        wait_until(lambda: port_open("127.0.0.1", tls_port), 10, message="TLS listener")
        yield broker, tls_port
    finally:
        broker.stop()


def renewed_state(data: Path, cert: IssuedCert) -> None:
    """Put `cert` in the agent's store of renewed certificates as the current one."""
    where = data / DIR_NAME
    where.mkdir(parents=True)
    (where / "c-1.crt").write_bytes(cert.cert_path.read_bytes())
    (where / "c-1.key").write_bytes(cert.key_path.read_bytes())
    (where / STATE).write_text(json.dumps({"v": 1, "previous": None, "pending": None,
                                           "current": {"rid": "c-1", "t": 1, "cert": "c-1.crt",
                                                       "key": "c-1.key", "exp": 1}}))


class Recording(ClientCerts):
    """Notes which renewal each refused attempt used (None: the configured files)."""

    refusals: list[str | None]

    def refused(self) -> None:
        tried = self._choice.trying
        self.refusals.append(None if tried is None else tried.rid)
        super().refused()


def link(port: int, ca: CertificateAuthority, certs: ClientCerts, configured: IssuedCert
         ) -> MqttLink:
    return MqttLink(client_id=DEV, host="127.0.0.1", port=port, username=DEV,
                    tls=TlsSettings(ca=str(ca.cert_path), cert=str(configured.cert_path),
                                    key=str(configured.key_path)),
                    cert_provider=certs)


def test_refused_new_certificate_falls_back_to_the_previous(
        tmp_path: Path, ca: CertificateAuthority, tls_broker: tuple[BrokerProcess, int]
) -> None:
    _, port = tls_broker
    good = make_client_cert(ca, tmp_path / "good", DEV)
    stranger = make_client_cert(make_ca(tmp_path / "stranger"), tmp_path / "bad", DEV)
    renewed_state(tmp_path / "data", stranger)
    certs = Recording(tmp_path / "data", DEV, str(good.cert_path), str(good.key_path))
    certs.refusals = []
    assert certs.current is not None and certs.current.rid == "c-1"
    with link(port, ca, certs, good) as lk:
        assert lk.wait_connected(30), lk.last_error
    # It tried the renewed one first, was refused, and logged in with the enrolled one.
    assert certs.refusals[:1] == ["c-1"] and None not in certs.refusals
    assert certs.login_renewal is None


def test_new_certificate_is_used_first(
        tmp_path: Path, ca: CertificateAuthority, tls_broker: tuple[BrokerProcess, int]
) -> None:
    _, port = tls_broker
    renewed = make_client_cert(ca, tmp_path / "renewed", DEV)
    stranger = make_client_cert(make_ca(tmp_path / "stranger"), tmp_path / "bad", DEV)
    renewed_state(tmp_path / "data", renewed)
    certs = ClientCerts(tmp_path / "data", DEV, str(stranger.cert_path),
                        str(stranger.key_path))
    with link(port, ca, certs, stranger) as lk:
        assert lk.wait_connected(30), lk.last_error
    assert certs.login_renewal == "c-1"
