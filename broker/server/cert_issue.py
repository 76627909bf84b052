"""Signing a device's `csr` (PROTOCOL.md §7.15): the checks, the signature with the
client CA of `[enrol]`, and the step inside the engine's group transaction.

Checked before anything is signed: the request parses as PEM PKCS#10 within the size
bound, its own signature verifies (it was made with the key it carries), its subject is
exactly CN = the sending device (the broker's ACL makes the up topic the device's own),
its key is EC P-256, the device agreed `cert_renew`, and the renewal state allows it
(`broker.server.cert_renewal.on_csr`: no replay, no second key for one renewal, device-
started renewals rate limited).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import secrets
from typing import TYPE_CHECKING, Any

import structlog

from broker.errors import InvalidArgument, UnknownDevice
from broker.server import cert_renewal
from broker.server.cert_renewal import Refused, Renewal
from broker.server.store.base import CommandRow, DeviceRow, Store, WriteTxn
from schemas import codec
from schemas.wire import MAX_PEM, CertIssued, Csr
from waystation.config.server import EnrolConfig

if TYPE_CHECKING:
    from cryptography import x509

# cryptography (and broker.embedded.certs, which signs with it) is imported by the
# functions that handle a request: every server process imports this module (the
# engine's `csr` and hello steps), and most never sign a certificate; importing x509
# costs ~0.03 s of CPU per server start (~0.1 s under coverage).

log = structlog.get_logger(__name__)

CAP = "cert_renew"


def check_csr(pem: str, dev: str) -> x509.CertificateSigningRequest:
    """The request, if it is one the server may sign for `dev`; else `Refused`."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if len(pem) > MAX_PEM:
        raise Refused(f"csr: over {MAX_PEM} characters")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise Refused("csr: not a PEM certificate signing request") from None
    try:
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, TypeError):  # an unsupported key or signature algorithm
        raise Refused("csr: its key type is not supported; use an EC P-256 key") from None
    if not valid:
        raise Refused("csr: its signature does not verify: it was not made with the key "
                      "it carries")
    names = [(a.oid, a.value) for a in csr.subject]
    if names != [(NameOID.COMMON_NAME, dev)]:
        raise Refused(f"csr: the subject must be exactly CN={dev}, the sending device "
                      f"(it is {csr.subject.rfc4514_string()[:200]!r})")
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                        ec.SECP256R1):
        raise Refused("csr: the key must be EC P-256")
    return csr


def key_id(key: Any) -> str:
    """Fingerprint of a public key (SHA-256 of its SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization

    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:32]


def csr_round(txn: WriteTxn, msg: Csr, device: DeviceRow, enrol: EnrolConfig, now: int,
              upd: dict[str, Any]) -> bytes:
    """Answer one `csr`: the `cert` message, after recording the signature in `upd`;
    `Refused` (nothing recorded) when it may not be signed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from broker.embedded.certs import load_client_ca, sign_client_cert

    if CAP not in device.caps:
        raise Refused("csr: the device has not agreed the capability cert_renew in its "
                      "hello; send hello with it first")
    if device.wipe_pending:
        raise Refused("csr: the device has a wipe pending; it carries it out first")
    if enrol.client_ca_cert is None or enrol.client_ca_key is None:
        raise Refused("csr: this server signs no client certificates (enrol.client_ca_cert "
                      "and client_ca_key are not set); ask the operator")
    csr = check_csr(msg.csr, msg.dev)
    kid = key_id(csr.public_key())
    row = txn.get_device(msg.dev)  # the operator may have ordered a renewal since
    state = Renewal.from_json(row.crt if row is not None else device.crt)
    decision, state = cert_renewal.on_csr(state, msg.rid, kid, now)
    try:
        ca, signer = load_client_ca(enrol.client_ca_cert, enrol.client_ca_key)
    except InvalidArgument as exc:
        log.error("client_ca_unreadable", dev=msg.dev, error=str(exc),
                  hint="fix enrol.client_ca_cert / client_ca_key; devices keep their "
                       "certificates and ask again")
        raise Refused("csr: the server cannot read its client CA; it is logged there, ask "
                      "the operator") from None
    ca_pem = ca.public_bytes(serialization.Encoding.PEM).decode("ascii")
    if decision == "resend":
        return codec.encode(CertIssued(rid=msg.rid, cert=state.pem, ca=ca_pem))
    days = state.days or enrol.client_cert_days
    pub = csr.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)  # check_csr made sure
    cert = sign_client_cert(ca, signer, msg.dev, pub, days=days,
                            now=datetime.datetime.fromtimestamp(now / 1000, datetime.UTC))
    pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
    not_after = int(cert.not_valid_after_utc.timestamp() * 1000)
    state = cert_renewal.signed(state, serial=f"{cert.serial_number:x}",
                                not_after=not_after, key=kid, pem=pem, now=now)
    upd["crt"] = state.to_json()
    log.warning("client_cert_signed", dev=msg.dev, renewal=msg.rid,
                serial=state.serial, not_after=not_after, by_operator=bool(state.cmd))
    return codec.encode(CertIssued(rid=msg.rid, cert=pem, ca=ca_pem))


def note_hello(txn: WriteTxn, dev: str, done: set[str], crt: str | None, cexp: int | None,
               now: int, upd: dict[str, Any]) -> None:
    """What a hello says about the renewal: command done, connected with the new one."""
    row = txn.get_device(dev)
    if row is None or (not row.crt and cexp is None):
        return
    state = Renewal.from_json(row.crt)
    moved = cert_renewal.on_hello(state, done, crt, cexp, now)
    if moved != state:
        upd["crt"] = moved.to_json()
        if moved.stage != state.stage:
            log.info("client_cert_renewal", dev=dev, renewal=moved.id, stage=moved.stage)


MAX_DAYS = 3650


def order(store: Store, dev: str, days: int | None, now_ms: int
          ) -> tuple[Renewal, CommandRow, DeviceRow]:
    """The operator orders a renewal (`waystation device renew-cert`): a `cert_renew`
    command queued, the renewal recorded; one still under way is superseded (its
    unanswered command marked done, so it is not sent)."""
    if days is not None and not 1 <= days <= MAX_DAYS:
        raise InvalidArgument(f"--days must be between 1 and {MAX_DAYS}")
    rid = f"c-{now_ms:x}-{secrets.token_hex(3)}"
    cmd = CommandRow(f"cert-{now_ms:x}-{secrets.token_hex(3)}", dev, "cert_renew",
                     {"dev": dev, "renewal": rid, "t": now_ms}, created_ms=now_ms)

    def fn(txn: WriteTxn) -> tuple[Renewal, CommandRow, DeviceRow]:
        device = txn.get_device(dev)
        if device is None:
            raise UnknownDevice(f"device {dev!r} is not registered; `waystation device list` "
                                "shows the registered ones")
        for old in txn.commands(dev):
            if old.cmd == "cert_renew" and not old.done_ms:
                txn.put_command(dataclasses.replace(old, done_ms=now_ms))
        state = cert_renewal.ordered(Renewal.from_json(device.crt), rid, cmd.id, days or 0,
                                     now_ms)
        txn.put_command(cmd)
        row = dataclasses.replace(device, crt=state.to_json())
        txn.put_device(row)
        txn.bump_registry()
        return state, cmd, row

    return store.transact(fn)


__all__ = ["CAP", "MAX_DAYS", "check_csr", "csr_round", "key_id", "note_hello", "order"]
