"""What the fault-pair tests (tests/e2e/test_fault_pairs_*.py) share. They cover
faults between pairs of parts that the other fault modules leave out, with real
processes: a part frozen (SIGSTOP, then SIGCONT: a paused VM, a process stuck on I/O)
or restarted while the part next to it is mid-operation. Each test drains counter
increments, so a change applied twice or lost shows in the total, and checks one q per
change in the scope's log, convergence of every device, and what status says.

Coverage of pair x fault. e2e: a whole fleet; unit: the part alone; "-": none;
H: the test_fault_pairs_* modules. kill = SIGKILL, stop = SIGSTOP then SIGCONT,
cut = reset or silent link.

| pair            | kill      | restart  | stop | cut               | slow    | disk full |
| app-agent       | unit      | e2e      | -    | H (reset), http   | http    | unit      |
| agent-store     | e2e       | e2e      | H    | n/a               | n/a     | H         |
| agent-broker    | e2e, H    | e2e      | H    | e2e silent        | e2e     | H (Mosq.) |
| broker-server   | e2e       | e2e      | H    | e2e silent, AMQP  | -       | H (Mosq.) |
| server-LMDB     | e2e       | e2e      | n/a  | n/a               | n/a     | H, unit   |
| server-Postgres | e2e       | H        | H    | H silent, unit    | -       | H         |

Where the broker and store kinds do not change what is tried (the merge server or the
agent frozen, the sync process killed), a test runs on the default fleet (embedded
broker, LMDB) only, and backlogs are 150 changes (6-8 throttled batches: the fault
still lands mid-drain, each test asserts so): these modules are a suite cost on 2 cores.

(disk full, the services': PostgreSQL's whole disk (a table cannot grow: SQLSTATE
53100, it keeps running) and its WAL disk alone (it PANICs, and shuts down when its
recovery finds no room either); Mosquitto's persistence disk (its saves fail, and it
is restarted on it, losing its sessions). The embedded broker persists nothing but its
password files: no disk-full case of its own. test_fault_pairs_disk_services.py.)

(stop, test_fault_pairs_hung.py: the agent's sync process alone stopped for good (the
service replaces it: sync.hung_after_s); one merge server of two stopped inside a
write transaction on the shared PostgreSQL, the other serving its scopes
(server-Postgres, broker-server). The sync process stopped and continued while the app
writes through the local HTTP API is not in the suite: that test's retry, when its
freeze landed inside a write transaction, failed.)

(agent-store "stop" is the agent frozen inside a write transaction: H, with the
unit test tests/agent/test_status_beside_stuck_writer.py; "kill, H" on agent-broker is
the sync process alone killed between publish and ack.)
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fleet import MOSQUITTO, Fleet
from tests.helpers import wait_until
from tests.pgserver import _children

SCOPE = "depot-7"
KEY = "sku-1"
THROTTLED = {"batch_max_changes": 20, "max_inflight_changes": 40}


@contextlib.contextmanager
def frozen(pids: list[int]) -> Iterator[None]:
    """SIGSTOP every pid and wait until every thread of each is stopped; SIGCONT them on
    the way out, whatever happened.

    kill() returns before the process stops: the kernel wakes one thread (the main one)
    to take the stop, and only when that thread gets a CPU does it stop the others.
    Until then another thread already running goes on: under load a sync process
    committed a whole ack (20 changes off the outbox) after kill() had returned, and
    the body's "pending while frozen" read came before it."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: all(_all_stopped(pid) for pid in pids), 30, interval=0.001,
                   message=lambda: f"every thread stopped: {_thread_states(pids)}")
        yield
    finally:
        # Continued until none is stopped: a parent that stops itself when its child
        # stops (runuser) may do so again on a stop it learns of after its SIGCONT.
        def running() -> bool:
            stopped = [pid for pid in pids if _state(pid) == "T"]
            for pid in reversed(stopped or pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            return not stopped
        wait_until(running, 30, interval=0.05, message="every frozen process continued")


def _thread_states(pids: list[int]) -> dict[str, str]:
    """pid/tid -> state letter, for every thread of `pids` still there."""
    states: dict[str, str] = {}
    for pid in pids:
        try:
            tids = [t.name for t in Path(f"/proc/{pid}/task").iterdir()]
        except OSError:
            continue  # gone: nothing of it runs
        for tid in tids:
            state = _stat_state(Path(f"/proc/{pid}/task/{tid}/stat"))
            if state:
                states[f"{pid}/{tid}"] = state
    return states


def _all_stopped(pid: int) -> bool:
    """Every thread of `pid` stopped (T, or t under a tracer), or it is gone / a zombie.
    A thread in D (inside a system call) stops when the call returns, before it runs
    another instruction of its own."""
    return all(st in "TtZX" for st in _thread_states([pid]).values())


def _state(pid: int) -> str:
    return _stat_state(Path(f"/proc/{pid}/stat"))


def _stat_state(path: Path) -> str:
    """The state letter of a /proc stat file ("" when it is gone)."""
    try:
        stat = path.read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[0]


def seed(fleet: Fleet, devs: tuple[str, ...], *, sync: dict[str, int] | None = None,
         quick_keepalive: bool = False) -> None:
    """Enrol `devs` (sync settings `sync`, THROTTLED by default; `quick_keepalive`: see
    `fast_keepalive`), create the shared record from the first, and converge."""
    for dev in devs:
        fleet.add_device(dev, [SCOPE], sync=THROTTLED if sync is None else sync)
        if quick_keepalive:
            fast_keepalive(fleet, dev)
    fleet.agent(devs[0]).put("inventory", KEY, {"depot": SCOPE, "sku": KEY})
    fleet.start_agents(*devs)
    fleet.wait_drained(*devs, timeout=30)
    fleet.wait_converged(*devs, timeout=30)


def write_backlog(fleet: Fleet, devs: tuple[str, ...], count: int) -> None:
    """Each device adds 1 to the stock `count` times while its agent is stopped, then
    starts draining (not waited for)."""
    start = fleet.scope_seq(SCOPE)
    for dev in devs:
        fleet.stop_agent(dev)
        ag = fleet.agent(dev)
        for _ in range(count):
            ag.increment("inventory", KEY, "stock", 1)
    for dev in devs:
        fleet.start_agent(dev, wait=False)
    fleet.wait(lambda: fleet.scope_seq(SCOPE) > start, 30, what="the drain under way",
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



needs_mosquitto = pytest.mark.skipif(MOSQUITTO is None,
                                     reason="the mosquitto binary is not installed")


FAST_KEEPALIVE = 5
"""The smallest keepalive the config takes: a frozen peer is noticed within ~1.5x it."""


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (the embedded broker and Mosquitto run as one process, but
    a part that grew helpers would be frozen whole)."""
    return [pid, *_children(pid)]


def fast_keepalive(fleet: Fleet, dev: str) -> None:
    """The smallest keepalive, and a deaf link noticed after 2 s (30 s while the server
    is announced down: agent.daemon_deaf)."""
    def edit(d: dict[str, Any]) -> None:
        d["mqtt"].update(keepalive_s=FAST_KEEPALIVE)
        d["sync"].update(deaf_after_s=2.0)
    fleet.edit_agent_config(dev, edit)


