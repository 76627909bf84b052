"""Client-certificate renewal (issue 10 §4) with real processes on both brokers that take
client certificates: the embedded amqtt broker with a cert-required TLS listener, and
Mosquitto (`require_certificate` + `use_identity_as_username`). `waystation device
renew-cert` reaches a running agent, which makes a new key, has it signed, reconnects
with the new certificate and keeps syncing; the old certificate still works (no
lockout). Both fleets: embedded amqtt + LMDB, Mosquitto + PostgreSQL. A kill -9 between
the key and the certificate recovers with the same key; an agent renews by itself
before expiry; a v1 device without the capability keeps working and is renewed by
hand."""

from __future__ import annotations

import json
import shutil
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.clientcert import DIR_NAME, STATE
from tests.e2e.fleet import Fleet
from tests.helpers import RecordingClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

@pytest.fixture
def fleet_options() -> dict[str, Any]:
    """The shared `fleet` fixture (embedded + LMDB, Mosquitto + PostgreSQL), with a
    TLS listener that requires client certificates from the fleet's device CA."""
    return {"client_certs": True}


def enrol(fleet: Fleet, dev: str, **tls: Any) -> None:
    """`device add` with the client CA; the certificate alone logs the device in."""
    fleet.add_device(dev, ["depot-7"])

    def cert_only(data: dict[str, Any]) -> None:
        data["mqtt"].pop("password")
        data["mqtt"]["tls"].update(tls)

    fleet.edit_agent_config(dev, cert_only)


def cert_doc(fleet: Fleet, dev: str) -> dict[str, Any] | None:
    rows = json.loads(fleet.cli("device", "list", "--json", "--config",
                                str(fleet.server_config)).stdout)
    doc: dict[str, Any] | None = next(r for r in rows if r["id"] == dev)["client_cert"]
    return doc


def in_use(fleet: Fleet, dev: str, rid: str | None = None) -> dict[str, Any] | None:
    doc = cert_doc(fleet, dev)
    ren = None if doc is None else doc["renewal"]
    if ren is None or ren["stage"] != "in use" or (rid is not None and ren["id"] != rid):
        return None
    return doc


def renew(fleet: Fleet, dev: str, *extra: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(fleet.cli(
        "device", "renew-cert", dev, "--json", *extra,
        "--config", str(fleet.server_config)).stdout)
    return doc


def state(fleet: Fleet, dev: str) -> dict[str, Any]:
    path = Path(fleet.agent_config(dev).data_dir) / DIR_NAME / STATE
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return doc


def server_status(fleet: Fleet) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(fleet.cli("server", "status", "--json", "--config",
                                               str(fleet.server_config)).stdout)
    return doc


def cert_dir(fleet: Fleet, dev: str) -> Path:
    return Path(fleet.agent_config(dev).data_dir) / DIR_NAME


def tls_login(fleet: Fleet, dev: str, cert: Path, key: Path) -> str:
    """A plain client's CONNACK for `dev` with that certificate (agent stopped)."""
    assert fleet.ca is not None and fleet.tls_port is not None
    ctx = ssl.create_default_context(cafile=str(fleet.ca.cert_path))
    ctx.load_cert_chain(str(cert), str(key))
    client = RecordingClient(fleet.tls_port, dev, dev, None, tls=ctx)
    try:
        return client.connect(timeout=10)
    except (ssl.SSLError, OSError) as exc:
        return f"TLS error: {exc}"
    finally:
        client.close()


def write(fleet: Fleet, dev: str, key: str, n: int) -> None:
    ag = fleet.agent(dev)
    if ag.get("inventory", key) is None:
        ag.put("inventory", key, {"depot": "depot-7", "sku": key})
    for _ in range(n):
        ag.increment("inventory", key, "stock", 1)


def test_online_device_renews_keeps_syncing_and_the_old_cert_still_works(
        fleet: Fleet) -> None:
    enrol(fleet, "van-1")
    fleet.start_agent("van-1")
    write(fleet, "van-1", "sku-1", 5)
    fleet.wait_drained("van-1")
    doc = renew(fleet, "van-1", "--days", "60")
    assert doc["device_speaks_cert_renew"] is True and doc["stage"] == "asked"
    write(fleet, "van-1", "sku-1", 5)  # written while the renewal runs
    done = fleet.wait(lambda: in_use(fleet, "van-1", doc["renewal"]), timeout=60,
                      what="the new certificate in use")
    ren = done["renewal"]
    assert ren["by"] == "operator" and ren["issued"] and ren["stored"]
    write(fleet, "van-1", "sku-1", 5)
    fleet.wait_drained("van-1")
    assert fleet.value("inventory", "sku-1", "stock") == 15
    # On the device: the key made there (0600), the certificate for it, 60 days.
    st = state(fleet, "van-1")
    assert st["current"]["rid"] == doc["renewal"] and st["pending"] is None
    where = cert_dir(fleet, "van-1")
    new_cert, new_key = where / st["current"]["cert"], where / st["current"]["key"]
    assert stat.S_IMODE(new_key.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(new_cert.read_bytes())
    assert 59 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 60
    assert f"{cert.serial_number:x}" == ren["serial"]
    expires = int(cert.not_valid_after_utc.timestamp() * 1000)
    fleet.wait(lambda: (d := cert_doc(fleet, "van-1")) and d["expires"]
               and abs(_ms(d["expires"]) - expires) < 1000, 30,
               what="device list showing the new certificate's expiry")
    status = fleet.agent_status("van-1")
    assert status["client_cert"]["current"]["rid"] == doc["renewal"]
    # No CRL, no lockout: the enrolled certificate still logs in, and so does the new.
    assert fleet.stop_agent("van-1") == 0
    tls = fleet.agent_config("van-1").mqtt.tls
    assert tls is not None and tls.cert_file is not None and tls.key_file is not None
    assert tls_login(fleet, "van-1", tls.cert_file, tls.key_file) == "Success"
    assert tls_login(fleet, "van-1", new_cert, new_key) == "Success"
    fleet.start_agent("van-1")
    write(fleet, "van-1", "sku-1", 1)
    fleet.wait_drained("van-1")
    assert fleet.value("inventory", "sku-1", "stock") == 16


def _ms(iso_text: str) -> int:
    from datetime import datetime
    return int(datetime.fromisoformat(iso_text.replace("Z", "+00:00")).timestamp() * 1000)


# The crash path is the agent's: one fleet is enough (the embedded one).
@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_kill_between_key_and_certificate_recovers_with_the_same_key(
        fleet: Fleet) -> None:
    """The server cannot sign (its CA key is away): the agent holds its new key and keeps
    asking; kill -9; the CA is back; the restarted agent sends the same key's request and
    connects with the certificate for it."""
    enrol(fleet, "van-1")
    fleet.start_agent("van-1")
    assert fleet.device_ca is not None
    ca_key = fleet.device_ca.key_path
    away = ca_key.with_suffix(".away")
    shutil.move(ca_key, away)
    doc = renew(fleet, "van-1")
    fleet.wait(lambda: (state(fleet, "van-1").get("pending") or {}).get("rid")
               == doc["renewal"], 30, what="the new key stored on the device")
    pending = state(fleet, "van-1")["pending"]
    key_pem = (cert_dir(fleet, "van-1") / pending["key"]).read_bytes()
    fleet.kill_agent("van-1")
    assert server_status(fleet)["cert_renewals"]["van-1"]["stage"] == "asked"
    write(fleet, "van-1", "sku-9", 3)  # offline writes wait in the outbox
    shutil.move(away, ca_key)
    fleet.start_agent("van-1")
    fleet.wait(lambda: in_use(fleet, "van-1", doc["renewal"]), timeout=60,
               what="the renewal finished after the crash")
    st = state(fleet, "van-1")
    where = cert_dir(fleet, "van-1")
    assert (where / st["current"]["key"]).read_bytes() == key_pem
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    cert = x509.load_pem_x509_certificate((where / st["current"]["cert"]).read_bytes())
    assert cert.public_key() == load_pem_private_key(key_pem, None).public_key()
    fleet.wait_drained("van-1")
    assert fleet.value("inventory", "sku-9", "stock") == 3
    assert server_status(fleet)["cert_renewals"] == {}


# What a disabled device may do is decided by the server alone (broker.server.incoming:
# only its changes and catch-ups are held; its hello gets its commands and its csr is
# signed), and the broker only carries the messages: one fleet is enough.
@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_disabled_device_renews_its_certificate(fleet: Fleet) -> None:
    """Commands reach a disabled device: `renew-cert` on it ends with the new certificate
    in use while its writes stay held on the device; enabled again, they arrive."""
    enrol(fleet, "van-1")
    fleet.start_agent("van-1")
    write(fleet, "van-1", "sku-3", 1)
    fleet.wait_drained("van-1")
    fleet.cli("device", "disable", "van-1", "--config", str(fleet.server_config))
    write(fleet, "van-1", "sku-3", 2)
    doc = renew(fleet, "van-1", "--days", "60")
    assert doc["device_speaks_cert_renew"] is True and doc["stage"] == "asked"
    # Deadlines generous for a loaded 2-core host (one run under load took longer).
    done = fleet.wait(lambda: in_use(fleet, "van-1", doc["renewal"]), timeout=120,
                      what="the new certificate in use on the disabled device")
    assert done["renewal"]["issued"] and done["renewal"]["stored"]
    st = state(fleet, "van-1")
    assert st["current"]["rid"] == doc["renewal"] and st["pending"] is None
    cert = x509.load_pem_x509_certificate(
        (cert_dir(fleet, "van-1") / st["current"]["cert"]).read_bytes())
    assert f"{cert.serial_number:x}" == done["renewal"]["serial"]
    # Still disabled: its writes wait on the device.
    assert fleet.agent_status("van-1")["pending"] > 0
    assert fleet.value("inventory", "sku-3", "stock") == 1
    fleet.cli("device", "enable", "van-1", "--config", str(fleet.server_config))
    fleet.wait_drained("van-1", timeout=120)
    assert fleet.value("inventory", "sku-3", "stock") == 3


def test_agent_renews_by_itself_before_expiry(fleet: Fleet) -> None:
    """renew_before_days above the certificate's remaining life: the agent asks at once,
    without an operator; the server records a device-started renewal."""
    enrol(fleet, "van-1", renew_before_days=3650)
    fleet.start_agent("van-1")
    done = fleet.wait(lambda: in_use(fleet, "van-1"), timeout=60,
                      what="a device-started renewal in use")
    assert done["renewal"]["by"] == "device" and done["renewal"]["command"] is None
    write(fleet, "van-1", "sku-2", 2)
    fleet.wait_drained("van-1")


def test_v1_device_keeps_working_and_is_renewed_by_hand(fleet: Fleet,
                                                        tmp_path: Path) -> None:
    """A device without the capability gets no command; the CLI says so and --out
    issues new files, with which it connects and syncs; its old certificate works too."""
    from tests.e2e.protocol_device import ProtocolDevice

    assert fleet.ca is not None and fleet.tls_port is not None
    enrol(fleet, "pd-1")
    tls = fleet.agent_config("pd-1").mqtt.tls
    assert tls is not None and tls.cert_file is not None and tls.key_file is not None
    out = fleet.cli("device", "renew-cert", "pd-1", "--out", str(tmp_path / "manual"),
                    "--config", str(fleet.server_config)).stdout
    assert "has not said it understands certificate renewal" in out
    new_cert, new_key = tmp_path / "manual" / "pd-1.crt", tmp_path / "manual" / "pd-1.key"
    assert stat.S_IMODE(new_key.stat().st_mode) == 0o600
    for i, (cert, key) in enumerate([(tls.cert_file, tls.key_file), (new_cert, new_key)]):
        ctx = ssl.create_default_context(cafile=str(fleet.ca.cert_path))
        ctx.load_cert_chain(str(cert), str(key))
        pd = ProtocolDevice("pd-1", "", port=fleet.tls_port, scopes=["depot-7"], tls=ctx)
        pd.next_n += i  # the same store, its next change
        try:
            assert pd.connect() == "Success"
            pd.hello()
            ch = pd.change("inventory", f"v1-{i}", "depot-7",
                           f={"depot": "depot-7", "sku": f"v1-{i}"})
            pd.send_changes([ch])
            pd.wait_acked([ch["n"]])
            assert [m for m in pd.messages if m.get("type") == "command"] == []
        finally:
            pd.close()
    assert cert_doc(fleet, "pd-1")["renewal"]["stage"] == "asked"  # type: ignore[index]
