"""The app-facing API: local writes, reads, the feed and status."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from agent.api import Agent
from agent.errors import NotFound, WriteRefused
from schemas.collection import Catalog
from schemas.wire import INCARNATION_PATTERN, Change
from tests.agent.agentkit import FakeClock, assert_views_consistent, make_cfg, outbox_numbers
from waystation.hlc import Stamp


def test_put_is_pending_and_visible(agent: Agent) -> None:
    """A put returns "pending" with its change id and is visible at once."""
    result = agent.put("tasks", "t-1", {"route": "route-42", "status": "out"})
    assert result.state == "pending"
    assert result.change_id == "van-1:1" and result.n == 1
    assert result.message == "saved locally (change van-1:1), pending sync"
    record = agent.get("tasks", "t-1")
    assert record is not None
    assert record.fields == {"route": "route-42", "status": "out"}
    assert record.pending == 1 and not record.synced and record.version == 0
    assert record.sync == {"route": "pending", "status": "pending"}
    assert_views_consistent(agent)


def test_outbox_entry_is_a_valid_wire_change(agent: Agent, clock: FakeClock) -> None:
    """The stored change is a valid wire change with its metadata around it."""
    agent.put("tasks", "t-1", {"route": "route-42", "status": "out"}, priority=3)
    [entry] = agent.pending()
    change = Change.model_validate(entry["ch"])
    assert change.n == 1 and change.op == "put" and change.s == "route-42" and change.b == 0
    assert Stamp.from_time_part(change.h, "van-1").wall == clock.ms
    assert entry["p"] == 3 and entry["at"] == 0 and entry["err"] is None
    assert entry["t"] == clock.ms and entry["sv"] == 1


def test_every_kind_of_write(agent: Agent) -> None:
    """put, increment, add, remove and delete each make one change and update the view."""
    agent.put("tasks", "t-1", {"route": "route-42", "status": "out"})
    agent.increment("tasks", "t-1", "attempts", 2)
    agent.increment("tasks", "t-1", "attempts", -1)
    agent.add("tasks", "t-1", "labels", ["fragile", "late", "fragile"])
    agent.remove("tasks", "t-1", "labels", ["late"])
    record = agent.get("tasks", "t-1")
    assert record is not None
    assert record.fields == {"route": "route-42", "status": "out", "attempts": 1,
                             "labels": ["fragile"]}
    [*_, rm] = agent.pending()
    assert rm["ch"]["r"] == {"labels": {"late": ["van-1:4"]}}
    result = agent.delete("tasks", "t-1")
    assert result.n == 6
    assert agent.get("tasks", "t-1") is None
    deleted = agent.get("tasks", "t-1", include_deleted=True)
    assert deleted is not None and deleted.deleted and deleted.pending == 6
    assert outbox_numbers(agent) == [1, 2, 3, 4, 5, 6]
    assert_views_consistent(agent)


def test_removing_an_absent_member_changes_nothing(agent: Agent) -> None:
    """Removing members the set does not hold writes no change."""
    agent.put("tasks", "t-1", {"route": "route-42"})
    result = agent.remove("tasks", "t-1", "labels", ["nope"])
    assert result.state == "unchanged" and result.n is None
    assert outbox_numbers(agent) == [1]


def test_fixed_scope_collection_needs_no_scope_field(agent: Agent) -> None:
    """A collection with a fixed scope creates records in it without a scope field."""
    result = agent.put("inspections", "i-1", {"vehicle": "v-1"})
    assert result.scope == "fleet"
    assert agent.add("inspections", "i-2", "defects", ["mirror"]).scope == "fleet"


def test_n_is_gapless_across_reopen(tmp_path: Path, catalog: Catalog) -> None:
    """Change numbers continue 1, 2, 3, ... after a reopen, never reused."""
    cfg = make_cfg(tmp_path)
    with Agent.open(cfg, catalog) as ag:
        for i in range(3):
            ag.put("tasks", f"t-{i}", {"route": "route-42"})
    with Agent.open(cfg, catalog) as ag:
        assert ag.put("tasks", "t-9", {"route": "route-42"}).n == 4
        assert outbox_numbers(ag) == [1, 2, 3, 4]


def test_stamps_increase_even_when_the_clock_goes_back(agent: Agent, clock: FakeClock) -> None:
    """HLC stamps of successive writes only increase, whatever the wall clock does."""
    stamps = []
    for i in range(3):
        stamps.append(Stamp.parse(agent.put("tasks", f"t-{i}", {"route": "route-42"}).stamp or ""))
        clock.advance(-60)
    assert stamps == sorted(stamps) and len(set(stamps)) == 3


def _nothing_written(ag: Agent) -> None:
    assert ag.status().pending == 0
    assert ag.status().next_n == 1
    assert ag.list("tasks") == [] and ag.list("inventory") == []


BAD_WRITES: list[tuple[str, Any, str, str]] = [
    ("put", ("nope", "k", {"a": 1}), "unknown_collection", "unknown collection 'nope'"),
    ("put", ("tasks", "t-1", {"route": "route-42", "colour": "red"}), "unknown_field",
     "tasks has no field 'colour'"),
    ("put", ("tasks", "t-1", {"route": "route-42", "eta": "soon"}), "type_mismatch",
     "tasks.eta \\(int\\): expected an integer, got a string"),
    ("put", ("tasks", "t-1", {"route": "route-42", "eta": True}), "type_mismatch",
     "expected an integer, got a bool"),
    ("put", ("tasks", "t-1", {"status": "out"}), "invalid",
     "creating it needs its scope field 'route'"),
    ("put", ("tasks", "t-1", {"route": "route-99"}), "scope_denied",
     "scope 'route-99' is not one of this device's scopes"),
    ("put", ("tasks", "t-1", {"route": "route-42", "attempts": 3}), "wrong_strategy",
     "is a counter: change it with increment"),
    ("put", ("tasks", "t-1", {"route": "route-42", "labels": ["a"]}), "wrong_strategy",
     "is a set"),
    ("put", ("tasks", "t-1", {}), "invalid", "at least one field"),
    ("put", ("tasks", "", {"route": "route-42"}), "invalid", "1 to 200 UTF-8 bytes"),
    ("put", ("tasks", "a\nb", {"route": "route-42"}), "invalid", "control character"),
    ("put", ("tasks", "t-1", {"route": "route-42", "proof": float("nan")}), "type_mismatch",
     "not finite"),
    ("put", ("tasks", "t-1", {"route": "route-42", "proof": {1: "x"}}), "type_mismatch",
     "not a string"),
    ("put", ("tasks", "t-1", {"route": "route-42", "proof": {"blob": "x" * 70_000}}),
     "record_too_large", "over the 65536-byte record limit"),
    ("increment", ("tasks", "t-1", "status", 1), "wrong_strategy", "is not a counter"),
    ("increment", ("inventory", "i-1", "stock", 1), "invalid", "scope field 'depot'"),
    ("increment", ("inspections", "i-1", "odometer", 1), "wrong_strategy", "is not a counter"),
    ("increment", ("inventory", "i-1", "stock", 1.5), "type_mismatch", "integer increments"),
    ("increment", ("inventory", "i-1", "stock", 0), "invalid", "must not be 0"),
    ("add", ("tasks", "t-1", "labels", "fragile"), "invalid", "a list of strings"),
    ("add", ("tasks", "t-1", "labels", [3]), "type_mismatch", "members must be strings"),
    ("add", ("tasks", "t-1", "labels", []), "invalid", "at least one member"),
    ("add", ("tasks", "t-1", "status", ["x"]), "wrong_strategy", "is not a set"),
    ("delete", ("tasks", "t-1"), "invalid", "no record tasks/t-1"),
]


@pytest.mark.parametrize(("method", "args", "code", "message"), BAD_WRITES,
                         ids=[f"{m}-{c}-{i}" for i, (m, _, c, _) in enumerate(BAD_WRITES)])
def test_bad_writes_are_refused_and_nothing_is_written(agent: Agent, method: str, args: Any,
                                                       code: str, message: str) -> None:
    """Each invalid write raises WriteRefused with the code and a clear message."""
    with pytest.raises(WriteRefused, match=message) as info:
        getattr(agent, method)(*args)
    assert info.value.code == code
    _nothing_written(agent)


def test_record_cannot_move_between_scopes(agent: Agent) -> None:
    """Changing a record's scope field is refused (a record never moves)."""
    agent.put("tasks", "t-1", {"route": "route-42"})
    with pytest.raises(WriteRefused, match="cannot change to 'depot-7'") as info:
        agent.put("tasks", "t-1", {"route": "depot-7"})
    assert info.value.code == "scope_mismatch"
    assert outbox_numbers(agent) == [1]


def test_priority_must_be_an_int32(agent: Agent) -> None:
    """A priority outside the 32-bit range is refused."""
    with pytest.raises(WriteRefused, match="priority"):
        agent.put("tasks", "t-1", {"route": "route-42"}, priority=2**40)
    _nothing_written(agent)


def test_list_with_prefix_and_limit(agent: Agent) -> None:
    """list returns records in key order, filtered by prefix, up to limit, not deleted."""
    for key in ("b-2", "a-1", "b-1", "c-1", "b-3"):
        agent.put("tasks", key, {"route": "route-42"})
    agent.delete("tasks", "b-2")
    assert [r.key for r in agent.list("tasks")] == ["a-1", "b-1", "b-3", "c-1"]
    assert [r.key for r in agent.list("tasks", prefix="b-")] == ["b-1", "b-3"]
    assert [r.key for r in agent.list("tasks", prefix="b-", limit=1)] == ["b-1"]
    assert [r.key for r in agent.list("tasks", include_deleted=True)][:3] == ["a-1", "b-1", "b-2"]
    assert agent.list("inventory") == []


def test_watch_yields_feed_events_until_the_deadline(agent: Agent) -> None:
    """watch yields events after `since`, filtered by collection, and stops at timeout."""
    start = agent.feed_position()
    agent.put("tasks", "t-1", {"route": "route-42"})
    agent.put("inspections", "i-1", {"vehicle": "v"})
    events = list(agent.watch("tasks", since=start, timeout=0.05))
    assert [(e.collection, e.key, e.kind) for e in events] == [("tasks", "t-1", "local")]
    assert list(agent.watch(since=agent.feed_position(), timeout=0.01)) == []


def test_status_counts_and_summary(agent: Agent, clock: FakeClock) -> None:
    """status: pending equals the outbox size, oldest age, offline summary."""
    agent.put("tasks", "t-1", {"route": "route-42"})
    clock.advance(300)
    agent.put("tasks", "t-2", {"route": "route-42"})
    status = agent.status()
    assert status.pending == 2 == len(agent.pending())
    assert status.oldest_pending_age_s == 300
    assert not status.online and status.last_sync_age_s is None
    assert status.summary() == ("offline — the sync daemon has not run on this store yet "
                                "(start `waystation agent run` or its service); 2 changes "
                                "saved locally, waiting for connection; oldest 5 min; "
                                "never synced")
    assert status.checkpoints == {"route-42": 0, "depot-7": 0, "fleet": 0}


def test_online_needs_a_fresh_heartbeat(agent: Agent, clock: FakeClock) -> None:
    """status is online only while the daemon's heartbeat is fresh."""
    agent.sync.set_online(True)
    assert agent.status().online
    assert agent.status().summary().startswith("online, 0 pending")
    clock.advance(120)
    assert not agent.status().online
    agent.sync.set_online(False)
    assert not agent.status().online


def test_retry_dead_letter_sends_it_as_a_new_change(agent: Agent) -> None:
    """A dead letter can be retried as a new change; unknown numbers are NotFound."""
    from schemas import wire

    agent.put("tasks", "t-1", {"route": "route-42", "status": "x"})
    agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(n=1, code="rule_rejected",
                                                           reason="no", perm=True)]))
    result = agent.retry_dead_letter(1)
    assert result.n == 2 and agent.dead_letters() == []
    record = agent.get("tasks", "t-1")
    assert record is not None and record.fields["status"] == "x"
    with pytest.raises(NotFound):
        agent.retry_dead_letter(1)


def test_a_dictionary_unknown_refusal_is_no_problem_for_status(agent: Agent) -> None:
    """`dictionary_unknown` (zd3: the server lost the device's recent messages) is
    answered by sending again at once: `agent status` does not show it as a problem,
    while a real message-level refusal is shown."""
    from schemas import codec, wire

    agent.put("tasks", "t-1", {"route": "route-42", "status": "x"})
    result = agent.sync.apply_reject(wire.Reject(err=wire.ErrorInfo(
        code=codec.DICTIONARY_UNKNOWN, reason="this server does not hold ...")))
    assert result.error is not None and result.error["code"] == codec.DICTIONARY_UNKNOWN
    assert agent.status().last_error is None
    assert "server says" not in agent.status().summary()
    agent.sync.apply_reject(wire.Reject(err=wire.ErrorInfo(code=codec.MALFORMED,
                                                           reason="broken zlib stream")))
    assert "server says: broken zlib stream" in agent.status().summary()


def test_feed_is_pruned_and_watch_reports_the_loss(agent: Agent,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The feed keeps only the newest events; a watcher that fell behind is told."""
    import agent.core as core

    monkeypatch.setattr(core, "FEED_KEEP", 10)
    monkeypatch.setattr(core, "_FEED_PRUNE_EVERY", 4)
    for i in range(40):
        agent.put("tasks", f"t-{i}", {"route": "route-42"})
    kept = agent._core.read(lambda work: list(work.tx.keys("feed")))
    assert 10 <= len(kept) < 15
    events = list(agent.watch(since=1, timeout=0))
    assert events[0].kind == "truncated"
    assert [e.key for e in events[1:]][-1] == "t-39"


def test_reads_of_unknown_collections_and_bad_keys(agent: Agent) -> None:
    """get/list with an unknown collection or an impossible key raise BadRequest."""
    from agent.errors import BadRequest

    with pytest.raises(BadRequest, match="unknown collection 'nope'"):
        agent.get("nope", "k")
    with pytest.raises(BadRequest, match="unknown collection"):
        agent.list("nope")
    with pytest.raises(BadRequest, match="1 to 200 UTF-8 bytes"):
        agent.get("tasks", "k" * 300)


def test_too_deep_json_is_refused(agent: Agent) -> None:
    """A json value nested deeper than 32 levels is refused."""
    value: Any = "leaf"
    for _ in range(40):
        value = [value]
    with pytest.raises(WriteRefused, match="nested deeper than 32"):
        agent.put("tasks", "t-1", {"route": "route-42", "proof": value})


def test_on_disk_layout(tmp_path: Path, catalog: Catalog) -> None:
    """Named databases, record keys 'collection\\0key', outbox keys n as 8 bytes BE."""
    import lmdb
    import orjson

    with Agent.open(make_cfg(tmp_path), catalog) as ag:
        ag.put("tasks", "t-1", {"route": "route-42"}, priority=2)
    env = lmdb.open(str(tmp_path / "agent.lmdb"), max_dbs=32, readonly=True)
    with env.begin() as txn:
        names = sorted(key for key, _ in txn.cursor())
        dbs = {name: env.open_db(name, txn=txn, create=False) for name in names}
        assert names == sorted([b"view", b"base", b"stamps", b"outbox", b"outbox_idx",
                                b"checkpoints", b"conflicts", b"deadletters", b"meta", b"feed",
                                b"index", b"evicted", b"fetch", b"fetchq", b"journal",
                                b"idem", b"idem_a", b"idem_c", b"idem_t"])
        assert orjson.loads(txn.get(b"format", db=dbs[b"meta"])) == 2
        assert orjson.loads(txn.get(b"device", db=dbs[b"meta"])) == "van-1"
        inc = orjson.loads(txn.get(b"inc", db=dbs[b"meta"]))
        assert re.fullmatch(INCARNATION_PATTERN, inc)
        entry = orjson.loads(txn.get((1).to_bytes(8, "big"), db=dbs[b"outbox"]))
        assert entry["ch"]["n"] == 1 and entry["p"] == 2 and entry["i"] == inc
        assert txn.get(b"tasks\0t-1", db=dbs[b"view"]) is not None
        idx = [key for key, _ in txn.cursor(db=dbs[b"outbox_idx"])]
        assert idx == [b"P" + (2**31 - 3).to_bytes(4, "big") + (1).to_bytes(8, "big"),
                       b"Rtasks\0t-1\0" + (1).to_bytes(8, "big")]
    env.close()
