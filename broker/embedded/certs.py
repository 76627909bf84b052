"""Device client certificates, for fleets that authenticate devices by certificate.

`issue_client_cert` signs a new key pair for one device with the operator's CA: the
certificate's common name is the device id (Mosquitto's `use_identity_as_username`
and the embedded broker both take it as the login). Keys are EC P-256, written 0600.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import InvalidArgument


@dataclass(frozen=True)
class IssuedClientCert:
    cert_path: Path
    key_path: Path


def load_client_ca(ca_cert: Path, ca_key: Path
                   ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    """The operator's client CA: its certificate and its (unencrypted) private key."""
    try:
        ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    except OSError as exc:
        raise InvalidArgument(f"cannot read the client CA ({exc.filename}: {exc.strerror})"
                              ) from None
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"the client CA files are not a PEM certificate and an "
                              f"unencrypted PEM private key: {exc}") from None
    if not isinstance(signer, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidArgument("the client CA key must be an EC or RSA private key")
    return ca, signer


def sign_client_cert(ca: x509.Certificate,
                     signer: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
                     device_id: str, public_key: ec.EllipticCurvePublicKey, *,
                     days: int, now: datetime.datetime | None = None) -> x509.Certificate:
    """A client certificate for `public_key`, CN = device_id, valid `days` from now."""
    now = now or datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )


def issue_client_cert(ca_cert: Path, ca_key: Path, device_id: str, out_dir: Path, *,
                      days: int = 825) -> IssuedClientCert:
    """Sign a client certificate (CN = device_id) with the CA; write cert and key."""
    ca, signer = load_client_ca(ca_cert, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = sign_client_cert(ca, signer, device_id, key.public_key(), days=days)
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path = out_dir / f"{device_id}.crt"
    key_path = out_dir / f"{device_id}.key"
    _write_private(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return IssuedClientCert(cert_path, key_path)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
