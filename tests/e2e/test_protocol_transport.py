"""What PROTOCOL.md §1 and §7.10 promise about the transport, over the real brokers, to a
device written from the text alone (tests/e2e/protocol_device.py): a client id other
than the device id, a device that never publishes `status`, and a bad `status`.
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from tests.e2e.fleet import Fleet
from tests.e2e.protocol_device import ProtocolDevice

pytestmark = pytest.mark.e2e

SCOPE = "route-42"


def _device(fleet: Fleet, dev: str, *, online: bool | None = True,
            **options: Any) -> ProtocolDevice:
    pd = ProtocolDevice(dev, fleet.passwords[dev], port=fleet.port, scopes=[SCOPE], **options)
    assert pd.connect(online=online) == "Success", fleet.broker_log_tail()
    pd.hello()
    return pd


def _task(pd: ProtocolDevice, key: str, **fields: Any) -> dict[str, Any]:
    return pd.change("tasks", key, SCOPE, f={"route": SCOPE, **fields})


def test_client_id_other_than_the_device_id(fleet: Fleet) -> None:
    """The embedded broker refuses the connection (not authorized); Mosquitto's device
    listener replaces the client id with the username, so the device still syncs - and a
    second connection under its real id takes its session over."""
    fleet.add_device("pd-1", [SCOPE])
    if fleet.kind != "mosquitto":
        odd = ProtocolDevice("pd-1", fleet.passwords["pd-1"], port=fleet.port,
                             client_id="pd-1-phone")
        try:
            assert odd.connect() == "Not authorized"
        finally:
            odd.close()
        return
    assert fleet.ca is not None and fleet.tls_port is not None
    tls = ssl.create_default_context(cafile=str(fleet.ca.cert_path))
    odd = ProtocolDevice("pd-1", fleet.passwords["pd-1"], port=fleet.tls_port, tls=tls,
                         client_id="pd-1-phone", scopes=[SCOPE])
    twin = ProtocolDevice("pd-1", fleet.passwords["pd-1"], port=fleet.tls_port, tls=tls,
                          scopes=[SCOPE])
    try:
        assert odd.connect() == "Success", fleet.broker_log_tail()
        odd.hello()
        ch = _task(odd, "t-odd", status="out")
        odd.send_changes([ch])
        odd.wait_acked([ch["n"]])  # the server knows a device by topic and `dev` only
        assert twin.connect() == "Success"
        odd.wait(lambda: odd.disconnects, 15, "the broker handing the session to pd-1")
    finally:
        twin.close()
        odd.close()


def test_a_device_without_status_gets_no_deltas(fleet: Fleet) -> None:
    """Connected but never saying `on: true`: no delta reaches the device, catch-up does;
    once it publishes its status, deltas flow."""
    fleet.add_device("pd-quiet", [SCOPE])
    fleet.add_device("pd-writer", [SCOPE])
    quiet = _device(fleet, "pd-quiet", online=None)
    writer = _device(fleet, "pd-writer")
    try:
        first = _task(writer, "t-1", status="out")
        writer.send_changes([first])
        writer.wait_acked([first["n"]])
        # Same topic, same publisher: a delta sent before the checkpoint arrives before it.
        quiet.sync_from_server()
        assert quiet.deltas == []
        assert quiet.records[("tasks", "t-1")]["f"]["status"] == "out"

        quiet.say_online()
        key = 1

        def delta_arrived() -> bool:
            nonlocal key
            if quiet.deltas:
                return True
            key += 1  # the status and the change travel on different topics: write on
            ch = _task(writer, f"t-{key}", status="out")  # until the server has both
            writer.send_changes([ch])
            writer.wait_acked([ch["n"]])
            return bool(quiet.deltas)

        quiet.wait(delta_arrived, 30, "a delta once the device said it is online")
    finally:
        writer.close()
        quiet.close()


def test_a_bad_status_is_answered_on_the_down_topic(fleet: Fleet) -> None:
    """A status the server cannot read comes back as a message-level reject naming the
    problem; the device's presence is unchanged and a good status works again."""
    fleet.add_device("pd-bad", [SCOPE])
    pd = _device(fleet, "pd-bad")
    try:
        pd.send_raw(b"not a status", topic=pd.status_topic)
        err = pd.wait_error("malformed")
        assert err["reason"].startswith("status message: ")
        before = len(pd.errors)
        pd.send_raw(b'{"type":"status","v":1,"dev":"pd-other","on":true}',
                    topic=pd.status_topic)
        assert pd.wait_error("wrong_device", after=before)["reason"].startswith("status message")
        pd.say_online()

        def kept() -> bool:  # the server stores dead letters at its next tick
            codes = {d["code"] for d in fleet.server_dead_letters() if d["device"] == "pd-bad"}
            return {"malformed", "wrong_device"} <= codes

        fleet.wait(kept, 30, what="both bad statuses kept as dead letters", interval=0.2)
    finally:
        pd.close()
