"""A device the server counted offline while its connection stayed up gets, once it is
back online and has not asked for a catch-up itself, a delta that shows it the gap
(`broker.server.missed`, PROTOCOL.md §7.6)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from broker.server.daemon import MergeServer
from broker.server.engine import Engine
from broker.server.fanout import Fanout
from broker.server.missed import GRACE_MS, MissedDeltas
from broker.server.periodic import drain_notices
from broker.server.registry import add_device, issue_command, set_enabled
from broker.server.store.base import Notice, Store
from broker.server.store.lmdb_store import LmdbStore
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    CATALOG,
    T0,
    FakeTime,
    by_device,
    catchup,
    changes,
    hello,
    make_engine,
    of_type,
    oks,
    status,
    task,
)
from waystation.config import ServerConfig


def delta_recs(out: list[tuple[str, bytes]], dev: str) -> list[dict[str, Any]]:
    return [rec for m in of_type(by_device(out).get(dev, []), "delta") for rec in m["d"]]


def fleet(tmp: Path, store: Store | None = None) -> tuple[Engine, FakeTime]:
    engine, _, now = make_engine(tmp, {"van-1": ["r1"], "van-2": ["r1", "r2"]}, store=store)
    for dev in ("van-1", "van-2"):  # connected as a device does (§9.2)
        engine.handle_status(dev, status(dev))
        engine.handle_up(dev, hello(dev))
        engine.handle_up(dev, catchup(dev, {"r1": 0}))
    return engine, now


def write(engine: Engine, n: int, key: str, scope: str = "r1") -> int:
    """van-2 writes; returns the change's sequence."""
    acked = oks(by_device(engine.handle_up("van-2", changes("van-2", [task(n, key, scope)])))
                ["van-2"])
    return int(acked[0][2])


def test_back_online_without_asking_gets_the_scope_s_last_record(
        tmp_path: Path, store_factory: StoreFactory) -> None:
    engine, now = fleet(tmp_path, store_factory())
    q0 = write(engine, 1, "seen")
    engine.handle_status("van-1", status("van-1", on=False))  # a stale will, say
    write(engine, 2, "missed-1")
    q2 = write(engine, 3, "missed-2")
    assert q2 == q0 + 2
    assert engine.handle_status("van-1", status("van-1")) == []
    now.now += GRACE_MS - 1
    assert delta_recs(engine.tick(), "van-1") == []  # it may still send hello
    now.now += 1
    recs = delta_recs(engine.tick(), "van-1")
    # The last record: van-1 (checkpoint q0) sees q0 + 2 without q0 + 1, a gap (§9.4).
    assert [(r["k"], r["q"]) for r in recs] == [("missed-2", q2)]
    assert recs[0].get("part", False) is False  # the whole record: idempotent to apply
    now.now += GRACE_MS
    assert delta_recs(engine.tick(), "van-1") == []  # once
    assert engine.counters["missed_nudges"] == 1


def test_the_grace_is_the_operator_s_setting(tmp_path: Path) -> None:
    engine, _, now = make_engine(tmp_path, {"van-1": ["r1"], "van-2": ["r1"]},
                                 missed_grace_ms=2500)
    for dev in ("van-1", "van-2"):
        engine.handle_status(dev, status(dev))
    engine.handle_status("van-1", status("van-1", on=False))
    write(engine, 1, "missed")
    engine.handle_status("van-1", status("van-1"))
    now.now += 2499
    assert delta_recs(engine.tick(), "van-1") == []
    now.now += 1
    assert [r["k"] for r in delta_recs(engine.tick(), "van-1")] == ["missed"]


def test_a_newer_version_of_the_scope_is_sent_when_the_record_moved_on(
        tmp_path: Path) -> None:
    engine, now = fleet(tmp_path)
    engine.handle_status("van-1", status("van-1", on=False))
    write(engine, 1, "a")
    engine.handle_status("van-1", status("van-1"))
    q = write(engine, 2, "a")  # delta sent live; `a` moved to q
    now.now += GRACE_MS
    assert [(r["k"], r["q"]) for r in delta_recs(engine.tick(), "van-1")] == [("a", q)]


def test_a_device_that_reconnects_is_not_nudged(tmp_path: Path) -> None:
    """A reconnect's catch-up brings what it missed. A hello alone does not (a device
    sends one after each command, to report it done)."""
    engine, now = fleet(tmp_path)
    engine.handle_status("van-1", status("van-1", on=False))
    write(engine, 1, "a")
    engine.handle_status("van-1", status("van-1"))
    engine.handle_up("van-1", hello("van-1"))
    engine.handle_up("van-1", catchup("van-1", {"r1": 0}))
    now.now += GRACE_MS
    assert delta_recs(engine.tick(), "van-1") == []
    engine.handle_status("van-1", status("van-1", on=False))
    write(engine, 2, "b")
    engine.handle_status("van-1", status("van-1"))
    engine.handle_up("van-1", hello("van-1"))
    now.now += GRACE_MS
    assert [r["k"] for r in delta_recs(engine.tick(), "van-1")] == ["b"]


def test_a_device_enabled_again_while_online_is_nudged(tmp_path: Path) -> None:
    """Disabled, a device gets no deltas, online or not; enabled again while online it
    gets a `sync` command and answers with a hello, not a catch-up."""
    engine, now = fleet(tmp_path)
    set_enabled(engine.store, "van-1", False)
    engine.tick()
    write(engine, 1, "a")
    engine.handle_status("van-1", status("van-1", on=False))  # flapping while disabled
    engine.handle_status("van-1", status("van-1"))
    now.now += GRACE_MS
    assert delta_recs(engine.tick(), "van-1") == []  # disabled: no data
    set_enabled(engine.store, "van-1", True)
    assert delta_recs(engine.tick(), "van-1") == []
    engine.handle_up("van-1", hello("van-1"))
    now.now += GRACE_MS
    assert [r["k"] for r in delta_recs(engine.tick(), "van-1")] == ["a"]


def test_nothing_missed_nothing_sent(tmp_path: Path) -> None:
    """Nothing changed, or only in a scope the device does not follow."""
    engine, now = fleet(tmp_path)
    write(engine, 1, "a")
    engine.handle_status("van-1", status("van-1", on=False))
    write(engine, 2, "elsewhere", "r2")
    engine.handle_status("van-1", status("van-1"))
    now.now += GRACE_MS
    assert delta_recs(engine.tick(), "van-1") == []


def test_offline_again_or_disabled_is_not_nudged(tmp_path: Path) -> None:
    engine, now = fleet(tmp_path)
    engine.handle_status("van-1", status("van-1", on=False))
    write(engine, 1, "a")
    engine.handle_status("van-1", status("van-1"))
    engine.handle_status("van-1", status("van-1", on=False))
    now.now += GRACE_MS
    assert delta_recs(engine.tick(), "van-1") == []
    # Still counted from when it first went offline: the change above is owed.
    engine.handle_status("van-1", status("van-1"))
    now.now += GRACE_MS
    assert [r["k"] for r in delta_recs(engine.tick(), "van-1")] == ["a"]
    engine.handle_status("van-1", status("van-1", on=False))
    write(engine, 2, "b")
    engine.handle_status("van-1", status("van-1"))
    set_enabled(engine.store, "van-1", False)
    now.now += GRACE_MS
    assert delta_recs(engine.tick(), "van-1") == []


def test_a_device_offline_when_the_server_started_is_covered(tmp_path: Path) -> None:
    engine, now = fleet(tmp_path)
    engine.handle_status("van-1", status("van-1", on=False))
    engine.tick()  # presence written to the store
    engine.flush(stopping=True)
    restarted = Engine(engine.store, engine.catalog, engine.config, now)
    assert not restarted.is_online("van-1")
    write(restarted, 1, "a")
    restarted.handle_status("van-1", status("van-1"))
    now.now += GRACE_MS
    assert [r["k"] for r in delta_recs(restarted.tick(), "van-1")] == ["a"]


def test_operator_writes_count_as_changes(tmp_path: Path) -> None:
    engine, _ = fleet(tmp_path)
    seen: list[tuple[str, int]] = []
    engine.store.transact(lambda txn: txn.add_notice(Notice(0, "r1", 7, {"c": "tasks"})))
    fan = Fanout(engine.registry, engine.presence)
    assert drain_notices(engine.store, fan, applied=lambda s, q: seen.append((s, q))) == 1
    assert seen == [("r1", 7)]


# ------------------------------------------------------------------ the bookkeeping alone

events = st.lists(st.one_of(
    st.tuples(st.just("applied"), st.sampled_from(["r1", "r2"])),
    st.tuples(st.sampled_from(["offline", "online", "asked"]), st.just("van-1")),
    st.tuples(st.just("wait"), st.integers(0, 2 * GRACE_MS))), max_size=30)


@given(events)
def test_a_nudge_comes_exactly_when_a_device_back_online_missed_a_change(
        script: list[tuple[str, Any]]) -> None:
    """Model: van-1 is owed a nudge iff it is online, came back from offline more than
    the grace ago without asking since, and some change was applied to a scope it
    follows after it first went offline (since it was last nudged or asked)."""
    missed = MissedDeltas()
    now = 0
    online, away_since, back_at, count = True, None, None, 0
    last: dict[str, int] = {}
    for op, arg in script:
        if op == "applied":
            count += 1
            last[arg] = count
            missed.applied(arg, count)
        elif op == "offline":
            missed.offline(arg)
            if back_at is not None:
                away_since = back_at[1]
            elif away_since is None:
                away_since = count
            online, back_at = False, None
        elif op == "online":
            missed.online(arg, now)
            if not online and away_since is not None:
                back_at = (now + GRACE_MS, away_since)
                away_since = None
            online = True
        elif op == "asked":
            missed.asked(arg)
            back_at = None
            if away_since is not None:
                away_since = count
        else:
            now += arg
        nudges = missed.due(now, lambda dev: ["r1"])
        expect = []
        if back_at is not None and back_at[0] <= now:
            if last.get("r1", 0) > back_at[1]:
                expect = [("r1", last["r1"])]
            back_at = None
        assert [n.scopes for n in nudges] == ([tuple(expect)] if expect else [])


# ------------------------------------------------------------------ messages not published


def test_a_delta_the_server_could_not_publish_is_shown_later(tmp_path: Path) -> None:
    """The broker link dropped as the delta was to go out (the daemon's publish refused
    it): van-1, online all along, is shown the gap once the link is back."""
    engine, now = fleet(tmp_path)
    out = engine.handle_up("van-2", changes("van-2", [task(1, "a")]))
    assert [r["k"] for r in delta_recs(out, "van-1")] == ["a"]
    engine.undelivered("van-1")  # what the daemon does when link.publish refuses it
    engine.heartbeat.broker(False, now())
    now.now += GRACE_MS
    assert delta_recs(engine.tick(), "van-1") == []  # not while the link is down
    engine.reset_presence()  # resubscribed: the statuses replayed
    for dev in ("van-1", "van-2"):
        engine.handle_status(dev, status(dev))
    engine.heartbeat.broker(True, now())
    now.now += GRACE_MS
    assert [r["k"] for r in delta_recs(engine.tick(), "van-1")] == ["a"]
    now.now += GRACE_MS
    assert delta_recs(engine.tick(), "van-1") == []


def test_a_command_the_server_could_not_publish_is_sent_again(tmp_path: Path) -> None:
    engine, now = fleet(tmp_path)
    cmd = issue_command(engine.store, "van-1", "ping", now())
    sent = [m for m in by_device(engine.tick()).get("van-1", []) if m["type"] == "command"]
    assert [m["id"] for m in sent] == [cmd.id]
    assert by_device(engine.tick()).get("van-1", []) == []  # sent once
    engine.undelivered("van-1")
    again = [m for m in by_device(engine.tick()).get("van-1", []) if m["type"] == "command"]
    assert [m["id"] for m in again] == [cmd.id]


def test_undelivered_keeps_the_earliest_change_owed() -> None:
    missed = MissedDeltas()
    missed.applied("r1", 1)
    since = missed.count
    missed.applied("r1", 2)
    missed.undelivered("van-1", since - 1, 0)  # the group of change 1
    missed.undelivered("van-1", since, 0)
    assert [n.scopes for n in missed.due(GRACE_MS, lambda dev: ["r1"])] == [(("r1", 2),)]
    missed.offline("van-2")
    missed.applied("r2", 5)
    missed.undelivered("van-2", 0, 0)  # counted offline: shown when back
    assert missed.due(10 * GRACE_MS, lambda dev: ["r2"]) == []
    missed.online("van-2", 10 * GRACE_MS)
    assert [n.dev for n in missed.due(11 * GRACE_MS, lambda dev: ["r2"])] == ["van-2"]


def test_the_daemon_reports_what_its_link_refused(tmp_path: Path) -> None:
    """The merge server's publish with no broker connection (nothing queued) tells the
    engine which devices lost a message."""
    store = LmdbStore(tmp_path / "store")
    add_device(store, "van-1", ["r1"], T0)
    add_device(store, "van-2", ["r1"], T0)
    cfg = ServerConfig.model_validate({"data_dir": str(tmp_path), "mqtt": {"password": "x"}})
    server = MergeServer(cfg, CATALOG, env={}, store=store)
    server.engine.handle_status("van-1", status("van-1"))
    server.engine.handle_up("van-1", catchup("van-1", {"r1": 0}))
    out = server._handle([("van-2", changes("van-2", [task(1, "a")]))])
    assert {dev for dev, _ in out} == {"van-1", "van-2"}
    assert server.engine.missed.waiting() == 0
    server._publish(out)  # never connected: link.publish refuses every message
    assert server.messages_out == 0
    assert server.engine.missed.waiting() == 1  # van-1's delta (van-2 is offline)


def test_a_server_reconnect_alone_nudges_no_one(tmp_path: Path) -> None:
    """Resubscribed after its broker link came back, the server rebuilds presence from
    the replayed statuses: a device online through it missed nothing the link did not
    refuse (the whole fleet would otherwise be nudged after every reconnect)."""
    engine, now = fleet(tmp_path)
    engine.reset_presence()
    write(engine, 1, "a")  # applied before the replay reached van-1's status
    for dev in ("van-1", "van-2"):
        engine.handle_status(dev, status(dev))
    now.now += GRACE_MS
    assert delta_recs(engine.tick(), "van-1") == []


def test_nudges_are_spread_over_ticks_by_their_scopes() -> None:
    missed = MissedDeltas()
    for dev in ("van-1", "van-2", "van-3"):
        missed.offline(dev)
    missed.applied("r1", 1)
    missed.applied("r2", 2)
    for dev in ("van-1", "van-2", "van-3"):
        missed.online(dev, 0)

    def both(dev: str) -> list[str]:
        return ["r1", "r2"]

    first = missed.due(GRACE_MS, both, budget=3)
    assert [n.dev for n in first] == ["van-1", "van-2"]  # 4 scopes: the budget is passed
    assert missed.waiting() == 1
    assert [n.dev for n in missed.due(GRACE_MS, both, budget=3)] == ["van-3"]
    assert missed.waiting() == 0
