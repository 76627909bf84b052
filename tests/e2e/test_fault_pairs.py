"""Faults between pairs of parts that the other fault modules leave out, with real
processes: a part frozen (SIGSTOP, then SIGCONT: a paused VM, a process stuck on I/O)
or restarted while the part next to it is mid-operation. Each test drains counter
increments, so a change applied twice or lost shows in the total, and checks one q per
change in the scope's log, convergence of every device, and what status says.

Coverage of pair x fault. e2e: a whole fleet; unit: the part alone; "-": none;
H: here. kill = SIGKILL, stop = SIGSTOP then SIGCONT, cut = reset or silent link.

| pair            | kill      | restart  | stop | cut               | slow    | disk full |
| app-agent       | unit      | e2e      | -    | H (reset), http   | http    | unit      |
| agent-store     | e2e       | e2e      | H    | n/a               | n/a     | H         |
| agent-broker    | e2e, H    | e2e      | H    | e2e silent        | e2e     | -         |
| broker-server   | e2e       | e2e      | H    | e2e silent, AMQP  | -       | -         |
| server-LMDB     | e2e       | e2e      | n/a  | n/a               | n/a     | H, unit   |
| server-Postgres | e2e       | H        | H    | H silent, unit    | -       | -         |

Where the broker and store kinds do not change what is tried (the merge server or the
agent frozen, the sync process killed), a test runs on the default fleet (embedded
broker, LMDB) only, and backlogs are 150 changes (6-8 throttled batches: the fault
still lands mid-drain, each test asserts so): the module is a suite cost on 2 cores.

(agent-store "stop" is the agent frozen inside a write transaction: H, with the
unit test tests/agent/test_status_beside_stuck_writer.py; "kill, H" on agent-broker is
the sync process alone killed between publish and ack.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest

from agent.errors import StorageFullError
from tests.e2e.fleet import MOSQUITTO, Fleet
from tests.helpers import free_port, wait_until
from tests.pgserver import PgServer, _children
from tests.silent_link import SilentLink
from tests.silent_link import unavailable_reason as silent_link_unavailable
from tests.small_disk import fill_disk, small_disk

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
        # Continued until none is stopped: a parent that stops itself when its child
        # stops (runuser) may do so again on a stop it learns of after its SIGCONT.
        def running() -> bool:
            stopped = [pid for pid in pids if _state(pid) == "T"]
            for pid in reversed(stopped or pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            return not stopped
        wait_until(running, 30, interval=0.05, message="every frozen process continued")


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[0]


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
        # The operator's view: the store cannot be reached, said plainly (exit 3 after
        # the connect timeout), not a hang.
        out = fleet.cli("server", "status", "--config", str(fleet.server_config),
                        check=False, timeout=60)
        assert out.returncode == 3 and "cannot connect to the PostgreSQL store" in out.stderr, \
            (out.returncode, out.stdout, out.stderr)
        t_resume = time.monotonic()
    fleet.wait_drained(*devs, timeout=60)
    print(f"drained {time.monotonic() - t_resume:.1f} s after postgres was resumed")
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
    """The smallest keepalive, and a deaf link noticed after 2 s (30 s while the server
    is announced down: agent.daemon_deaf)."""
    def edit(d: dict[str, Any]) -> None:
        d["mqtt"].update(keepalive_s=FAST_KEEPALIVE)
        d["sync"].update(deaf_after_s=2.0)
    fleet.edit_agent_config(dev, edit)


def test_broker_frozen_while_devices_publish(fleet: Fleet,
                                            request: pytest.FixtureRequest) -> None:
    """The broker stopped dead (SIGSTOP) for longer than everyone's keepalive while one
    device drains a backlog and another keeps writing: the devices say offline while it
    is frozen; once it is resumed (stale connections and a backlog of new ones at once)
    every increment is applied once and both devices converge."""
    if fleet.kind == "embedded":
        request.applymarker(pytest.mark.xfail(strict=False, reason=(
            "known, not fixed: a frozen-then-resumed embedded broker's take-over of a "
            "stale connection can leave a device's new session deaf to deltas; in a "
            "clean-clone CI run with 3 workers van-1 had not received van-2's live changes "
            "60 s after the resume. agent.daemon_deaf reconnects a deaf link; why that did "
            "not heal it within 60 s is not diagnosed")))
    fleet.stop_server()
    fleet.start_server(env={"WAYSTATION_SERVER__MQTT__KEEPALIVE_S": str(FAST_KEEPALIVE)})
    devs = ("van-1", "van-2")
    for dev in devs:
        fleet.add_device(dev, [SCOPE], sync=THROTTLED)
        fast_keepalive(fleet, dev)
    fleet.agent("van-1").put("inventory", KEY, {"depot": SCOPE, "sku": KEY})
    fleet.start_agents(*devs)
    fleet.wait_converged(*devs, timeout=30)
    backlog, live = 150, 20
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


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_server_frozen_while_the_broker_queues(fleet: Fleet) -> None:
    """The merge server stopped dead (SIGSTOP) mid-drain, for longer than its keepalive:
    the broker drops it and publishes its last will, so the devices say "server
    unavailable" and hold their changes; resumed, it reconnects and every increment
    (those it held half-done and those written meanwhile) is applied once."""
    fleet.stop_server()
    fleet.start_server(env={"WAYSTATION_SERVER__MQTT__KEEPALIVE_S": str(FAST_KEEPALIVE)})
    devs = ("van-1", "van-2")
    seed(fleet, devs)
    backlog, live = 150, 20
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


# --------------------------------------------------------------------- disk full


@pytest.fixture
def bare_fleet(tmp_path: Path) -> Iterator[Fleet]:
    """An embedded-broker, LMDB fleet not started yet (the test mounts a small disk
    under it first)."""
    with Fleet(tmp_path, "embedded", "lmdb") as fleet:
        yield fleet


def test_server_disk_full_mid_drain(bare_fleet: Fleet) -> None:
    """The merge server's LMDB disk fills up while a device drains: the server keeps
    running and refuses as transient (the device keeps every change, no dead letter);
    once there is room again every increment is applied once."""
    fleet = bare_fleet
    with small_disk(fleet.server_data, "24m") as mnt:
        fleet.start()
        devs = ("van-1",)
        seed(fleet, devs)
        backlog = 150
        write_backlog(fleet, devs, backlog)
        fill_disk(mnt / "filler")
        left = fleet.pending("van-1")
        print(f"\nserver disk full with {left} changes pending")
        assert left > 0, "the drain had finished: the disk filled too late"
        # LMDB commits into pages it freed before it needs the disk: the device writes
        # on (live) until a commit does need it.
        extra = 0

        def store_failed() -> dict[str, Any] | None:
            nonlocal extra
            found = next(iter(fleet.server.events("store_failed")), None)
            if found is None:
                for _ in range(10):
                    fleet.agent("van-1").increment("inventory", KEY, "stock", 1)
                extra += 10
            return found
        failed = fleet.wait(store_failed, 60, what="the server's store refusing a commit",
                            interval=0.05)
        assert "free disk space" in failed["exception"][0]["exc_value"], failed
        assert fleet.server.running, fleet.server.log_tail()
        # Refused as transient: nothing is dead-lettered on either side. (LMDB may go on
        # committing into pages it freed before: what it acks must be applied.)
        assert fleet.agent("van-1").dead_letters() == []
        assert fleet.server_dead_letters() == []
        (mnt / "filler").unlink()
        assert_exactly_once(fleet, devs, backlog + extra)
        assert fleet.server.running
        fleet.close()


@pytest.mark.xfail(strict=False, reason=(
    "failed once in a clean-clone CI run (2 workers), not diagnosed"))
def test_agent_disk_full_mid_drain(bare_fleet: Fleet) -> None:
    """The devices' disk fills up while van-1's sync process applies the server's acks
    and van-2's applies the deltas: a local write is refused as storage_full, status says
    the disk is full, no sync process gives up; once there is room every increment is
    applied once and both devices converge."""
    fleet = bare_fleet
    with small_disk(fleet.data_dir, "24m") as mnt:
        fleet.start()
        devs = ("van-1", "van-2")
        seed(fleet, devs)
        backlog = 150
        write_backlog(fleet, ("van-1",), backlog)
        fill_disk(mnt / "filler")
        left = fleet.pending("van-1")
        print(f"\ndevice disk full with {left} changes pending")
        assert left > 0, "the drain had finished: the disk filled too late"
        with pytest.raises(StorageFullError):
            for _ in range(1000):   # until the free pages LMDB had in its file are used
                fleet.agent("van-2").increment("inventory", KEY, "stock", 1)
        written = fleet.pending("van-2")
        for dev in devs:
            st = fleet.agent_status(dev)
            print(f"{dev}: {st['summary']}")
            assert "disk" in st["summary"], st
        fleet.wait(lambda: (fleet.value("inventory", KEY, "stock") is not None
                   and fleet.scope_seq(SCOPE) > 1 + backlog // 2) or None, 30,
                   what="the server applying van-1's changes meanwhile")
        (mnt / "filler").unlink()
        assert_exactly_once(fleet, devs, backlog + written)
        for dev in devs:
            assert fleet.agents[dev].running
        fleet.close()


# ------------------------------------------------------------------- app - agent


def _api(fleet: Fleet, dev: str) -> tuple[int, str]:
    """Give `dev` a loopback API port and an app token: (port, token)."""
    port = free_port()
    fleet.edit_agent_config(dev, lambda d: d.update(api={"tcp_port": port}))
    out = fleet.cli("agent", "token", "add", "kiosk", "--write", "*", "--config",
                    str(fleet.agent_config_path(dev)))
    return port, out.stdout.splitlines()[0]


def _txn_request(token: str, key: str) -> bytes:
    """POST /v1/txn moving one unit of stock from bin-a to bin-b, with `key`."""
    body = orjson.dumps({"ops": [
        {"op": "increment", "collection": "inventory", "key": "bin-a", "field": "stock",
         "amount": -1},
        {"op": "increment", "collection": "inventory", "key": "bin-b", "field": "stock",
         "amount": 1}]})
    head = (f"POST /v1/txn HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nIdempotency-Key: {key}\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def _cut(port: int, data: bytes) -> None:
    """Send `data` and reset the connection at once, reading nothing (an app killed or
    its link cut mid-request)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(data)
    sock.close()


def _send(port: int, data: bytes) -> tuple[int, bytes]:
    """Send `data` and read the whole answer: (status, raw answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_app_connection_cut_mid_transaction(fleet: Fleet) -> None:
    """The app's connection to the local API is reset mid-request (half a body) or right
    after the request (the answer never read), while the sync process drains: the app
    sends again with its Idempotency-Key; each transaction moves the stock once, on the
    device and on the server, and the API keeps serving."""
    for dev in ("van-1", "van-2"):
        fleet.add_device(dev, [SCOPE])
    port, token = _api(fleet, "van-1")
    ag = fleet.agent("van-1")
    moves = 40
    for k in ("bin-a", "bin-b"):
        ag.put("inventory", k, {"depot": SCOPE, "sku": k})
    ag.increment("inventory", "bin-a", "stock", moves)   # stock may not go below zero
    fleet.start_agents("van-1", "van-2")
    for i in range(moves):
        request = _txn_request(token, f"move-{i}")
        _cut(port, request[:len(request) - 7] if i % 2 else request)
        status, answer = _send(port, request)   # the app's retry, same key
        assert status in (200, 202), answer
    status, answer = _send(port, _txn_request(token, "move-0"))
    assert status == 202 and b"Idempotent-Replayed: true" in answer, answer
    assert ag.get("inventory", "bin-b").fields["stock"] == moves  # type: ignore[union-attr]
    fleet.wait_drained("van-1")
    assert fleet.value("inventory", "bin-a", "stock") == 0
    assert fleet.value("inventory", "bin-b", "stock") == moves
    assert fleet.scope_seq(SCOPE) == 3 + 2 * moves
    assert ag.dead_letters() == []
    fleet.wait_converged("van-1", "van-2", timeout=30)


# ------------------------------------------------------- agent: sync process alone


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
def test_sync_process_killed_between_publish_and_ack(fleet: Fleet) -> None:
    """Only the agent's sync process is SIGKILLed mid-drain (changes published, their
    acks not yet applied) while the app keeps writing: the service restarts it and every
    increment is applied once."""
    devs = ("van-1",)
    fleet.add_device("van-1", [SCOPE], sync=THROTTLED)
    ag = fleet.agent("van-1")
    ag.put("inventory", KEY, {"depot": SCOPE, "sku": KEY})
    backlog, live = 150, 30
    for _ in range(backlog):
        ag.increment("inventory", KEY, "stock", 1)
    proc = fleet.start_agent("van-1", wait=False)
    first = proc.wait_event("sync_process_started")["pid"]
    fleet.wait(lambda: fleet.scope_seq(SCOPE) > 1 + backlog // 10 or None, 30,
               what="the drain under way", interval=0.005)
    os.kill(first, signal.SIGKILL)
    left = fleet.pending("van-1")
    print(f"\nkilled the sync process with {left} changes pending")
    assert left > 0, "the drain had finished: the kill was not mid-stream"
    for _ in range(live):
        ag.increment("inventory", KEY, "stock", 1)
    proc.wait_event("sync_process_started", where=lambda e: e["pid"] != first)
    assert_exactly_once(fleet, devs, backlog + live)


# ------------------------------------------- server - PostgreSQL: a silent link


@pytest.mark.postgres
@pytest.mark.xfail(strict=False, reason=(
    "not diagnosed: in one clean-clone CI run (2 workers) the server, after the link "
    "healed, kept failing to reconnect ('server closed the connection unexpectedly'), "
    "the devices had 280 changes left after 60 s, and the server then ignored SIGTERM "
    "for 20 s; it passed in the other runs"))
def test_postgres_link_silent_mid_transaction(tmp_path: Path, pg_database: str) -> None:
    """The merge server (in a network namespace of its own) reaches PostgreSQL and the
    broker through two veth paths; the PostgreSQL one goes silent (packets vanish, no
    reset) mid-drain, so commits in flight end with their outcome unknown to the server.
    It notices within its TCP bound, says so, keeps running; healed, every increment is
    applied once (a commit whose answer was lost is not applied again on the resend)."""
    reason = silent_link_unavailable()
    if reason is not None:
        pytest.skip(reason)
    url = pg_database
    parts = urlsplit(url)
    assert parts.port is not None
    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(Fleet(tmp_path, "embedded", "postgres", url))
        to_pg = stack.enter_context(SilentLink(parts.port))
        to_broker = stack.enter_context(SilentLink(fleet.port, namespace=to_pg.namespace))
        fleet.start(server=False)
        user = parts.netloc.rsplit("@", 1)[0]
        # The product's bound on unacknowledged data (25 s) lowered to 2 s, through the
        # URL as an operator would.
        through = urlunsplit(parts._replace(netloc=f"{user}@{to_pg.address}:{to_pg.port}",
                                            query="tcp_user_timeout=2000"))
        fleet.server.argv = ["ip", "netns", "exec", to_pg.namespace, *fleet.server.argv]
        fleet.start_server(env={"WAYSTATION_SERVER__STORE__URL": json.dumps(through),
                                "WAYSTATION_SERVER__STORE__RECONNECT_S": "3",
                                "WAYSTATION_SERVER__MQTT__HOST": json.dumps(to_broker.address),
                                "WAYSTATION_SERVER__MQTT__PORT": str(to_broker.port)})
        stack.callback(fleet.stop_server)   # before the links go
        devs = ("van-1", "van-2")
        seed(fleet, devs)
        writes = 150
        write_backlog(fleet, devs, writes)
        to_pg.cut()
        left = sum(fleet.pending(dev) for dev in devs)
        print(f"\nthe link to postgres went silent with {left} changes pending")
        assert left > 0, "the drain had finished: the cut was not mid-stream"
        fleet.server.wait_event("store_failed", timeout=40)
        assert fleet.server.running, fleet.server.log_tail()
        for dev in devs:
            assert fleet.agent(dev).dead_letters() == []
        to_pg.heal()
        assert_exactly_once(fleet, devs, 2 * writes)
        assert fleet.server.running


# ------------------------------------------------------- agent frozen (device asleep)


@pytest.mark.parametrize("fleet_kind", [("embedded", "lmdb")], ids=["embedded-lmdb"])
@pytest.mark.xfail(strict=False, reason=(
    "not diagnosed: in a clean-clone CI run with 3 workers the store's pending count went "
    "150 -> 130 while the whole agent was frozen (SIGSTOP of the service and its sync "
    "process); passes with 2 workers"))
def test_agent_frozen_mid_drain(fleet: Fleet) -> None:
    """The whole agent (service and sync process) stopped dead mid-drain for longer
    than its keepalive, as a device put to sleep: the server sees it go offline, `agent
    status` (read from the store beside it) does not call it online; woken, it
    reconnects and every increment is applied once."""
    devs = ("van-1", "van-2")
    for dev in devs:
        fleet.add_device(dev, [SCOPE], sync=THROTTLED)
        fast_keepalive(fleet, dev)
    fleet.agent("van-1").put("inventory", KEY, {"depot": SCOPE, "sku": KEY})
    fleet.start_agents(*devs)
    fleet.wait_converged(*devs, timeout=30)
    backlog = 150
    write_backlog(fleet, ("van-1",), backlog)
    proc = fleet.agents["van-1"]
    with frozen(process_tree(proc.pid)):
        left = fleet.pending("van-1")
        assert left > 0, "the drain had finished: the freeze was not mid-stream"
        fleet.wait(lambda: _server_device(fleet, "van-1")["online"] is False or None,
                   30, what="the server sees the frozen device offline")
        st = fleet.wait_agent_status("van-1", lambda s: not s["online"], 30,
                                     what="agent status stops calling it online")
        print(f"\nagent frozen with {left} changes pending: {st['summary']}")
        assert st["pending"] == left, st
    assert_exactly_once(fleet, devs, backlog)
    fleet.wait(lambda: _server_device(fleet, "van-1")["online"] or None, 30,
               what="the server sees it online again")


def _server_device(fleet: Fleet, dev: str) -> dict[str, Any]:
    rows = json.loads(fleet.cli("server", "devices", "--json", "--config",
                                str(fleet.server_config)).stdout)
    row: dict[str, Any] = next(r for r in rows if r["id"] == dev)
    return row
