"""Faults between pairs of parts that the other fault modules leave out, with real
processes: a part frozen (SIGSTOP, then SIGCONT: a paused VM, a process stuck on I/O)
or restarted while the part next to it is mid-operation. Each test drains counter
increments, so a change applied twice or lost shows in the total, and checks one q per
change in the scope's log, convergence of every device, and what status says.

Coverage of pair x fault (e2e = a whole fleet; unit = the store or one process alone;
"-" = not covered; [here] = this module):

| pair            | SIGKILL          | restart         | SIGSTOP        | cut / silent link    | slow        | disk full  |
| app-agent       | unit (idem.)     | e2e service     | -              | http (lost answer)   | http hostile| unit       |
| agent-store     | e2e crashes      | e2e crashes     | -              | n/a                  | n/a         | unit       |
| agent-broker    | e2e crashes      | e2e crashes     | [here]         | e2e silent_links(+M) | e2e slow    | -          |
| broker-server   | e2e crash_status | e2e crashes     | [here]         | e2e silent (+AMQP)   | -           | -          |
| server-LMDB     | e2e crashes      | e2e crashes     | n/a (in-proc)  | n/a                  | n/a         | unit       |
| server-Postgres | e2e store_faults | [here]          | [here]         | unit silent_link     | -           | -          |
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.fleet import MOSQUITTO, Fleet
from tests.pgserver import PgServer, _children

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SCOPE = "depot-7"
KEY = "sku-1"
THROTTLED = {"batch_max_changes": 20, "max_inflight_changes": 40}


@contextlib.contextmanager
def frozen(pids: list[int]) -> Iterator[None]:
    """SIGSTOP every pid; SIGCONT them on the way out, whatever happened."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def seed(fleet: Fleet, devs: tuple[str, ...]) -> None:
    """Enrol `devs`, create the shared record from the first, and converge."""
    for dev in devs:
        fleet.add_device(dev, [SCOPE], sync=THROTTLED)
    fleet.agent(devs[0]).put("inventory", KEY, {"depot": SCOPE, "sku": KEY})
    fleet.start_agents(*devs)
    fleet.wait_drained(*devs, timeout=30)
    fleet.wait_converged(*devs, timeout=30)


def write_backlog(fleet: Fleet, devs: tuple[str, ...], count: int) -> None:
    """Each device adds 1 to the stock `count` times while its agent is stopped, then
    starts draining (not waited for)."""
    for dev in devs:
        fleet.stop_agent(dev)
        ag = fleet.agent(dev)
        for _ in range(count):
            ag.increment("inventory", KEY, "stock", 1)
    for dev in devs:
        fleet.start_agent(dev, wait=False)
    fleet.wait(lambda: fleet.scope_seq(SCOPE) > 1, 30, what="the drain under way",
               interval=0.005)


def assert_exactly_once(fleet: Fleet, devs: tuple[str, ...], total: int) -> None:
    """The stock is exactly the increments written, one q per change, nothing refused,
    every device's view equals the server's."""
    fleet.wait_drained(*devs, timeout=60)
    assert fleet.value("inventory", KEY, "stock") == total
    assert fleet.scope_seq(SCOPE) == 1 + total
    for dev in devs:
        assert fleet.agent(dev).dead_letters() == []
    assert fleet.server_dead_letters() == []
    fleet.wait_converged(*devs, timeout=60)
    for dev in devs:
        st = fleet.agent_status(dev)
        assert st["pending"] == 0 and st["online"], st["summary"]


# ------------------------------------------------------------ server - PostgreSQL

needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None,
                                     reason="the mosquitto binary is not installed")


@pytest.fixture
def pg_fleet(tmp_path: Path, own_pg_server: PgServer) -> Iterator[tuple[Fleet, PgServer]]:
    url = own_pg_server.create_database("pairs")
    with Fleet(tmp_path, "mosquitto", "postgres", url) as fleet:
        fleet.start()
        yield fleet, own_pg_server


@needs_mosquitto
@pytest.mark.mosquitto
@pytest.mark.postgres
def test_postgres_frozen_mid_batch_then_resumed(pg_fleet: tuple[Fleet, PgServer]) -> None:
    """PostgreSQL stopped dead (SIGSTOP) while the server applies the devices' batches,
    for longer than the devices' ack timeout (so they send again): once resumed, every
    increment is applied once; meanwhile the devices say their changes are pending."""
    fleet, pg = pg_fleet
    devs = ("van-1", "van-2")
    seed(fleet, devs)
    writes = 200
    write_backlog(fleet, devs, writes)
    with frozen(pg.processes()):
        left = sum(fleet.pending(dev) for dev in devs)
        assert left > 0, "the drain had finished: the freeze was not mid-stream"
        # Long enough for the devices' resends (ack timeout 2 s) to reach the server.
        st = fleet.wait_agent_status(
            "van-1", lambda s: (s["oldest_pending_age_s"] or 0) > 6, 30,
            what="van-1's changes waiting past three ack timeouts")
        assert st["pending"] > 0 and "pending" in st["summary"], st
        print(f"\nfroze postgres with {left} changes pending; van-1: {st['summary']}")
    assert_exactly_once(fleet, devs, 2 * writes)
    assert fleet.server.running


@needs_mosquitto
@pytest.mark.mosquitto
@pytest.mark.postgres
def test_postgres_restarted_mid_batch(pg_fleet: tuple[Fleet, PgServer]) -> None:
    """PostgreSQL restarted (fast shutdown: every session ended, then a start) while the
    server applies the devices' batches: every increment applied once, the server keeps
    running and the devices converge."""
    fleet, pg = pg_fleet
    devs = ("van-1", "van-2")
    seed(fleet, devs)
    writes = 200
    write_backlog(fleet, devs, writes)
    pg.restart()
    left = sum(fleet.pending(dev) for dev in devs)
    print(f"\nrestarted postgres with {left} changes pending")
    assert left > 0, "the drain had finished: the restart was not mid-stream"
    assert_exactly_once(fleet, devs, 2 * writes)
    assert fleet.server.running


# ------------------------------------------------------ agent - broker - server

FAST_KEEPALIVE = 5
"""The smallest keepalive the config takes: a frozen peer is noticed within ~1.5x it."""


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (the embedded broker and Mosquitto run as one process, but
    a part that grew helpers would be frozen whole)."""
    return [pid, *_children(pid)]


def fast_keepalive(fleet: Fleet, dev: str) -> None:
    fleet.edit_agent_config(dev, lambda d: d["mqtt"].update(keepalive_s=FAST_KEEPALIVE))


def test_broker_frozen_while_devices_publish(fleet: Fleet) -> None:
    """The broker stopped dead (SIGSTOP) for longer than everyone's keepalive while one
    device drains a backlog and another keeps writing: the devices say offline while it
    is frozen; once it is resumed (stale connections and a backlog of new ones at once)
    every increment is applied once and both devices converge."""
    fleet.stop_server()
    fleet.start_server(env={"WAYSTATION_SERVER__MQTT__KEEPALIVE_S": str(FAST_KEEPALIVE)})
    devs = ("van-1", "van-2")
    for dev in devs:
        fleet.add_device(dev, [SCOPE], sync=THROTTLED)
        fast_keepalive(fleet, dev)
    fleet.agent("van-1").put("inventory", KEY, {"depot": SCOPE, "sku": KEY})
    fleet.start_agents(*devs)
    fleet.wait_converged(*devs, timeout=30)
    backlog, live = 300, 20
    write_backlog(fleet, ("van-1",), backlog)
    assert fleet.broker is not None and fleet.broker.proc is not None
    with frozen(process_tree(fleet.broker.proc.pid)):
        for dev in devs:
            st = fleet.wait_agent_status(dev, lambda s: not s["online"], 30,
                                         what=f"{dev} says offline while the broker is frozen")
            assert st["pending"] > 0 or dev == "van-2", st
        for _ in range(live):
            fleet.agent("van-2").increment("inventory", KEY, "stock", 1)
        assert fleet.agent_status("van-2")["pending"] == live
        left = fleet.pending("van-1")
        print(f"\nbroker frozen with {left} of van-1's changes pending; "
              f"van-1: {fleet.agent_status('van-1')['summary']}")
        assert left > 0, "the drain had finished: the freeze was not mid-stream"
    assert_exactly_once(fleet, devs, backlog + live)
    assert fleet.server.running


def test_server_frozen_while_the_broker_queues(fleet: Fleet) -> None:
    """The merge server stopped dead (SIGSTOP) mid-drain, for longer than its keepalive:
    the broker drops it and publishes its last will, so the devices say "server
    unavailable" and hold their changes; resumed, it reconnects and every increment
    (those it held half-done and those written meanwhile) is applied once."""
    fleet.stop_server()
    fleet.start_server(env={"WAYSTATION_SERVER__MQTT__KEEPALIVE_S": str(FAST_KEEPALIVE)})
    devs = ("van-1", "van-2")
    seed(fleet, devs)
    backlog, live = 300, 20
    write_backlog(fleet, ("van-1",), backlog)
    with frozen(process_tree(fleet.server.pid)):
        for dev in devs:
            st = fleet.wait_agent_status(
                dev, lambda s: any(d.get("code") == "server_unavailable"
                                   for d in s["deferred"]), 30,
                what=f"{dev} says the server is unavailable")
            assert "server unavailable" in st["summary"], st
        for _ in range(live):
            fleet.agent("van-2").increment("inventory", KEY, "stock", 1)
        st = fleet.agent_status("van-2")
        assert st["pending"] == live and st["online"], st
        left = fleet.pending("van-1")
        print(f"\nserver frozen with {left} of van-1's changes pending; "
              f"van-1: {fleet.agent_status('van-1')['summary']}")
        assert left > 0, "the drain had finished: the freeze was not mid-stream"
    assert_exactly_once(fleet, devs, backlog + live)
    for dev in devs:
        assert not fleet.agent_status(dev)["deferred"]
