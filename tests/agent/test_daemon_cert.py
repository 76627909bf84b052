"""A running agent daemon and certificate renewal (PROTOCOL.md §7.15), over a real
embedded broker with a scripted server: hostile `cert_renew` commands are not reported
done; a valid one brings a `csr` (only once the server agreed `cert_renew`) whose key is
on disk; a `cert` for another key changes nothing; the right one is stored and only then
is the command reported done. The TLS side (the link presenting the new certificate,
falling back) is tests/broker/test_cert_fallback.py and tests/e2e/test_cert_renewal.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.clientcert import ClientCerts
from agent.daemon import AgentDaemon
from broker.embedded.certs import sign_client_cert
from tests.agent import test_daemon_catchup as kit
from tests.agent.test_daemon_catchup import DEV, UP, _send
from tests.helpers import RecordingClient, wait_until
from tests.tlsca import make_ca, make_client_cert

setup = kit.setup


def _up(server: RecordingClient, kind: str) -> list[dict[str, Any]]:
    msgs = [orjson.loads(m.payload) for m in server.received(UP)]
    return [m for m in msgs if m["type"] == kind]


def _cmd(cid: str, **args: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"dev": DEV, "renewal": "c-2", "t": 2000}
    return {"type": "command", "id": cid, "cmd": "cert_renew", "args": {**base, **args}}


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_renewal_through_the_daemon(setup: tuple[AgentDaemon, RecordingClient],
                                    tmp_path: Path) -> None:
    daemon, server = setup
    ca = make_ca(tmp_path / "ca")
    enrolled = make_client_cert(ca, tmp_path / "enrolled", DEV)
    # The link here has no TLS; the renewal's bookkeeping is the same.
    daemon.certs = ClientCerts(Path(daemon.cfg.data_dir), DEV, str(enrolled.cert_path),
                               str(enrolled.key_path))
    wait_until(lambda: _up(server, "hello"), 10, message="first hello")
    for cid, args in [("x-other", {"dev": "van-99"}), ("x-noid", {"renewal": "bad id!"}),
                      ("x-float", {"t": 1.5})]:
        _send(server, _cmd(cid, **args))
    _send(server, _cmd("x-good"))  # before the server agreed: key made, no csr yet
    _send(server, {"type": "command", "id": "c-ping", "cmd": "ping"})
    wait_until(lambda: daemon.sync.command_done("c-ping"), 10, message="ping done")
    assert not any(daemon.sync.command_done(c) for c in ("x-other", "x-noid", "x-float"))
    assert daemon.certs.pending is not None and daemon.certs.pending.rid == "c-2"
    assert _up(server, "csr") == []
    _send(server, {"type": "welcome", "caps": ["cert_renew"]})
    [csr_msg] = wait_until(lambda: _up(server, "csr"), 10, message="csr after welcome")
    assert csr_msg["dev"] == DEV and csr_msg["rid"] == "c-2"
    csr = x509.load_pem_x509_csr(csr_msg["csr"].encode())
    key_file = daemon.certs.dir / daemon.certs.pending.key
    key: Any = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert csr.public_key() == key.public_key()
    # A certificate for another key (a stranger's replay): refused, nothing stored.
    other: Any = make_client_cert(ca, tmp_path / "other", DEV).cert
    _send(server, {"type": "cert", "rid": "c-2", "cert": _pem(other), "ca": _pem(ca.cert)})
    pub: Any = csr.public_key()
    good = sign_client_cert(ca.cert, ca.key, DEV, pub, days=10)
    _send(server, {"type": "cert", "rid": "c-2", "cert": _pem(good), "ca": _pem(ca.cert)})
    wait_until(lambda: daemon.sync.command_done("x-good"), 10, message="renewal done")
    assert daemon.certs.current is not None and daemon.certs.current.rid == "c-2"
    stored = (daemon.certs.dir / daemon.certs.current.cert).read_bytes()
    assert x509.load_pem_x509_certificate(stored) == good
    wait_until(lambda: any("x-good" in h.get("done", []) for h in _up(server, "hello")), 10,
               message="the renewal reported done in a hello")
