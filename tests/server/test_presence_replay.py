"""A restarted server rebuilds presence from the statuses the broker replays on subscribe
before it merges any change (`broker.server.intake.fair`, `MergeServer.__init__`).

The failure this pins down (tests/e2e/test_crashes.py, a quiet device online through a
server restart, Mosquitto with a shared subscription, so no kept session): the server
forgot presence ("connected"), the broker replayed van-2's retained status then van-1's,
van-2 (which held its change while the server was down) sent its hello and change at
the announcement, and the worker, slowed by load, took all of it in one group.
Round robin served van-2's turn (its status, hello, change) before van-1's status, so
the change was merged with van-1 believed offline: no delta, and van-1, online
throughout, learned of the change only at its next reconnect or gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.server.daemon import MergeServer
from broker.server.intake import FairQueue, IntakeLimits, Verdict
from broker.server.registry import add_device
from tests.server.conftest import StoreFactory
from tests.server.helpers import CATALOG, T0, by_device, changes, hello, of_type, status, task
from waystation.config import ServerConfig

LIMITS = IntakeLimits(max_bytes=12_000, device_bytes=4_000, max_payload=1_000, quantum=300)
DEVICES = ["van-1", "van-2", "van-3"]


@dataclass(frozen=True)
class Offer:
    device: str
    size: int
    kind: str
    retained: bool


offers = st.builds(Offer, st.sampled_from(DEVICES), st.integers(8, 1_200),
                   st.sampled_from(["up", "up", "status"]), st.booleans())
script = st.lists(st.one_of(offers, offers, st.integers(1, 6)), max_size=200)


def _order(queue: FairQueue) -> list[tuple[str, str, bytes]]:
    return [(i.kind, i.device, i.payload) for i in queue]


def test_replayed_statuses_go_before_device_messages_in_arrival_order() -> None:
    """Each replayed status is served before every device message that arrived after it
    (and, like control items, before those that arrived before it)."""
    q = FairQueue(LIMITS)
    assert q.offer("status", "van-2", b"s2", retained=True) is Verdict.QUEUED
    assert q.offer("up", "van-2", b"hello") is Verdict.QUEUED
    assert q.offer("up", "van-2", b"change") is Verdict.QUEUED
    assert q.offer("status", "van-1", b"s1", retained=True) is Verdict.QUEUED
    assert q.offer("status", "van-3", b"live") is Verdict.QUEUED  # live: a device's turn
    assert _order(q) == [("status", "van-2", b"s2"), ("status", "van-1", b"s1"),
                         ("up", "van-2", b"hello"), ("status", "van-3", b"live"),
                         ("up", "van-2", b"change")]
    assert q.queued_bytes == 0 and len(q) == 0


@given(script)
@settings(max_examples=300, deadline=None)
def test_no_message_overtakes_a_replayed_status_that_came_before_it(
        ops: list[Offer | int]) -> None:
    """Whatever arrives: a replayed status is served before everything offered after it;
    each device's statuses keep their order (those a later replay superseded are not
    served), as do its other messages; every accepted item is served or superseded;
    the global bound holds."""
    q = FairQueue(LIMITS)
    offered: dict[int, Offer] = {}
    accepted: list[int] = []
    superseded: set[int] = set()
    served: list[int] = []
    for tag, op in enumerate(ops):
        if isinstance(op, int):
            served += [int.from_bytes(i.payload[:8], "big") for i in q.take(op, 1 << 30)]
            continue
        replay = op.retained and op.kind == "status"
        verdict = q.offer(op.kind, op.device, tag.to_bytes(8, "big") + b"x" * (op.size - 8),
                          retained=op.retained)
        if verdict in (Verdict.QUEUED, Verdict.REFUSED):
            if replay:
                superseded |= {t for t in accepted if t not in served and t not in superseded
                               and offered[t].device == op.device
                               and offered[t].kind == "status"
                               and not offered[t].retained}  # (replays: kept, in order)
            offered[tag] = op
            accepted.append(tag)
        assert q.queued_bytes <= LIMITS.max_bytes
    served += [int.from_bytes(i.payload[:8], "big") for i in q]
    assert sorted(served) == sorted(set(accepted) - superseded)
    position = {t: i for i, t in enumerate(served)}
    for t in served:
        op = offered[t]
        if op.retained and op.kind == "status":
            assert all(position[t] < position[later] for later in served if later > t)
    for dev in DEVICES:
        for statuses in (True, False):
            mine = [t for t in served if offered[t].device == dev
                    and (offered[t].kind == "status") is statuses]
            assert mine == sorted(mine)


def test_one_take_serves_the_replay_then_one_round_of_devices() -> None:
    """A worker's group: the replay first, then the one round of devices the same
    messages would get without it."""
    ups = [("van-2", b"x" * 200 + bytes([n])) for n in range(3)] + [("van-1", b"hello")]
    q, plain = FairQueue(LIMITS), FairQueue(LIMITS)
    q.offer_control("connected")
    q.offer("status", "van-2", b"s2", retained=True)
    q.offer("status", "van-1", b"s1", retained=True)
    for dev, payload in ups:
        q.offer("up", dev, payload)
        plain.offer("up", dev, payload)
    group = q.take(100, 1 << 20, rounds=1)
    assert [(i.kind, i.device) for i in group[:3]] == [
        ("connected", ""), ("status", "van-2"), ("status", "van-1")]
    assert [i.payload for i in group[3:]] == [
        i.payload for i in plain.take(100, 1 << 20, rounds=1)]
    assert [i.payload for i in q] == [i.payload for i in plain]


def test_a_replayed_status_supersedes_the_device_s_queued_ones() -> None:
    """Statuses still queued when the broker replays the retained one are older than it:
    dropped (never applied after it), with their bytes; the device's changes stay."""
    q = FairQueue(LIMITS)
    q.offer("status", "van-1", b"old-off")
    q.offer("up", "van-1", b"change")
    q.offer("status", "van-1", b"old-on")
    q.offer("status", "van-2", b"only-status")
    q.offer("status", "van-1", b"latest", retained=True)
    q.offer("status", "van-2", b"latest-2", retained=True)
    assert q.devices() == 1  # van-2's flow held nothing else: gone from the ring
    assert _order(q) == [("status", "van-1", b"latest"), ("status", "van-2", b"latest-2"),
                         ("up", "van-1", b"change")]
    assert q.queued_bytes == 0 and len(q) == 0


def test_replayed_statuses_count_against_the_global_bound() -> None:
    q = FairQueue(LIMITS)
    while q.offer("up", f"d{q.devices()}", b"x" * 900) is Verdict.QUEUED:
        pass
    assert q.offer("status", "van-1", b"s" * 900, retained=True) is Verdict.FULL
    q.pop()
    assert q.offer("status", "van-1", b"s" * 900, retained=True) is Verdict.QUEUED
    assert q.pop() is not None and q.queued_bytes <= LIMITS.max_bytes


def test_a_device_online_through_a_restart_gets_the_delta_of_a_change_that_followed(
        tmp_path: Path, store_factory: StoreFactory) -> None:
    """Through the daemon (intake, then worker): a new connection without a session
    forgets presence; the broker replays van-2's status then van-1's; van-2's hello and
    change follow; the worker, late, takes it all as one group. van-1 gets the delta."""
    store = store_factory()
    for dev in ("van-1", "van-2"):
        add_device(store, dev, ["r1"], T0)
    cfg = ServerConfig.model_validate({"data_dir": str(tmp_path), "mqtt": {"password": "x"}})
    server = MergeServer(cfg, CATALOG, env={}, store=store)
    try:
        # The replay must come ahead of every change on the connection: the broker sends
        # it when it takes the status subscription, so that is subscribed first.
        assert list(server.link._subs) == [server.status_filter, server.up_filter]
        sent: list[tuple[str, bytes]] = []
        server.link.publish = lambda topic, payload, qos=1, retain=False: (  # type: ignore[method-assign]
            sent.append((topic.split("/")[1], payload)) or True)
        server._on_connect(False)  # Mosquitto, shared subscription: no session kept
        p = server.prefix
        server._on_retained(f"{p}/van-2/status", status("van-2"))
        server._on_retained(f"{p}/van-1/status", status("van-1"))
        server._on_message(f"{p}/van-2/up", hello("van-2"))
        server._on_message(f"{p}/van-2/up", changes("van-2", [task(1, "t1", status="loaded")]))
        server._on_message(f"{p}/van-1/up", hello("van-1"))
        group = server.intake.take(1.0, max_items=2000, max_bytes=1 << 20)
        assert group is not None and len(group) == 6
        sent.clear()  # (the announcement)
        server._process(group)
        out = by_device(sent)
        assert server.engine.presence.online() == {"van-1", "van-2"}
        deltas = of_type(out.get("van-1", []), "delta")
        assert [r["k"] for d in deltas for r in d["d"]] == ["t1"], out
    finally:
        server.store.close()
