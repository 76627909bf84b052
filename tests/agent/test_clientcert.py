"""The device's side of a certificate renewal (`agent.clientcert`, `agent.certcheck`,
PROTOCOL.md §7.15): the new key is on disk (0600) before a request leaves, survives a
crash (the same key's request is sent again), a certificate is taken only when it is
for that key, CN = the device, and from the CA that signed the one it holds; the old
certificate stays as the fallback; hostile commands and certificates change nothing."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent import certcheck
from agent.certcheck import BadCert
from agent.clientcert import DIR_NAME, STATE, BadRenewal, ClientCerts, parse_command
from broker.embedded.certs import sign_client_cert
from tests.tlsca import CertificateAuthority, make_ca, make_client_cert

DEV = "van-1"
NOW_MS = int(dt.datetime.now(dt.UTC).timestamp() * 1000)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return make_ca(tmp_path / "ca", name="device CA")


@pytest.fixture
def certs(tmp_path: Path, ca: CertificateAuthority) -> ClientCerts:
    issued = make_client_cert(ca, tmp_path / "enrolled", DEV)
    return ClientCerts(tmp_path / "data", DEV, str(issued.cert_path), str(issued.key_path))


def sign(ca: CertificateAuthority, csr_pem: str, cn: str | None = None, days: int = 30
         ) -> tuple[str, str]:
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    pub: Any = csr.public_key()
    cert = sign_client_cert(ca.cert, ca.key, cn or DEV, pub, days=days)
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            ca.cert.public_bytes(serialization.Encoding.PEM).decode())


def test_key_on_disk_before_the_request_and_survives_a_restart(
        tmp_path: Path, certs: ClientCerts, ca: CertificateAuthority) -> None:
    csr = certs.begin("c-1", 1000, "cert-1")
    assert csr is not None
    pending = certs.pending
    assert pending is not None
    key_path = certs.dir / pending.key
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.path.stat().st_mode) == 0o600
    # A crash here (kill -9 after the key was made): a new process goes on with the same
    # key, so the server sees one key per renewal.
    again = ClientCerts(tmp_path / "data", DEV, *certs._configured)  # type: ignore[misc]
    assert again.pending == pending
    resent = again.begin("c-1", 1000, "cert-1")
    assert resent is not None
    first = x509.load_pem_x509_csr(csr.encode()).public_key()
    second = x509.load_pem_x509_csr(resent.encode()).public_key()
    assert first == second
    cert, ca_pem = sign(ca, resent)
    done = again.take("c-1", cert, ca_pem, NOW_MS)
    assert done.cmd == "cert-1" and again.pending is None
    assert again.current is not None and again.current.rid == "c-1"
    # Newest first, then the enrolled files as the fallback.
    files = [again.cert_files()]
    again.refused()
    files.append(again.cert_files())
    assert files[0] == (str(again.dir / "c-1.crt"), str(again.dir / "c-1.key"))
    assert files[1] == certs._configured
    again.refused()
    assert again.cert_files() == files[0]  # round and round, never stuck on one
    again.accepted()
    assert again.login_renewal == "c-1"
    assert again.login_expires_ms() == again.current.exp
    # The command resent after the certificate came: nothing to do but report it.
    assert again.begin("c-1", 1000, "cert-1") is None


def test_a_second_renewal_keeps_one_fallback(certs: ClientCerts,
                                             ca: CertificateAuthority) -> None:
    for i, rid in enumerate(["c-1", "c-2", "c-3"]):
        csr = certs.begin(rid, 1000 + i, f"cmd-{i}")
        assert csr is not None
        certs.take(rid, *sign(ca, csr), NOW_MS)
    assert certs.current is not None and certs.current.rid == "c-3"
    assert certs.previous is not None and certs.previous.rid == "c-2"
    assert sorted(p.name for p in certs.dir.iterdir()) == sorted(
        ["c-2.crt", "c-2.key", "c-3.crt", "c-3.key", STATE])


def test_replayed_command_is_refused(certs: ClientCerts, ca: CertificateAuthority) -> None:
    csr = certs.begin("c-2", 2000, "cmd-2")
    assert csr is not None
    with pytest.raises(BadRenewal, match="replay"):
        certs.begin("c-1", 1000, "cmd-1")
    assert certs.pending is not None and certs.pending.rid == "c-2"
    # An older device-started renewal yields to the operator's command.
    certs.take("c-2", *sign(ca, csr), NOW_MS)
    assert certs.begin("a-1", 0, "") is not None
    assert certs.begin("c-3", 3000, "cmd-3") is not None
    assert certs.pending is not None and certs.pending.rid == "c-3"


@pytest.mark.parametrize("args", [
    None, [], {"dev": "van-2", "renewal": "c-1", "t": 1}, {"dev": DEV, "renewal": "../x",
                                                          "t": 1},
    {"dev": DEV, "renewal": "c-1", "t": True}, {"dev": DEV, "renewal": "c-1", "t": 0},
    {"dev": DEV, "renewal": "c-1"}, {"dev": DEV, "renewal": "x" * 65, "t": 1},
])
def test_malformed_commands_are_refused(args: Any) -> None:
    with pytest.raises(BadRenewal):
        parse_command(args, DEV)


def _other_key_cert(ca: CertificateAuthority, csr: str) -> tuple[str, str]:
    other = certcheck.csr_pem(certcheck.new_key(), DEV)
    return sign(ca, other)


def _other_cn(ca: CertificateAuthority, csr: str) -> tuple[str, str]:
    return sign(ca, csr, cn="van-2")


def _other_ca(ca: CertificateAuthority, csr: str, tmp: Path) -> tuple[str, str]:
    return sign(make_ca(tmp / "stranger", name="device CA"), csr)


def _expired(ca: CertificateAuthority, csr: str) -> tuple[str, str]:
    pub: Any = x509.load_pem_x509_csr(csr.encode()).public_key()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    cert = sign_client_cert(ca.cert, ca.key, DEV, pub, days=30, now=past)
    return (cert.public_bytes(serialization.Encoding.PEM).decode(),
            ca.cert.public_bytes(serialization.Encoding.PEM).decode())


def _garbage(ca: CertificateAuthority, csr: str) -> tuple[str, str]:
    return "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", sign(ca, csr)[1]


def _huge(ca: CertificateAuthority, csr: str) -> tuple[str, str]:
    return "A" * 9000, sign(ca, csr)[1]


def _ca_swapped(ca: CertificateAuthority, csr: str) -> tuple[str, str]:
    """The stranger sends its own CA along: it did not sign the enrolled certificate."""
    cert, _ = sign(ca, csr)
    return cert, cert


BAD = {"other-key": (_other_key_cert, "not for the key"), "other-cn": (_other_cn, "CN=van-1"),
       "expired": (_expired, "not valid now"), "garbage": (_garbage, "not a PEM"),
       "huge": (_huge, "over"), "wrong-ca": (_ca_swapped, "ca:")}


@pytest.mark.parametrize("case", [*sorted(BAD), "stranger-ca"])
def test_bad_certificates_change_nothing(case: str, tmp_path: Path, certs: ClientCerts,
                                         ca: CertificateAuthority) -> None:
    csr = certs.begin("c-1", 1000, "cmd-1")
    assert csr is not None
    before = json.loads(certs.path.read_bytes())
    if case == "stranger-ca":
        cert, ca_pem = _other_ca(ca, csr, tmp_path)
        says = "ca:"
    else:
        make, says = BAD[case]
        cert, ca_pem = make(ca, csr)
    with pytest.raises(BadCert, match=says if says != "over" else "over"):
        certs.take("c-1", cert, ca_pem, NOW_MS)
    assert json.loads(certs.path.read_bytes()) == before
    assert certs.current is None and certs.pending is not None
    # A certificate for another renewal than the one under way is refused too.
    with pytest.raises(BadCert, match="not the one under way"):
        certs.take("c-9", *sign(ca, csr), NOW_MS)


def test_damaged_state_falls_back_to_the_configured_files(tmp_path: Path,
                                                         certs: ClientCerts) -> None:
    certs.dir.mkdir(parents=True, exist_ok=True)
    for junk in (b"{not json", b'{"v": 1, "current": {"rid": "x", "cert": "../../etc/passwd",'
                 b' "key": "k", "t": 1, "exp": 1}}', b"x" * 20000):
        (tmp_path / "data" / DIR_NAME / STATE).write_bytes(junk)
        again = ClientCerts(tmp_path / "data", DEV, *certs._configured)  # type: ignore[misc]
        assert again.current is None and again.pending is None
        assert again.cert_files() == certs._configured


def test_expiry_of_the_configured_certificate(certs: ClientCerts) -> None:
    exp = certs.expires_ms()
    assert exp is not None and 29 * 86_400_000 < exp - NOW_MS < 31 * 86_400_000
