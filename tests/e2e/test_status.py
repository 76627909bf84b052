"""What the agent tells people, and that its upload queue never waits for a nudge."""

from __future__ import annotations

import json

import pytest

from tests.e2e.fleet import FAST_SYNC, Fleet

pytestmark = pytest.mark.e2e


def test_status_is_honest(fleet: Fleet) -> None:
    """`agent status --json` tells offline/pending/age, online/synced, and dead letters."""
    fleet.add_device("van-1", ["depot-7"])
    ag = fleet.agent("van-1")
    ag.put("inventory", "sku-1", {"depot": "depot-7", "name": "Bread flour"})
    ag.increment("inventory", "sku-1", "stock", 3)
    for i in range(18):
        ag.put("inventory", f"sku-{i + 2}", {"depot": "depot-7"})

    # The daemon has never run: offline, everything pending, nothing synced yet.
    st = fleet.agent_status("van-1")
    assert st["online"] is False
    assert st["pending"] == 20 == len(ag.pending())
    assert st["oldest_pending_age_s"] > 0
    assert st["last_sync_age_s"] is None
    assert "offline" in st["summary"] and "20 changes saved locally" in st["summary"]

    fleet.start_agent("van-1")
    fleet.wait_drained("van-1")
    st = fleet.agent_status("van-1")
    assert st["online"] is True and st["pending"] == 0
    assert st["oldest_pending_age_s"] is None
    assert st["last_sync_age_s"] is not None and st["last_sync_age_s"] < 10
    assert st["summary"].startswith("online, 0 pending")

    # The daemon runs but the broker is gone: offline again, new writes pending.
    fleet.stop_broker()
    fleet.wait(lambda: not fleet.agent_status("van-1")["online"], 30,
               what="agent status says offline")
    for _ in range(5):
        ag.increment("inventory", "sku-1", "stock", 1)
    st = fleet.agent_status("van-1")
    assert st["online"] is False and st["pending"] == 5 == len(ag.pending())
    assert st["oldest_pending_age_s"] > 0
    fleet.start_broker()
    fleet.wait_drained("van-1")
    fleet.wait(lambda: fleet.agent_status("van-1")["online"], 30, what="online again")

    # A change the server refuses for good becomes a dead letter; later ones still sync.
    refused = ag.increment("inventory", "sku-1", "stock", -100)  # stock 8: rule min = 0
    ag.put("inventory", "sku-1", {"bin": "B-7"})
    ag.increment("inventory", "sku-1", "stock", 4)
    fleet.wait_drained("van-1")
    assert fleet.value("inventory", "sku-1", "stock") == 12
    assert fleet.value("inventory", "sku-1", "bin") == "B-7"
    st = fleet.agent_status("van-1")
    assert st["dead_letters"] == 1 and st["pending"] == 0 and st["online"] is True
    assert "1 dead letter" in st["summary"]
    letters = json.loads(fleet.cli("agent", "deadletters", "--json", "--config",
                                   str(fleet.agent_config_path("van-1"))).stdout)
    assert [(d["n"], d["code"]) for d in letters] == [(refused.n, "rule_rejected")]
    assert "stock" in letters[0]["reason"]
    record = ag.get("inventory", "sku-1")
    assert record is not None and record.fields["stock"] == 12  # the optimistic -100 rolled back
    fleet.wait_converged("van-1")


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["server", "broker"])
def test_upload_queue_drains_by_itself_after_an_outage(fleet: Fleet, outage: str) -> None:
    """After an outage the outbox drains by itself, with no local write to nudge it."""
    # Server down (and its broker queue lost): only ack-timeout resends bring the changes;
    # broker down: the agent's reconnect (with backoff) and resend of everything unacked.
    fleet.add_device("van-1", ["depot-7"])
    fleet.start_agent("van-1")
    ag = fleet.agent("van-1")
    ag.put("inventory", "sku-1", {"depot": "depot-7"})
    fleet.wait_drained("van-1")
    count = 50
    if outage == "server":
        # The server dies, and the broker forgets its session and anything queued for it:
        # only the agent's own resends can bring these changes to the next server.
        fleet.kill_server()
        fleet.restart_broker(hard=True)
        fleet.wait(lambda: len(fleet.agents["van-1"].events("connected")) >= 2, 30,
                   what="van-1 reconnected to the restarted broker")
        for _ in range(count):
            ag.increment("inventory", "sku-1", "stock", 1)
        wait_s = 2 * FAST_SYNC["ack_timeout_s"] + 1  # each change sent, unanswered, resent
    else:
        fleet.stop_broker()
        fleet.wait(lambda: not ag.status().online, 30, what="the agent notices")
        for _ in range(count):
            ag.increment("inventory", "sku-1", "stock", 1)
        wait_s = 3 * FAST_SYNC["backoff_max_s"] + 1  # several reconnect attempts fail
    fleet.wait(lambda: (ag.status().oldest_pending_age_s or 0) > wait_s, wait_s + 30,
               what=f"the changes waited {wait_s} s", interval=0.1)
    assert ag.status().pending == count

    # No local write from here on: nothing pokes the agent.
    if outage == "server":
        fleet.start_server()
    else:
        fleet.start_broker()
    fleet.wait_drained("van-1", timeout=60)
    assert fleet.value("inventory", "sku-1", "stock") == count
    assert fleet.scope_seq("depot-7") == count + 1
    fleet.wait_converged("van-1")
