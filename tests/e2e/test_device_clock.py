"""A device whose clock is far behind, through the real broker and server processes
(`broker.server.clockskew`): statuses the broker queued for an absent server, and the
retained one it replays to a restarted server, say nothing of the clock; two live ones
10 s apart name it in `server devices` and `server status`, logged once; right again,
it is logged once more."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest

from tests.e2e.fleet import Fleet
from tests.e2e.protocol_device import ProtocolDevice

pytestmark = pytest.mark.e2e

SCOPE = "depot-7"
HOUR_MS = 3_600_000


def _status(dev: str, t: int, **fields: Any) -> bytes:
    return orjson.dumps({"type": "status", "v": 1, "dev": dev, "on": True, "t": t, **fields})


def _now() -> int:
    return int(time.time() * 1000)


def _doc(fleet: Fleet, dev: str) -> dict[str, Any]:
    out = fleet.cli("server", "devices", "--json", "--config", str(fleet.server_config)).stdout
    doc: dict[str, Any] = {d["id"]: d for d in json.loads(out)}[dev]
    return doc


def _clock(fleet: Fleet, dev: str) -> Any:
    return _doc(fleet, dev)["clock"]


def _handled(fleet: Fleet, pd: ProtocolDevice) -> None:
    """Until a catch-up sent after the statuses is answered (one FIFO per device at the
    server: the statuses were handled), and the tick has written the row."""
    fleet.wait(pd.catchup_answered, 120, what=f"{pd.dev}'s catch-up answered")


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_a_clock_behind_is_named_and_old_statuses_prove_nothing(fleet: Fleet) -> None:
    """Queued and replayed statuses leave the clock unmeasured (without the pair rule the
    queued ones, delivered live after the restart, named it "60 min behind"); two live
    ones 3 h behind name it; right again after a restart, one live status says so.

    On the embedded fleet only (25 s with its 10 s pair wait): what depends on the broker,
    the retain flag of queued and replayed statuses, is tested on Mosquitto too
    (tests/broker/test_mqtt_retained.py), and the offset's PostgreSQL row with the CLI
    (tests/server/test_device_clock.py)."""
    fleet.add_device("pd-clock", [SCOPE])
    pd = ProtocolDevice("pd-clock", fleet.passwords["pd-clock"], port=fleet.port,
                        scopes=[SCOPE])
    assert pd.connect() == "Success", fleet.broker_log_tail()
    pd.hello()
    # The server away: two statuses an hour old (a good device's, had they waited an
    # hour) go into its persistent session, and the last is retained.
    fleet.stop_server()
    for pend, back in ((1, HOUR_MS + 11_000), (2, HOUR_MS)):
        pd.publish(pd.status_topic, _status("pd-clock", _now() - back, pend=pend),
                   retain=True)
    server = fleet.start_server()
    _handled(fleet, pd)
    # The row written with what those statuses said (the same write would hold a clock)
    fleet.wait(lambda: _doc(fleet, "pd-clock")["pending"] == 2, 30, what="the count stored")
    assert _clock(fleet, "pd-clock") is None
    assert not server.events("device_clock_off")

    # Live, 3 h behind: the second status, received 10 s or more after the first, names it.
    pd.publish(pd.status_topic, _status("pd-clock", _now() - 3 * HOUR_MS), retain=True)
    time.sleep(10.5)  # the pair rule: two statuses received at least 10 s apart
    pd.publish(pd.status_topic, _status("pd-clock", _now() - 3 * HOUR_MS), retain=True)
    fleet.wait(lambda: (_clock(fleet, "pd-clock") or {}).get("off") is True, 30,
               what="the clock named off")
    assert _clock(fleet, "pd-clock")["note"] == "clock 3 h behind"
    status = fleet.cli("server", "status", "--config", str(fleet.server_config)).stdout
    assert "pd-clock 3 h behind" in status and "fix the device's time sync (NTP)" in status
    assert [e["clock"] for e in server.events("device_clock_off")] == ["clock 3 h behind"]

    # Restarted, the server is replayed the retained status (3 h behind, and old): nothing
    # new is logged; the device's NTP comes back: one live status says it is right.
    fleet.stop_server()
    server = fleet.start_server()
    _handled(fleet, pd)
    pd.publish(pd.status_topic, _status("pd-clock", _now()), retain=True)
    fleet.wait(lambda: _clock(fleet, "pd-clock")["off"] is False, 30,
               what="the clock right again")
    assert not server.events("device_clock_off")
    assert [e["dev"] for e in server.events("device_clock_ok")] == ["pd-clock"]
    pd.close()
