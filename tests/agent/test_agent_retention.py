"""Retention on the device with a real LMDB store: eviction, markers, fetch, quota."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import evict, fetching
from agent.api import Agent
from agent.errors import BadRequest, QuotaReached
from agent.store import record_key
from schemas import wire
from schemas.collection import Catalog
from tests.agent.agentkit import FakeClock, assert_views_consistent, make_cfg, rec

S = "route-42"
DAY = 86_400
DONE = {"route": S, "status": "delivered", "eta": 5}


def _synced(agent: Agent, key: str, q: int, fields: dict[str, Any] | None = None) -> None:
    agent.sync.apply_delta(wire.Delta(d=[rec(key, q, fields or DONE)]))


def _kinds(agent: Agent, since: int = 0) -> list[tuple[str, str]]:
    return [(e.key, e.kind) for e in agent.feed_after(since)]


def _run(agent: Agent, **kw: Any) -> int:
    return evict.run_pass(agent.sync.core, **kw)


def test_delivered_tasks_go_seven_days_after_sync(agent: Agent, clock: FakeClock) -> None:
    """Only records of the declared kind, only once `after` has passed since they last
    synced; the views, the indexes and the feed agree."""
    _synced(agent, "t-done", 1)
    _synced(agent, "t-out", 2, {"route": S, "status": "out", "eta": 6})
    _synced(agent, "i-1", 3, {"vehicle": "v", "checked_at": 1})  # no retention
    clock.advance(6 * DAY)
    assert _run(agent) == 0
    assert agent.get("tasks", "t-done") is not None
    clock.advance(DAY)
    mark = agent.feed_position()
    assert _run(agent) == 1
    assert agent.get("tasks", "t-done") is None
    assert agent.get("tasks", "t-out") is not None
    assert agent.query("tasks", where={"status": "delivered"}, order_by="eta").records == []
    assert [r.key for r in agent.query("tasks", where={"route": S}, order_by="eta").records] \
        == ["t-out"]
    assert agent.count("tasks", where={"status": "delivered"}) == 0
    assert ("t-done", "evicted") in _kinds(agent, mark)
    assert agent.status().evicted == 1
    assert_views_consistent(agent)


def test_a_later_sync_restarts_the_clock(agent: Agent, clock: FakeClock) -> None:
    """"After sync" counts from the last time the server told the device of it."""
    _synced(agent, "t-1", 1)
    clock.advance(5 * DAY)
    _synced(agent, "t-1", 2, {**DONE, "notes": "signed"})
    clock.advance(5 * DAY)
    assert _run(agent) == 0
    clock.advance(2 * DAY)
    assert _run(agent) == 1


def test_pending_writes_and_open_conflicts_are_never_evicted(agent: Agent,
                                                             clock: FakeClock) -> None:
    """A record with a change in the outbox or an open manual conflict stays, however
    old and whatever the quota says."""
    _synced(agent, "t-pend", 1)
    agent.put("tasks", "t-pend", {"notes": "left at door"})
    _synced(agent, "t-conf", 2, {**DONE, "address": "a"})
    agent.sync.apply_delta(wire.Delta(d=[rec("t-conf", 3, {"address": "a"}, part=True, cf={
        "address": [{"v": "b", "by": "van-9", "h": "0190000000050000:van-9"}]})]))
    assert agent.status().open_conflicts == 1
    clock.advance(30 * DAY)
    assert _run(agent, pressure=True) == 0
    assert agent.get("tasks", "t-pend") is not None
    assert agent.get("tasks", "t-conf") is not None
    # Once acked, the pending record goes like any other.
    agent.sync.apply_ack(wire.Ack(ok=[(1, S, 4)]))
    clock.advance(8 * DAY)
    assert _run(agent) == 1
    assert agent.get("tasks", "t-pend") is None


def test_work_per_transaction_is_bounded(agent: Agent, clock: FakeClock) -> None:
    """A step examines at most `batch` records and the pass resumes where it stopped."""
    for i in range(7):
        _synced(agent, f"t-{i}", i + 1)
    clock.advance(8 * DAY)
    core = agent.sync.core
    steps = []
    while True:
        result = evict.step(core, batch=3)
        steps.append((result.examined, result.evicted, result.finished))
        if result.finished:
            break
    assert steps == [(3, 3, False), (3, 3, False), (1, 1, True)]
    assert agent.status().evicted == 7


def test_an_evicted_record_is_not_recreated_stale(agent: Agent, clock: FakeClock) -> None:
    """A re-sent delta, a catch-up page or a partial state of an evicted record leaves it
    evicted; a whole newer state (the record changed on the server) brings it back."""
    _synced(agent, "t-1", 5)
    clock.advance(8 * DAY)
    assert _run(agent) == 1
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 5, DONE)]))
    agent.sync.apply_page(wire.Page.model_validate(
        {"req": "c-1", "s": S, "from": 0, "to": 5, "reset": True, "recs": [rec("t-1", 5, DONE)]}))
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 6, {"notes": "x"}, part=True)]))
    agent.sync.apply_ack(wire.Ack(ok=[], fx=[rec("t-1", 6, {"notes": "x"}, part=True)]))
    assert agent.get("tasks", "t-1") is None
    assert agent.status().evicted == 1
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 7, {**DONE, "status": "failed"})]))
    back = agent.get("tasks", "t-1")
    assert back is not None and back.fields["status"] == "failed" and back.version == 7
    assert agent.status().evicted == 0
    assert_views_consistent(agent)


def test_fetched_answer_brings_records_back(agent: Agent, clock: FakeClock) -> None:
    """A `fetched` answer restores evicted records whole and empties the queue; a key
    the server does not hold leaves the queue and its marker, with a feed event."""
    _synced(agent, "t-1", 5)
    _synced(agent, "t-2", 6)
    clock.advance(8 * DAY)
    assert _run(agent) == 2
    result = agent.fetch("tasks", ["t-1", "t-2"])
    assert sorted(result.waiting) == ["t-1", "t-2"] and result.records == []
    core = agent.sync.core
    request = core.write(lambda work: fetching.next_request(work, "f-1"))
    assert request is not None and request.c == "tasks" and sorted(request.k) == ["t-1", "t-2"]
    # Sent: not again until the resend timeout.
    assert core.write(lambda work: fetching.next_request(work, "f-2")) is None
    mark = agent.feed_position()
    answer = wire.Fetched(req="f-1", c="tasks", recs=[rec("t-1", 5, DONE)], miss=["t-2"])
    core.write(lambda work: fetching.apply_fetched(work, answer))
    assert agent.get("tasks", "t-1") is not None
    assert agent.get("tasks", "t-1").fields == DONE  # type: ignore[union-attr]
    assert agent.status().fetching == 0 and agent.status().evicted == 0
    assert ("t-1", "fetched") in _kinds(agent, mark) and ("t-2", "fetched") in _kinds(agent, mark)
    # Held records are answered at once; an absent one is asked for again.
    again = agent.fetch("tasks", ["t-1", "t-2"])
    assert [r.key for r in again.records] == ["t-1"] and again.waiting == ["t-2"]
    assert_views_consistent(agent)


def test_unanswered_fetch_is_sent_again(agent: Agent, clock: FakeClock) -> None:
    """A request with no answer goes again after the resend timeout."""
    agent.fetch("tasks", ["t-9"])
    core = agent.sync.core
    assert core.write(lambda work: fetching.next_request(work, "f-1")) is not None
    clock.advance(fetching.RESEND_MS / 1000 + 1)
    again = core.write(lambda work: fetching.next_request(work, "f-2"))
    assert again is not None and again.k == ["t-9"]


def test_fetch_requests_are_bounded(agent: Agent) -> None:
    """One request names keys of one collection, at most 100."""
    agent.fetch("tasks", [f"t-{i}" for i in range(100)])
    agent.fetch("inventory", ["sku-1"])
    core = agent.sync.core
    first = core.write(lambda work: fetching.next_request(work, "f-1"))
    second = core.write(lambda work: fetching.next_request(work, "f-2"))
    assert first is not None and second is not None
    assert (first.c, len(first.k)) == ("inventory", 1)
    assert (second.c, len(second.k)) == ("tasks", 100)


@pytest.mark.parametrize(("collection", "keys", "code"), [
    ("nope", ["k"], "unknown_collection"),
    ("tasks", [], "invalid"),
    ("tasks", [f"k{i}" for i in range(101)], "too_many"),
    ("tasks", ["a\0b"], None),
    ("tasks", ["x" * 5000], None),
    ("tasks", [""], None),
])
def test_bad_fetch_requests_are_refused(agent: Agent, collection: str, keys: list[str],
                                        code: str | None) -> None:
    """A wrong collection, no key, too many keys or a bad key: BadRequest, nothing queued."""
    with pytest.raises(BadRequest) as err:
        agent.fetch(collection, keys)
    if code is not None:
        assert err.value.code == code
    assert agent.status().fetching == 0


def test_fetch_wait_is_bounded(agent: Agent) -> None:
    """wait_s outside 0..300 is refused."""
    with pytest.raises(BadRequest):
        agent.fetch("tasks", ["t-1"], wait_s=301)
    with pytest.raises(BadRequest):
        agent.fetch("tasks", ["t-1"], wait_s=-1)


def test_writing_an_evicted_record_asks_for_it_back(agent: Agent, clock: FakeClock) -> None:
    """A write on an evicted record is saved (offline first) and the record is queued
    for fetching, so that its view is whole again once the server answers."""
    _synced(agent, "t-1", 5)
    clock.advance(8 * DAY)
    _run(agent)
    agent.put("tasks", "t-1", {"notes": "reopened"})
    assert agent.status().fetching == 1
    core = agent.sync.core
    core.write(lambda work: fetching.apply_fetched(work, wire.Fetched(
        req="f", c="tasks", recs=[rec("t-1", 5, DONE)])))
    got = agent.get("tasks", "t-1")
    assert got is not None and got.fields == {**DONE, "notes": "reopened"} and got.pending == 1
    assert_views_consistent(agent)


def test_resync_brings_everything_back(agent: Agent, clock: FakeClock) -> None:
    """A `resync` command forgets the eviction markers: the snapshot restores all."""
    _synced(agent, "t-1", 5)
    clock.advance(8 * DAY)
    _run(agent)
    agent.sync.execute_command(wire.Command(id="cmd-1", cmd="resync"))
    assert agent.status().evicted == 0
    agent.sync.apply_page(wire.Page.model_validate(
        {"req": "c-1", "s": S, "from": 0, "to": 5, "reset": True, "recs": [rec("t-1", 5, DONE)]}))
    assert agent.get("tasks", "t-1") is not None


def test_removed_scope_forgets_its_markers(agent: Agent, clock: FakeClock) -> None:
    """Markers of a scope the device no longer follows go with the scope."""
    _synced(agent, "t-1", 5)
    clock.advance(8 * DAY)
    _run(agent)
    agent.sync.execute_command(wire.Command(id="cmd-2", cmd="scopes",
                                            args={"scopes": ["depot-7", "fleet"]}))
    assert agent.status().evicted == 0


# ------------------------------------------------------------------------ quota


@pytest.fixture
def small(tmp_path: Path, catalog: Catalog, clock: FakeClock) -> Any:
    """An agent whose quota is just above its empty store."""
    probe = Agent.open(make_cfg(tmp_path / "probe"), catalog, now_ms=clock)
    empty = probe.sync.core.read(lambda work: work.tx.live_bytes())
    probe.close()
    ag = Agent.open(make_cfg(tmp_path / "data", quota_bytes=max(1 << 20, empty)), catalog,
                    now_ms=clock)
    yield ag
    ag.close()


def _fill_local(agent: Agent, status: str = "delivered") -> int:
    for i in range(5000):
        try:
            agent.put("tasks", f"w-{i}", {"route": S, "status": status, "notes": "x" * 1800})
        except QuotaReached:
            return i
    raise AssertionError("the quota was never reached")


def _fill_synced(agent: Agent, status: str = "delivered") -> int:
    """Records from the server until the quota is reached (sync is never refused)."""
    core = agent.sync.core
    limit = core.settings.quota_bytes
    assert limit is not None
    for i in range(5000):
        if core.read(lambda work: work.tx.live_bytes()) >= limit:
            return i
        _synced(agent, f"r-{i}", i + 1, {"route": S, "status": status, "notes": "x" * 1800})
    raise AssertionError("the quota was never reached")


def test_quota_refuses_local_writes_but_sync_goes_on(small: Agent) -> None:
    """At the quota: a clear error for local writes and nothing stored; the outbox
    still drains (acks apply) and frees room; status says so."""
    written = _fill_local(small)
    assert written > 0
    status = small.status()
    assert status.quota is not None and status.quota["reached"]
    assert "disk quota reached" in status.summary()
    with pytest.raises(QuotaReached, match=r"storage\.quota_bytes"):
        small.put("tasks", "one-more", {"route": S})
    with pytest.raises(QuotaReached), small.transaction() as tx:
        tx.put("tasks", "one-more", {"route": S})
    assert small.get("tasks", "one-more") is None
    assert small.status().pending == written
    small.sync.apply_ack(wire.Ack(ok=[(n, S, n) for n in range(1, written + 1)]))
    assert small.status().pending == 0
    assert_views_consistent(small)


def test_quota_pressure_evicts_young_records_of_the_declared_kind(small: Agent) -> None:
    """Records the schema declares evictable go before their time while the quota is
    reached; the feed says when the quota is reached and left; writes work again."""
    mark = small.feed_position()
    held = _fill_synced(small)
    with pytest.raises(QuotaReached):
        small.put("tasks", "one-more", {"route": S})
    step = evict.step(small.sync.core, batch=1)  # records the state: reached
    assert step.quota is not None
    freed = step.evicted + evict.run_pass(small.sync.core)
    assert 0 < freed <= held
    after = small.status()
    assert after.quota is not None and not after.quota["reached"]
    events = [e.data["reached"] for e in small.feed_after(mark) if e.kind == "quota"]
    assert events[-1] is False and True in events
    small.put("tasks", "one-more", {"route": S})
    assert_views_consistent(small)


def test_quota_never_evicts_what_retention_does_not_declare(small: Agent) -> None:
    """Under pressure the kind condition holds: records not declared evictable stay."""
    held = _fill_synced(small, status="out")
    assert evict.run_pass(small.sync.core) == 0
    assert small.count("tasks", where={"route": S}) == held
    with pytest.raises(QuotaReached):
        small.put("tasks", "one-more", {"route": S})


def test_quota_config_is_checked(tmp_path: Path) -> None:
    """A quota below 1 MiB or above the map limit is refused when the config is read."""
    with pytest.raises(ValueError, match="quota_bytes"):
        make_cfg(tmp_path, quota_bytes=1000)
    with pytest.raises(ValueError, match="quota_bytes"):
        make_cfg(tmp_path, quota_bytes=5 << 30, max_map_size_mb=4096)
    assert make_cfg(tmp_path, quota_bytes=1 << 20).storage.quota_bytes == 1 << 20


def test_live_bytes_falls_when_records_go(agent: Agent, clock: FakeClock) -> None:
    """The quota's measure falls after eviction (the file size would not)."""
    for i in range(200):
        _synced(agent, f"t-{i}", i + 1, {**DONE, "notes": "y" * 1500})
    core = agent.sync.core
    full = core.read(lambda work: work.tx.live_bytes())
    clock.advance(8 * DAY)
    evict.run_pass(core)
    assert core.read(lambda work: work.tx.live_bytes()) < full / 2
    assert record_key("tasks", "t-0") is not None


def test_live_queries_see_records_leave_and_come_back(agent: Agent, clock: FakeClock) -> None:
    """A live query over evicted records says they left; a fetch brings them back in."""
    _synced(agent, "t-1", 5)
    live = agent.live_query("tasks", where={"status": "delivered"}, order_by="eta")
    first = live.poll()
    assert first is not None and first.keys == ["t-1"]
    clock.advance(8 * DAY)
    _run(agent)
    update = live.poll()
    assert update is not None and update.keys == [] and update.left == ["t-1"]
    agent.fetch("tasks", ["t-1"])
    core = agent.sync.core
    core.write(lambda work: fetching.apply_fetched(work, wire.Fetched(
        req="f", c="tasks", recs=[rec("t-1", 5, DONE)])))
    back = live.poll()
    assert back is not None and back.keys == ["t-1"]
    assert [r.key for r in back.entered] == ["t-1"]


def test_a_snapshot_forgets_markers_of_records_gone_from_the_server(
        agent: Agent, clock: FakeClock) -> None:
    """Markers stay bounded: a snapshot that lists an evicted record keeps its marker,
    one that does not (the record was purged on the server) drops it."""
    _synced(agent, "t-1", 5)
    _synced(agent, "t-2", 6)
    clock.advance(8 * DAY)
    assert _run(agent) == 2
    agent.sync.apply_page(wire.Page.model_validate(
        {"req": "c-9", "s": S, "from": 0, "to": 9, "reset": True, "recs": [rec("t-1", 5, DONE)]}))
    agent.sync.apply_checkpoint(wire.Checkpoint(req="c-9", cp={S: 9}))
    assert agent.evicted_keys("tasks") == ["t-1"]
    assert agent.get("tasks", "t-1") is None


@pytest.mark.parametrize("bad", [
    {"batch": 0}, {"batch": 10_001}, {"interval_s": 0}, {"interval_s": "soon"},
    {"enabled": "maybe"}, {"evict": True},
])
def test_bad_retention_config_is_refused(tmp_path: Path, bad: dict[str, Any]) -> None:
    """Wrong [retention] values in the agent config are refused when it is read."""
    from waystation.config import AgentConfig

    with pytest.raises(ValueError, match="retention"):
        AgentConfig.model_validate({"device_id": "van-1", "data_dir": str(tmp_path),
                                    "retention": bad})
