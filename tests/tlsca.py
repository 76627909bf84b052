"""A throwaway certificate authority for TLS tests, built with `cryptography`.

    ca = make_ca(tmp_path / "ca")                        # ca.pem, ca.key
    server = make_server_cert(ca, tmp_path / "server")   # server.pem, server.key
    client = make_client_cert(ca, tmp_path / "dev", "van-12")   # van-12.pem, van-12.key

Everything is PEM. Private keys are written with mode 0600 (brokers refuse, or at least
warn about, readable keys, and so should we), certificates with 0644. Keys are EC P-256:
quick to make and accepted by Mosquitto, OpenSSL 3 and Python's `ssl`. Certificates
carry the extensions strict verifiers insist on (key identifiers, key usage, extended
key usage, subject alternative names), and are valid from a day ago (clock skew) for 30
days: long enough for any test, useless anywhere else.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "IssuedCert", "make_ca", "make_client_cert",
           "make_server_cert"]

_VALID_FOR = dt.timedelta(days=30)
_BACKDATE = dt.timedelta(days=1)


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA: its certificate (`cert_path`, what clients and brokers trust) and key."""

    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class IssuedCert:
    """A leaf certificate signed by a CA, with its private key."""

    cert_path: Path
    key_path: Path
    cert: x509.Certificate

    @property
    def common_name(self) -> str:
        """The subject's CN (for a device: its device id)."""
        value = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return value if isinstance(value, str) else value.decode("utf-8")


def make_ca(directory: str | os.PathLike[str], *, name: str = "Waystation test CA",
            ) -> CertificateAuthority:
    """Create a self-signed CA in `directory` (created if missing): ca.pem and ca.key."""
    out = _directory(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Waystation tests")])
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return CertificateAuthority(cert_path=cert_path, key_path=key_path, cert=cert, key=key)


def make_server_cert(ca: CertificateAuthority, directory: str | os.PathLike[str],
                     hosts: Sequence[str] = ("127.0.0.1", "localhost"), *,
                     name: str = "server") -> IssuedCert:
    """A server certificate for `hosts` (IP addresses and DNS names, all in the SAN;
    the first is also the CN): `name`.pem and `name`.key in `directory`."""
    if not hosts:
        raise ValueError("a server certificate needs at least one host")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return _issue(ca, directory, name, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH,
                  x509.SubjectAlternativeName(sans))


def make_client_cert(ca: CertificateAuthority, directory: str | os.PathLike[str],
                     cn: str) -> IssuedCert:
    """A client certificate whose CN is `cn` (a device id, for Mosquitto's
    `use_identity_as_username`): `cn`.pem and `cn`.key in `directory`."""
    if not cn or "/" in cn or cn in (".", ".."):
        raise ValueError(f"{cn!r} cannot name a certificate file")
    return _issue(ca, directory, cn, cn, ExtendedKeyUsageOID.CLIENT_AUTH, None)


def _issue(ca: CertificateAuthority, directory: str | os.PathLike[str], name: str, cn: str,
           usage: x509.ObjectIdentifier, san: x509.SubjectAlternativeName | None,
           ) -> IssuedCert:
    out = _directory(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.key.public_key()), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return IssuedCert(cert_path=cert_path, key_path=key_path, cert=cert)


def _directory(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    _write(path, data, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with `mode` (and re-moded before writing if it already existed), so the
    # key is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)
        out.write(data)
