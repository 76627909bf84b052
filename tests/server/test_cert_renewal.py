"""Client-certificate renewal on the server (`broker.server.cert_renewal`, `cert_issue`,
PROTOCOL.md §7.15): the `cert_renew` command reaches only a device that agreed the
capability; a good `csr` is signed by the client CA for the device's key, CN = itself;
hostile requests (garbage, huge, another CN, an RSA or P-384 key, a forged signature, a
replay with another key, a device that did not agree) are refused without signing and
leave a dead letter; hello reports move the stages. Both store backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import InvalidArgument, UnknownDevice
from broker.server import cert_issue, cert_renewal
from broker.server.cert_renewal import MIN_AUTO_INTERVAL_MS, Refused, Renewal
from broker.server.engine import Engine
from broker.server.store.base import Store
from tests.server.conftest import StoreFactory
from tests.server.helpers import by_device, errors, make_engine, of_type
from tests.tlsca import CertificateAuthority, make_ca
from waystation.config.server import EnrolConfig

DEV = "van-1"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return make_ca(tmp_path / "device-ca", name="device CA")


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory, ca: CertificateAuthority
        ) -> Iterator[tuple[Engine, Store]]:
    engine, store, _ = make_engine(tmp_path, {DEV: ["r1"], "van-2": ["r1"]},
                                   store=store_factory())
    enrol = EnrolConfig.model_validate({"ca_file": str(ca.cert_path),
                                        "client_ca_cert": str(ca.cert_path),
                                        "client_ca_key": str(ca.key_path)})
    engine.config = engine.config.model_copy(update={"enrol": enrol})
    yield engine, store


def hello(caps: Any = ("cert_renew",), dev: str = DEV, **extra: Any) -> bytes:
    msg: dict[str, Any] = {"type": "hello", "v": 1, "dev": dev, "agent": "t/1", "sv": 1,
                           **extra}
    if caps is not None:
        msg["caps"] = list(caps)
    return orjson.dumps(msg)


def make_csr(cn: str = DEV, key: Any = None, *, extra_ou: bool = False) -> tuple[str, Any]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if extra_ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admins"))
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs)).sign(
        key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii"), key


def csr_msg(pem: str, rid: str, dev: str = DEV) -> bytes:
    return orjson.dumps({"type": "csr", "v": 1, "dev": dev, "rid": rid, "csr": pem})


def renewal(store: Store, dev: str = DEV) -> Renewal:
    with store.read() as txn:
        row = txn.get_device(dev)
    assert row is not None
    return Renewal.from_json(row.crt)


def letters(store: Store) -> list[Any]:
    with store.read() as txn:
        return [d for d in txn.dead_letters(100) if d.device == DEV]


def test_command_reaches_only_a_device_that_agreed(env: tuple[Engine, Store]) -> None:
    engine, store = env
    state, cmd, _ = cert_issue.order(store, DEV, 90, 1000)
    engine.tick()
    v1 = by_device(engine.handle_up(DEV, hello(caps=None)))
    assert of_type(v1.get(DEV, []), "command") == []
    out = by_device(engine.handle_up(DEV, hello()))
    [sent] = of_type(out[DEV], "command")
    assert sent["cmd"] == "cert_renew" and sent["id"] == cmd.id
    assert sent["args"] == {"dev": DEV, "renewal": state.id, "t": 1000}
    assert renewal(store).stage == "asked"


def test_good_csr_is_signed_and_the_stages_follow_the_hellos(
        env: tuple[Engine, Store], ca: CertificateAuthority) -> None:
    engine, store = env
    state, cmd, _ = cert_issue.order(store, DEV, 90, 1000)
    engine.handle_up(DEV, hello())
    pem, key = make_csr()
    [reply] = of_type(by_device(engine.handle_up(DEV, csr_msg(pem, state.id)))[DEV], "cert")
    assert reply["rid"] == state.id
    cert = x509.load_pem_x509_certificate(reply["cert"].encode())
    assert cert.subject.rfc4514_string() == f"CN={DEV}"
    assert cert.issuer == ca.cert.subject
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    ca.cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                                ec.ECDSA(hashes.SHA256()))
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 89 <= days <= 90
    assert x509.load_pem_x509_certificate(reply["ca"].encode()) == ca.cert
    assert renewal(store).stage == "issued" and renewal(store).serial == f"{cert.serial_number:x}"
    # The same request again (the answer was lost): the same certificate, not a second.
    [again] = of_type(by_device(engine.handle_up(DEV, csr_msg(make_csr(key=key)[0],
                                                              state.id)))[DEV], "cert")
    assert again["cert"] == reply["cert"]
    engine.handle_up(DEV, hello(done=[cmd.id]))
    assert renewal(store).stage == "stored"
    exp = int(cert.not_valid_after_utc.timestamp() * 1000)
    engine.handle_up(DEV, hello(done=[cmd.id], crt=state.id, cexp=exp))
    done = renewal(store)
    assert done.stage == "in use" and done.exp == exp and done.pem == ""
    # In use: a replayed request for that renewal signs nothing.
    out = by_device(engine.handle_up(DEV, csr_msg(make_csr(key=key)[0], state.id)))
    assert of_type(out[DEV], "cert") == []
    assert "in use" in errors(out[DEV])[0]["reason"]


def _wrong_type_key() -> tuple[str, str]:
    return make_csr(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))[0], \
        "EC P-256"


def _p384() -> tuple[str, str]:
    return make_csr(key=ec.generate_private_key(ec.SECP384R1()))[0], "EC P-256"


def _forged() -> tuple[str, str]:
    """A request whose signature was made by another key than the one it carries."""
    pem, _ = make_csr()
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(
        serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    body = __import__("base64").encodebytes(bytes(der)).decode()
    return ("-----BEGIN CERTIFICATE REQUEST-----\n" + body
            + "-----END CERTIFICATE REQUEST-----\n"), "csr:"


HOSTILE = {
    "garbage": lambda: ("hello, please sign", "not a PEM"),
    "pem-garbage": lambda: ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                            "-----END CERTIFICATE REQUEST-----\n", "not a PEM"),
    "other-cn": lambda: (make_csr("van-2")[0], "CN=van-1"),
    "extra-subject": lambda: (make_csr(extra_ou=True)[0], "CN=van-1"),
    "rsa-key": _wrong_type_key,
    "p384-key": _p384,
    "forged-signature": _forged,
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_csr_is_refused_and_nothing_signed(env: tuple[Engine, Store],
                                                   case: str) -> None:
    engine, store = env
    state, _, _ = cert_issue.order(store, DEV, None, 1000)
    engine.handle_up(DEV, hello())
    pem, says = HOSTILE[case]()
    out = by_device(engine.handle_up(DEV, csr_msg(pem, state.id)))
    assert of_type(out[DEV], "cert") == []
    [err] = errors(out[DEV])
    assert err["code"] == "invalid" and says in err["reason"], err
    assert renewal(store).stage == "asked"
    assert letters(store), "a refused request is kept as a dead letter"


def test_huge_csr_is_refused_by_the_decoder(env: tuple[Engine, Store]) -> None:
    engine, store = env
    state, _, _ = cert_issue.order(store, DEV, None, 1000)
    engine.handle_up(DEV, hello())
    out = by_device(engine.handle_up(DEV, csr_msg("A" * 9000, state.id)))
    assert of_type(out[DEV], "cert") == [] and errors(out[DEV])[0]["code"] == "invalid"
    assert renewal(store).stage == "asked"


def test_csr_from_a_device_that_did_not_agree_or_for_another_device(
        env: tuple[Engine, Store]) -> None:
    engine, store = env
    state, _, _ = cert_issue.order(store, DEV, None, 1000)
    engine.handle_up(DEV, hello(caps=["creds"]))
    out = by_device(engine.handle_up(DEV, csr_msg(make_csr()[0], state.id)))
    assert "cert_renew" in errors(out[DEV])[0]["reason"]
    # Published on van-1's up topic but saying van-2: refused before anything else.
    engine.handle_up(DEV, hello())
    out = by_device(engine.handle_up(DEV, csr_msg(make_csr("van-2")[0], state.id,
                                                  dev="van-2")))
    assert errors(out[DEV])[0]["code"] == "wrong_device"
    assert renewal(store).stage == "asked"


def test_second_key_for_one_renewal_is_refused(env: tuple[Engine, Store]) -> None:
    engine, store = env
    state, _, _ = cert_issue.order(store, DEV, None, 1000)
    engine.handle_up(DEV, hello())
    first = renewal(store)
    assert of_type(by_device(engine.handle_up(DEV, csr_msg(make_csr()[0], state.id)))[DEV],
                   "cert")
    issued = renewal(store)
    out = by_device(engine.handle_up(DEV, csr_msg(make_csr()[0], state.id)))
    assert of_type(out[DEV], "cert") == [] and "another key" in errors(out[DEV])[0]["reason"]
    assert renewal(store) == issued != first


def test_device_started_renewal_is_rate_limited(env: tuple[Engine, Store]) -> None:
    engine, store = env
    engine.handle_up(DEV, hello())
    assert of_type(by_device(engine.handle_up(DEV, csr_msg(make_csr()[0], "a-1")))[DEV],
                   "cert")
    assert renewal(store).id == "a-1" and renewal(store).cmd == ""
    out = by_device(engine.handle_up(DEV, csr_msg(make_csr()[0], "a-2")))
    assert of_type(out[DEV], "cert") == [] and "an hour" in errors(out[DEV])[0]["reason"]


def test_server_without_client_ca_signs_nothing(env: tuple[Engine, Store]) -> None:
    engine, store = env
    engine.config = engine.config.model_copy(update={"enrol": EnrolConfig()})
    engine.handle_up(DEV, hello())
    out = by_device(engine.handle_up(DEV, csr_msg(make_csr()[0], "a-1")))
    assert "client_ca_cert" in errors(out[DEV])[0]["reason"]
    assert renewal(store).id == ""


def test_order_checks_and_supersedes(env: tuple[Engine, Store]) -> None:
    _, store = env
    with pytest.raises(UnknownDevice):
        cert_issue.order(store, "ghost", None, 1)
    with pytest.raises(InvalidArgument):
        cert_issue.order(store, DEV, 0, 1)
    first, _, _ = cert_issue.order(store, DEV, None, 1000)
    second, cmd, _ = cert_issue.order(store, DEV, None, 2000)
    with store.read() as txn:
        open_cmds = [c.id for c in txn.commands(DEV) if c.cmd == "cert_renew" and not c.done_ms]
    assert open_cmds == [cmd.id] and renewal(store).id == second.id != first.id


# ------------------------------------------------------------------ the pure state

ids = st.sampled_from(["r-1", "r-2", "a-1"])


@given(st.lists(st.tuples(st.sampled_from(["csr", "hello", "order"]), ids,
                          st.sampled_from(["k1", "k2"]), st.integers(0, 10**7)),
                max_size=25))
def test_a_signed_renewal_never_signs_another_key(steps: list[tuple[str, str, str, int]]
                                                  ) -> None:
    """Whatever arrives in whatever order: once renewal R is signed for key K, R is never
    signed again for another key, and a device-started renewal is not signed within an
    hour of the previous signature."""
    state = Renewal()
    now = 0
    signed: dict[str, str] = {}
    last_sign = -MIN_AUTO_INTERVAL_MS
    for kind, rid, key, dt in steps:
        now += dt
        if kind == "order":
            state = cert_renewal.ordered(state, rid, "cmd-" + rid, 0, now)
            signed.pop(rid, None)
            continue
        if kind == "hello":
            state = cert_renewal.on_hello(state, {"cmd-" + rid}, rid, now, now)
            continue
        try:
            decision, nxt = cert_renewal.on_csr(state, rid, key, now)
        except Refused:
            continue
        if decision == "resend":
            assert signed[rid] == key
            continue
        if not nxt.cmd:
            assert now - last_sign >= MIN_AUTO_INTERVAL_MS
        state = cert_renewal.signed(nxt, serial="1", not_after=now, key=key, pem="P", now=now)
        signed[rid] = key
        last_sign = now
