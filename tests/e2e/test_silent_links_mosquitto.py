"""A device's link to Mosquitto (the production broker config, devices on its TLS
listener) goes silent: packets vanish, no reset, no FIN (a dead cellular cell, a cut
cable). The real agent daemon runs in a network namespace of the test's own and reaches
Mosquitto through a veth pair whose host end the test takes down (tests/silent_link.py);
the broker's certificate names the address the device dials, as a production
certificate names the broker's host. What must hold:

- the agent notices within its keepalive (5 s, the config's minimum: a PINGREQ goes
  unanswered) and `agent status` says offline, with the writes made meanwhile pending;
- Mosquitto notices too (1.5 keepalives without a packet) and publishes the device's
  last will: the server shows it offline;
- once the link is back the agent reconnects by itself, the server shows it online, and
  every change (those in flight at the cut, those written during the silence) is
  applied exactly once: counter totals exact, one outcome per change id, gapless
  sequences.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import MOSQUITTO, Fleet
from tests.e2e.test_multiserver import Ledger, check_exact, check_sequences, increment
from tests.silent_link import SilentLink, silent_link
from tests.tlsca import make_server_cert

pytestmark = [
    pytest.mark.e2e, pytest.mark.slow, pytest.mark.mosquitto,
    pytest.mark.skipif(MOSQUITTO is None, reason="the mosquitto binary is not installed"),
]

KEEPALIVE_S = 5
SCOPE = "depot-1"
BURST = 60
DURING = 20
SMALL_BATCHES = {"batch_max_changes": 2, "max_inflight_changes": 20}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Fleet, SilentLink]]:
    """A Mosquitto fleet (devices on TLS) and a silent link to its TLS listener; the
    fleet's processes are stopped while the link still exists."""
    f = Fleet(tmp_path, "mosquitto", "lmdb", device_tls=True)
    assert f.ca is not None and f.tls_port is not None
    with silent_link(f.tls_port) as link:
        make_server_cert(f.ca, f.broker_dir / "cert", ("127.0.0.1", "localhost", link.address))
        with f:
            f.start()
            yield f, link


def _server_online(fleet: Fleet, dev: str) -> bool:
    rows = json.loads(fleet.cli("server", "devices", "--json", "--config",
                                str(fleet.server_config)).stdout)
    return bool(next(r for r in rows if r["id"] == dev)["online"])


def test_a_silent_device_link_to_mosquitto(fleet: tuple[Fleet, SilentLink]) -> None:
    """Cut: the agent and Mosquitto notice by keepalive (offline, will published);
    healed: the agent reconnects and every change is applied exactly once."""
    f, link = fleet
    f.add_device("van-1", [SCOPE], sync=SMALL_BATCHES)

    def through_link(data: dict[str, object]) -> None:
        mqtt = data["mqtt"]
        assert isinstance(mqtt, dict) and mqtt.get("tls"), mqtt  # the TLS listener
        mqtt.update(host=link.address, port=link.port, keepalive_s=KEEPALIVE_S)

    f.edit_agent_config("van-1", through_link)
    proc = f.agents["van-1"]
    proc.argv = ["ip", "netns", "exec", link.namespace, *proc.argv]
    f.start_agent("van-1")
    f.wait(lambda: _server_online(f, "van-1"), 30, what="server shows it online")
    ledger = Ledger()
    for i in range(BURST):
        increment(f, ledger, "van-1", SCOPE, i % 3, 1)
    f.wait(lambda: f.scope_seq(SCOPE) >= 10, 30, what="the burst being applied",
           interval=0.005)

    link.cut()
    cut_at = time.monotonic()
    for i in range(DURING):
        increment(f, ledger, "van-1", SCOPE, i % 2, 2)
    f.wait_agent_status("van-1", lambda st: not st["online"], 6 * KEEPALIVE_S,
                        what="agent status says offline after the link went silent")
    noticed_s = time.monotonic() - cut_at
    st = f.agent_status("van-1")
    assert st["pending"] > 0 and "offline" in st["summary"], st
    f.wait(lambda: not _server_online(f, "van-1"), 6 * KEEPALIVE_S,
           what="Mosquitto's keepalive publishes the last will: server shows offline")
    will_s = time.monotonic() - cut_at
    assert noticed_s < 4 * KEEPALIVE_S, noticed_s
    assert will_s < 4 * KEEPALIVE_S, will_s

    link.heal()
    healed_at = time.monotonic()
    f.wait_agent_status("van-1", lambda st: st["online"], 60, what="online again")
    back_s = time.monotonic() - healed_at
    f.wait_drained("van-1", timeout=60)
    drained_s = time.monotonic() - healed_at
    f.wait(lambda: _server_online(f, "van-1"), 30, what="server shows it online again")
    check_exact(f, ledger)
    check_sequences(f, ledger)
    print(f"\nMosquitto link silent: agent offline after {noticed_s:.1f} s, will seen by the "
          f"server after {will_s:.1f} s (keepalive {KEEPALIVE_S} s); online {back_s:.1f} s "
          f"and drained {drained_s:.1f} s after the heal; {ledger.changes} changes "
          "applied exactly once")
