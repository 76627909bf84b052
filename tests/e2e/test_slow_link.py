"""A device on a GPRS-like link (tests/slow_relay.py: a few kB/s each way, 600 ms round
trip) still catches up, and spends the link once: a catch-up page takes longer to cross
than the ack timeout, and the agent must not ask for it again while it arrives (each
request made the server queue another copy behind it). The long scenarios (32 kbit/s,
2,000 records, stalls) are in bench/slow_link.py."""

from __future__ import annotations

import hashlib
import time

import pytest

from tests.e2e.fleet import Fleet
from tests.slow_relay import SlowRelay

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RECORDS = 300
RATE_BPS = 64_000  # 8 kB/s: the page of ~60 kB takes ~8 s, the ack timeout here is 2 s


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_a_catch_up_slower_than_the_ack_timeout_is_asked_for_once(fleet: Fleet) -> None:
    fleet.add_device("feeder", ["depot-7"])
    fleet.add_device("van-1", ["depot-7"])
    feeder = fleet.agent("feeder")
    for i in range(RECORDS):
        # ~300 bytes of little redundancy each, so compression does not hide the size
        digest = hashlib.sha256(str(i).encode()).hexdigest()
        feeder.put("inventory", f"sku-{i}", {"depot": "depot-7", "name": digest * 3,
                                             "sku": digest[::-1]})
    fleet.start_agent("feeder")
    fleet.wait_drained("feeder")
    fleet.stop_agent("feeder")

    with SlowRelay(fleet.port, rate_bps=RATE_BPS, rtt_s=0.6) as relay:
        fleet.edit_agent_config("van-1", lambda d: d["mqtt"].update(host="127.0.0.1",
                                                                    port=relay.port))
        started = time.monotonic()
        fleet.start_agent("van-1")
        fleet.wait_converged("van-1", timeout=90)
        took = time.monotonic() - started
        agent_log = fleet.agents["van-1"]
        retries = agent_log.events("catchup_retry")
        deaf = agent_log.events("link_deaf")
        down = relay.bytes_down
        assert retries == [], (
            f"the catch-up was asked for again {len(retries)} times while its page was "
            f"still crossing the link ({down} bytes down in {took:.0f} s)")
        assert deaf == []
        assert relay.connections == 1
        # Every byte down is one copy of the page (plus the small messages): at the
        # link's rate, the catch-up took about the time its bytes need.
        assert took < 3 * down * 8 / RATE_BPS + 15, (took, down)
