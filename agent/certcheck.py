"""The device's side of a certificate renewal, without I/O (PROTOCOL.md §7.15): a new
EC P-256 key and its signing request, and the checks a certificate from the server
must pass before the device stores it.

The trust anchor is the certificate the device holds now (installed by the operator or
renewed before): the CA in a `cert` message must have signed both that one and the new
one, so a server (or anyone able to publish on the device's down topic) cannot make the
device switch to a certificate of another CA.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from schemas.wire import MAX_PEM

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

# cryptography's x509 and serialization modules are imported by the functions that use
# them: this module is imported by every agent, sync and `agent status` process (through
# agent.clientcert), and most never touch a certificate (no client certificates, or no
# renewal this run); importing them costs ~0.03 s of CPU per process (~0.1 s under
# coverage).

CLOCK_SKEW = datetime.timedelta(minutes=10)


class BadCert(ValueError):
    """A certificate the device refuses; the message says why."""


def new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("not an EC private key")
    return key


def csr_pem(key: ec.EllipticCurvePrivateKey, dev: str) -> str:
    """A signing request for `key` whose subject is exactly CN = `dev`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dev)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _load_cert(pem: str | bytes, what: str) -> x509.Certificate:
    from cryptography import x509

    raw = pem.encode("ascii", "replace") if isinstance(pem, str) else pem
    if len(raw) > MAX_PEM:
        raise BadCert(f"{what}: over {MAX_PEM} bytes")
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError:
        raise BadCert(f"{what}: not a PEM certificate") from None


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca`'s key made `cert`'s signature (and names it as issuer)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    if cert.issuer != ca.subject:
        return False
    pub = ca.public_key()
    algo = cert.signature_hash_algorithm
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey) and algo is not None:
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algo))
        elif isinstance(pub, rsa.RSAPublicKey) and algo is not None:
            pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algo)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _same_key(a: Any, b: Any) -> bool:
    from cryptography.hazmat.primitives import serialization

    def der(k: Any) -> bytes:
        out: bytes = k.public_bytes(serialization.Encoding.DER,
                                    serialization.PublicFormat.SubjectPublicKeyInfo)
        return out
    try:
        return der(a) == der(b)
    except AttributeError:
        return False


@dataclass(frozen=True)
class Checked:
    pem: bytes
    not_after_ms: int


def check_issued(cert_pem: str, ca_pem: str, key: ec.EllipticCurvePrivateKey, dev: str,
                 anchor_pem: bytes | None, now: datetime.datetime) -> Checked:
    """The certificate of a `cert` message, if the device may switch to it: for its new
    key, CN = itself, valid now, signed by `ca_pem`, which also signed the certificate it
    holds (`anchor_pem`; None: it holds none, nothing to chain to: refused)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    cert = _load_cert(cert_pem, "cert")
    ca = _load_cert(ca_pem, "ca")
    if not _same_key(cert.public_key(), key.public_key()):
        raise BadCert("cert: it is not for the key this device made for the renewal")
    names = [(a.oid, a.value) for a in cert.subject]
    if names != [(NameOID.COMMON_NAME, dev)]:
        raise BadCert(f"cert: its subject is {cert.subject.rfc4514_string()[:200]!r}, "
                      f"not CN={dev}")
    if not cert.not_valid_before_utc - CLOCK_SKEW <= now < cert.not_valid_after_utc:
        raise BadCert("cert: not valid now (check the device's clock)")
    if anchor_pem is None:
        raise BadCert("cert: this device holds no certificate to check the CA against")
    anchor = _load_cert(anchor_pem, "current certificate")
    if not signed_by(anchor, ca):
        raise BadCert("ca: it did not sign the certificate this device holds (another CA)")
    if not signed_by(cert, ca):
        raise BadCert("cert: its signature does not verify with the CA")
    return Checked(cert.public_bytes(serialization.Encoding.PEM),
                   int(cert.not_valid_after_utc.timestamp() * 1000))


def not_after_ms(pem: bytes) -> int | None:
    """When a certificate expires (ms), None if it cannot be read."""
    try:
        return int(_load_cert(pem, "cert").not_valid_after_utc.timestamp() * 1000)
    except BadCert:
        return None


__all__ = ["BadCert", "Checked", "check_issued", "csr_pem", "key_pem", "load_key",
           "new_key", "not_after_ms", "signed_by"]
