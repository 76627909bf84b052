"""Crashes at the worst moments (SIGKILL of agent, server, broker): nothing lost, nothing doubled.

Each test writes counter increments offline, lets the agent drain them and kills a
process while the drain is under way; afterwards the counter total must be exactly the
number of increments (every change applied once: DESIGN.md guarantee 1), the scope's
log must hold exactly one sequence number per change, and the device's view must equal
the server's (guarantee 2).
"""

from __future__ import annotations

import signal

import pytest

from broker.server.store.base import ServerRow
from tests.e2e.fleet import Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

INCREMENTS = 3000
# Small batches and a small window, so a drain of 3,000 changes takes many round trips
# and a crash can land in the middle of it.
THROTTLED = {"batch_max_changes": 50, "max_inflight_changes": 100}


def _servers(fleet: Fleet) -> list[ServerRow]:
    with fleet.store.read() as txn:
        return txn.servers()


def write_offline(fleet: Fleet, dev: str, count: int, key: str = "sku-1") -> None:
    """Create inventory/`key` and add 1 to its stock `count` times (agent not running)."""
    ag = fleet.agent(dev)
    ag.put("inventory", key, {"depot": "depot-7", "sku": key})
    for _ in range(count):
        ag.increment("inventory", key, "stock", 1)
    assert ag.status().pending == count + 1


def wait_partly_applied(fleet: Fleet, total: int, key: str = "sku-1") -> int:
    """Wait until the server has applied some (a tenth) but not all increments; the stock
    seen then."""
    def partly() -> int | None:
        stock = fleet.value("inventory", key, "stock") or 0
        assert stock < total, f"all {total} applied before the crash could happen"
        return stock if stock >= total // 10 else None
    return fleet.wait(partly, 60, what="the server applied some increments", interval=0.002)


def assert_exactly_once(fleet: Fleet, dev: str, total: int, key: str = "sku-1") -> None:
    assert fleet.value("inventory", key, "stock") == total
    # One q per change: the put plus `total` increments, none applied twice.
    assert fleet.scope_seq("depot-7") == total + 1
    assert fleet.agent(dev).dead_letters() == []
    fleet.wait_converged(dev, timeout=30)


def test_agent_killed_mid_drain_then_restarted(fleet: Fleet) -> None:
    """An agent SIGKILLed mid-drain of 3,000 increments applies each exactly once after restart."""
    fleet.add_device("van-1", ["depot-7"], sync=THROTTLED)
    write_offline(fleet, "van-1", INCREMENTS)
    fleet.start_agent("van-1")
    seen = wait_partly_applied(fleet, INCREMENTS)
    fleet.kill_agent("van-1")
    assert fleet.agents["van-1"].returncode == -signal.SIGKILL
    left = fleet.pending("van-1")
    print(f"\nkilled the agent with {seen} increments applied on the server, {left} changes "
          "still in its outbox")
    assert left > 0, "the drain had finished: the kill was not mid-drain"

    fleet.start_agent("van-1")
    fleet.wait_drained("van-1", timeout=90)
    assert_exactly_once(fleet, "van-1", INCREMENTS)


def test_server_killed_after_apply_before_ack(fleet: Fleet) -> None:
    """A server killed after committing a group but before acking it applies nothing twice."""
    count = 300
    fleet.add_device("van-1", ["depot-7"])
    write_offline(fleet, "van-1", count)
    fleet.stop_server()
    (stopped,) = _servers(fleet)
    assert stopped.stopped_ms >= stopped.seen_ms > 0, "a clean stop records itself"
    fleet.start_server(env={"WAYSTATION_FAILPOINT": "after_commit:1"})
    fleet.start_agent("van-1")

    assert fleet.server.wait_exit(30) == -signal.SIGKILL
    assert fleet.server.events("failpoint_after_commit"), fleet.server.log_tail()
    # The killed run recorded its start and no clean stop: `server status` calls it gone
    # once it is not seen for the threshold (tests/server/test_cli.py shows the wording).
    (killed,) = _servers(fleet)
    assert killed.started_ms > stopped.stopped_ms and killed.stopped_ms == 0
    applied = fleet.value("inventory", "sku-1", "stock") or 0
    with fleet.store.read() as txn:
        committed = txn.get_outcome(fleet.outcome_ns("van-1"), 1)
    assert committed is not None and committed.applied, "the group was committed"
    # ... and never acked: the device still holds every change it wrote.
    assert fleet.pending("van-1") == count + 1
    print(f"\nserver died after committing {fleet.scope_seq('depot-7')} changes "
          f"({applied} increments), before acking any")

    fleet.start_server()  # no failpoint this time
    fleet.wait_drained("van-1", timeout=60)
    assert_exactly_once(fleet, "van-1", count)
    assert fleet.server_dead_letters() == []


def test_broker_restarted_mid_stream(fleet: Fleet) -> None:
    """A broker SIGKILLed and restarted mid-drain: totals exact, every device converges."""
    fleet.add_device("van-1", ["depot-7"], sync=THROTTLED)
    fleet.add_device("van-2", ["depot-7"])
    fleet.start_agent("van-2")  # online throughout: follows the drain through deltas
    write_offline(fleet, "van-1", INCREMENTS)
    fleet.start_agent("van-1")
    seen = wait_partly_applied(fleet, INCREMENTS)
    fleet.restart_broker(hard=True)
    print(f"\nkilled and restarted the {fleet.kind} broker with {seen} increments applied")

    fleet.wait_drained("van-1", timeout=120)
    assert_exactly_once(fleet, "van-1", INCREMENTS)
    fleet.wait_converged("van-2", timeout=60)
    assert fleet.agent("van-2").get("inventory", "sku-1").fields["stock"] == INCREMENTS  # type: ignore[union-attr]
    # Both agents and the server really lost their connection and came back.
    for proc in (fleet.agents["van-1"], fleet.agents["van-2"], fleet.server):
        assert len(proc.events("mqtt connected")) >= 2, proc.log_tail()


def test_quiet_online_device_learns_of_changes_made_while_the_server_was_down(
        fleet: Fleet) -> None:
    """van-2 writes while the server is down; van-1 stays connected and writes nothing.
    Once the server is back and applies van-2's change, van-1 gets it without a
    reconnect or a later change of its own (no waiting for the next gap)."""
    for dev in ("van-1", "van-2"):
        fleet.add_device(dev, ["depot-7"])
    fleet.start_agents("van-1", "van-2")
    fleet.agent("van-1").put("inventory", "sku-1", {"depot": "depot-7", "sku": "sku-1"})
    fleet.wait_converged("van-1", "van-2", timeout=30)
    _server_down_van2_writes_van1_hears(fleet, {})
    fleet.wait_converged("van-1", "van-2", timeout=30)


def _server_down_van2_writes_van1_hears(fleet: Fleet, server_env: dict[str, str]) -> None:
    """Kill the server, van-2 adds 7 meanwhile, start it (with `server_env`): once it
    applies the change, quiet van-1 gets it as a delta, not by a catch-up for a gap."""
    fleet.kill_server()
    fleet.agent("van-2").increment("inventory", "sku-1", "stock", 7)
    fleet.start_server(env=server_env)
    fleet.wait(lambda: fleet.value("inventory", "sku-1", "stock") == 7, 60,
               what="van-2's change applied")
    van1 = fleet.agent("van-1")

    def van1_has_it() -> bool:
        rec = van1.get("inventory", "sku-1")
        return rec is not None and rec.fields.get("stock") == 7

    # A delta takes milliseconds; 10 s is far below what van-1 would otherwise wait
    # for (its next reconnect, or a gap opened by a later change).
    fleet.wait(van1_has_it, 10, what="van-1 receiving the change")
    assert not fleet.agents["van-1"].events("catchup_for_gap")


def test_a_change_merged_as_a_restarted_server_rebuilds_presence_reaches_the_quiet_device(
        fleet: Fleet) -> None:
    """The test above with the load that once failed it made certain: the restarted
    server's worker stalls after it forgot presence (its new connection kept no session:
    Mosquitto, shared subscription), so the statuses the broker replays and van-2's
    hello and change wait in the intake together, van-2's status ahead (enrolled and
    online first). Every change merged must still reach van-1 as a delta: the replayed
    statuses are served before any device's messages (broker.server.intake.fair)."""
    for dev in ("van-1", "van-2"):
        fleet.add_device(dev, ["depot-7"])
    fleet.start_agent("van-2")
    # The broker replays retained statuses in the order their topics were first used.
    fleet.server.wait_event("presence", where=lambda e: e.get("dev") == "van-2")
    fleet.start_agent("van-1")
    fleet.agent("van-1").put("inventory", "sku-1", {"depot": "depot-7", "sku": "sku-1"})
    fleet.wait_converged("van-1", "van-2", timeout=30)
    _server_down_van2_writes_van1_hears(
        fleet, {"WAYSTATION_FAILPOINT": "stall_after_connect:2000"})
    if fleet.kind == "mosquitto":  # (the embedded broker kept the server's session)
        assert fleet.server.events("failpoint_stall_after_connect"), fleet.server.log_tail()
