"""Three merge servers side by side: one PostgreSQL database, Mosquitto's shared subscription.

Six agents in three scopes (each in two of them) write counter increments, contested and
uncontested lww fields and new records; some write offline first and connect later, one
goes offline in the middle and comes back. A seventh device that never says it is
online (so it gets no deltas) polls catch-ups all the while. What must hold:

- no double apply: counter totals exact; every change id has one applied outcome, and
  the outcomes' sequence numbers cover 1..N of each scope with no gap and no duplicate;
- the load really was shared: every server applied changes, and together exactly as
  many as were written;
- every device converges to the server, and the catch-up poller's view, built from
  catch-up pages only, equals the server's (no checkpoint ever skipped a change that
  committed later on another server);
- a server SIGKILLed while devices drain a backlog: the others take over, totals stay
  exact, and the dead server takes no further share of the traffic (a device whose ack
  timeout is longer than the test's deadline still drains); restarted, it rejoins.
"""

from __future__ import annotations

import re
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from agent.models import WriteResult
from tests.e2e.fleet import MOSQUITTO, Fleet
from tests.e2e.protocol_device import ProtocolDevice
from waystation.convergence import server_records

pytestmark = [
    pytest.mark.e2e, pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.postgres,
    pytest.mark.skipif(MOSQUITTO is None, reason="the mosquitto binary is not installed"),
]

SERVERS = ("server-1", "server-2", "server-3")
SCOPES = ("depot-1", "depot-2", "depot-3")
DEVICES: dict[str, tuple[str, ...]] = {
    "van-1": ("depot-1", "depot-2"), "van-2": ("depot-2", "depot-3"),
    "van-3": ("depot-1", "depot-3"), "van-4": ("depot-1", "depot-2"),
    "van-5": ("depot-2", "depot-3"), "van-6": ("depot-1", "depot-3"),
}
SHARED = 3            # shared counter records per scope, written by every device in it
ROUNDS = 8
THROTTLED = {"batch_max_changes": 50, "max_inflight_changes": 100}
BACKLOG = 200         # increments per draining device when a server is killed (the kill
                      # comes at the victim's first apply: hundreds are still queued)
APPLIED = 'waystation_server_changes_total{outcome="applied"}'


def shared_key(scope: str, j: int) -> str:
    return f"sku-{scope}-{j}"


@dataclass
class Ledger:
    """What the devices wrote, hence what the server must hold."""

    stock: Counter[str] = field(default_factory=Counter)
    fields: dict[str, dict[str, Any]] = field(default_factory=dict)   # single-writer records
    last_n: dict[str, int] = field(default_factory=dict)
    touched: dict[str, set[str]] = field(default_factory=dict)

    def note(self, dev: str, result: WriteResult) -> None:
        assert result.state == "pending" and result.n is not None, result
        assert result.n == self.last_n.get(dev, 0) + 1, "change numbers are gapless"
        self.last_n[dev] = result.n

    @property
    def changes(self) -> int:
        return sum(self.last_n.values())


def increment(fleet: Fleet, ledger: Ledger, dev: str, scope: str, j: int, amount: int) -> None:
    """Add `amount` to a shared record's stock (creating it locally on first touch)."""
    ag = fleet.agent(dev)
    key = shared_key(scope, j)
    touched = ledger.touched.setdefault(dev, set())
    if key not in touched:
        ledger.note(dev, ag.put("inventory", key, {"depot": scope, "bin": f"{dev}-new"}))
        touched.add(key)
    ledger.note(dev, ag.increment("inventory", key, "stock", amount))
    ledger.stock[key] += amount


def write_round(fleet: Fleet, ledger: Ledger, dev: str, r: int) -> None:
    """One device's writes of round `r`: increments and a contested lww value on the
    shared records, a new record per scope and (in its first scope) an edit of the
    previous round's."""
    ag = fleet.agent(dev)
    for scope in DEVICES[dev]:
        for j in range(SHARED):
            increment(fleet, ledger, dev, scope, j, 1 + (r + j) % 3)
        ledger.note(dev, ag.put("inventory", shared_key(scope, r % SHARED), {"bin": f"{dev}-{r}"}))
        key = f"evt-{dev}-{scope}-{r}"
        values = {"depot": scope, "name": f"{dev} round {r}", "price": float(r)}
        ledger.note(dev, ag.put("inventory", key, values))
        ledger.fields[key] = dict(values)
        if r > 0 and scope == DEVICES[dev][0]:
            # The other scope's records keep their one version: a catch-up that skipped
            # one could never make up for it later.
            prev = f"evt-{dev}-{scope}-{r - 1}"
            ledger.note(dev, ag.put("inventory", prev, {"price": r + 0.5}))
            ledger.fields[prev]["price"] = r + 0.5


class CatchupPoller(threading.Thread):
    """A device that learns of changes through catch-up only, asking again and again."""

    def __init__(self, pd: ProtocolDevice) -> None:
        super().__init__(name="catchup-poller", daemon=True)
        self.pd = pd
        self.rounds = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.pd.sync_from_server(timeout=60)
                self.rounds += 1
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def done_since(self, rounds: int) -> bool:
        if self.error is not None:
            raise AssertionError("the catch-up poller failed") from self.error
        return self.rounds > rounds


@pytest.fixture
def fleet(tmp_path: Path, pg_database: str) -> Iterator[Fleet]:
    """Mosquitto (production config, devices on TLS) + three servers on one database."""
    with Fleet(tmp_path, "mosquitto", "postgres", pg_database, metrics=True,
               device_tls=True) as f:
        f.start()
        for sid in SERVERS[1:]:
            f.add_server(sid)
            f.start_server(sid)
        yield f


def applied(fleet: Fleet, sid: str) -> int:
    return int(fleet.metrics(sid)[APPLIED])


def check_exact(fleet: Fleet, ledger: Ledger) -> None:
    """Counter totals and single-writer records exactly as written."""
    for key, total in ledger.stock.items():
        assert fleet.value("inventory", key, "stock") == total, key
    for key, values in ledger.fields.items():
        rec = fleet.record("inventory", key)
        assert rec is not None and rec["f"] == values, (key, rec)


def check_sequences(fleet: Fleet, ledger: Ledger) -> None:
    """Every change applied once: one outcome per change id, and the outcomes' (scope, q)
    are exactly 1..N of each scope - no gap, no duplicate, nothing applied twice."""
    used: dict[str, list[int]] = {s: [] for s in SCOPES}
    namespaces = {dev: fleet.outcome_ns(dev) for dev in ledger.last_n}
    with fleet.store.read() as txn:
        for dev, last in ledger.last_n.items():
            for n in range(1, last + 1):
                row = txn.get_outcome(namespaces[dev], n)
                assert row is not None and row.applied, f"{dev}:{n} has outcome {row}"
                used[row.scope].append(row.q)
        seqs = {s: txn.scope_seq(s) for s in SCOPES}
    for scope in SCOPES:
        assert sorted(used[scope]) == list(range(1, seqs[scope] + 1)), scope
    assert sum(seqs.values()) == ledger.changes


def test_three_servers_share_the_load_exactly_once(fleet: Fleet) -> None:
    """Three servers on one database: exact totals, gapless sequences, shared load,
    convergence, a catch-up poller that misses nothing; one SIGKILLed mid-drain."""
    ledger = Ledger()
    for dev, scopes in DEVICES.items():
        fleet.add_device(dev, scopes, sync=THROTTLED)
    # Enrolled now, started after the kill: it would wait a minute for any change the
    # broker handed to the dead server.
    fleet.add_device("late-1", ["depot-1"], sync={"ack_timeout_s": 60.0,
                                                  "batch_max_changes": 5})
    fleet.add_device("watch-1", SCOPES)
    watcher = ProtocolDevice("watch-1", fleet.passwords["watch-1"], port=fleet.port,
                             scopes=SCOPES)
    assert watcher.connect(online=False) == "Success", fleet.broker_log_tail()
    watcher.hello()
    poller = CatchupPoller(watcher)

    # ------------------------------------------------ phase 1: all three servers up
    offline_first = {"van-5", "van-6"}   # write rounds 0-2 before they ever connect
    away = {"van-3": range(3, 6)}        # connected, offline for rounds 3-5, back
    fleet.start_agents(*(dev for dev in DEVICES if dev not in offline_first))
    poller.start()
    try:
        for r in range(ROUNDS):
            if r == 3:
                fleet.start_agents(*offline_first)
                fleet.stop_agent("van-3")
            if r == 6:
                fleet.start_agent("van-3")
            for dev in DEVICES:
                write_round(fleet, ledger, dev, r)
            assert r not in away["van-3"] or fleet.pending("van-3") > 0
            # Interleave: a whole catch-up while these writes are being applied.
            fleet.wait(partial(poller.done_since, poller.rounds), 60,
                       what="the poller finished a catch-up")
        fleet.wait_converged(*DEVICES, timeout=90)
    finally:
        poller.stopping.set()
        poller.join(90)
    assert poller.error is None, poller.error
    print(f"\nphase 1: {ledger.changes} changes, {poller.rounds} catch-ups by the poller "
          f"while they were applied")
    assert poller.rounds >= ROUNDS

    check_exact(fleet, ledger)
    check_sequences(fleet, ledger)
    per_server = {sid: applied(fleet, sid) for sid in SERVERS}
    print(f"applied per server: {per_server}")
    assert all(count > 0 for count in per_server.values()), per_server
    assert sum(per_server.values()) == ledger.changes, per_server

    # The poller saw nothing but catch-up pages, and they add up to the server's view.
    watcher.sync_from_server()
    assert watcher.deltas == []
    assert watcher.cp == {s: fleet.scope_seq(s) for s in SCOPES}
    server = server_records(fleet.store, SCOPES)
    assert set(watcher.records) == set(server)
    for ck, view in server.items():
        mine = watcher.records[ck]
        assert (mine["x"], mine["f"]) == (view.deleted, view.fields), ck
    watcher.close()

    # ------------------------------------------------ phase 2: kill -9 one server
    draining = ("van-1", "van-2", "van-4")
    fleet.stop_agents(*draining)
    for dev in draining:
        for i in range(BACKLOG):
            increment(fleet, ledger, dev, DEVICES[dev][i % 2], i % SHARED, 1)
    victim = "server-2"
    before = applied(fleet, victim)
    for dev in draining:
        fleet.start_agent(dev, wait=False)
    fleet.wait(lambda: applied(fleet, victim) > before, 60,
               what=f"{victim} applying part of the drain", interval=0.01)
    fleet.kill_server(victim)
    assert fleet.servers[victim].returncode == -signal.SIGKILL
    left = sum(fleet.pending(dev) for dev in draining)
    print(f"killed {victim} with {left} changes still to drain")
    assert left > 0, "the drain had finished: the kill was not mid-stream"

    # ("closed its connection", or "disconnected ..." with whatever errno it read)
    gone = re.compile(rf"Client waystation-{victim} (closed its connection|disconnected)")
    fleet.wait(lambda: gone.search(fleet.broker_log_tail(500)), 30,
               what="Mosquitto noticing the dead server")
    late = fleet.agent("late-1")
    for i in range(100):
        if i % 2:
            increment(fleet, ledger, "late-1", "depot-1", i % SHARED, 2)
        else:
            key = f"evt-late-1-{i}"
            values = {"depot": "depot-1", "name": f"late {i}"}
            ledger.note("late-1", late.put("inventory", key, values))
            ledger.fields[key] = values
    fleet.start_agent("late-1")
    # 20+ batches, each handed to one member of the group: one handed to the dead
    # server would wait for late-1's 60 s ack timeout.
    fleet.wait_drained("late-1", timeout=30)
    fleet.wait_drained(*draining, timeout=90)
    fleet.wait_converged(*DEVICES, "late-1", timeout=90)
    check_exact(fleet, ledger)
    check_sequences(fleet, ledger)
    for dev in (*DEVICES, "late-1"):
        assert fleet.agent(dev).dead_letters() == [], dev

    # ------------------------------------------------ the dead server comes back
    fleet.start_server(victim)
    r = ROUNDS

    def victim_applies() -> bool:
        nonlocal r
        if applied(fleet, victim) > 0:
            return True
        for dev in DEVICES:
            write_round(fleet, ledger, dev, r)
        r += 1
        return False

    fleet.wait(victim_applies, 60, what=f"the restarted {victim} taking its share",
               interval=0.2)
    fleet.wait_converged(*DEVICES, "late-1", timeout=90)
    check_exact(fleet, ledger)
    check_sequences(fleet, ledger)
