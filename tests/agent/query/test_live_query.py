"""Live queries: the first page, then entered / changed / left as records change, from
local writes, acks, rejections, deltas, wipes and other processes."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

import agent.core as agent_core
from agent.api import Agent
from agent.query import LiveUpdate, QueryError
from schemas import wire
from tests.agent.agentkit import make_cfg, rec, wait_until
from tests.agent.query.index_worker import catalog

OUT = {"where": {"status": "out"}, "order_by": "eta"}


def _put(ag: Agent, key: str, status: str | None, eta: int, **more: Any) -> None:
    ag.put("tasks", key, {"route": "route-42", "status": status, "eta": eta, **more})


def test_first_result_then_entered_changed_left(agent: Agent) -> None:
    """The first poll gives the result; then each relevant write gives the difference."""
    _put(agent, "a", "out", 3)
    _put(agent, "b", "done", 1)
    live = agent.live_query("tasks", **OUT)
    first = live.poll()
    assert first is not None and first.initial and first.keys == ["a"]
    assert [r.key for r in first.entered] == ["a"]
    assert live.poll() is None
    _put(agent, "c", "out", 1)
    update = live.poll()
    assert update is not None and not update.initial
    assert update.keys == ["c", "a"] and [r.key for r in update.entered] == ["c"]
    assert update.changed == [] and update.left == []
    agent.put("tasks", "a", {"notes": "ring twice"})
    update = live.poll()
    assert update is not None and [r.key for r in update.changed] == ["a"]
    assert update.changed[0].fields["notes"] == "ring twice"
    agent.put("tasks", "c", {"status": "done"})
    update = live.poll()
    assert update is not None and update.left == ["c"] and update.keys == ["a"]
    agent.delete("tasks", "a")
    update = live.poll()
    assert update is not None and update.left == ["a"] and update.keys == []
    assert update.seq == agent.feed_position()


def test_writes_outside_the_result_give_no_update(agent: Agent) -> None:
    """Writes to records that neither are nor come into the result change nothing."""
    _put(agent, "a", "out", 3)
    live = agent.live_query("tasks", **OUT)
    assert live.poll() is not None
    _put(agent, "b", "done", 1)
    agent.put("inventory", "sku-1", {"depot": "depot-7", "name": "flour"})
    agent.put("tasks", "b", {"notes": "still done"})
    assert live.poll() is None
    assert live.position == agent.feed_position()


def test_limit_pushes_records_out(agent: Agent) -> None:
    """With a limit, a record entering ahead of the page pushes the last one out."""
    for i, key in enumerate("abc"):
        _put(agent, key, "out", 10 + i)
    live = agent.live_query("tasks", **OUT, limit=2)
    assert live.poll().keys == ["a", "b"]  # type: ignore[union-attr]
    _put(agent, "z", "out", 1)
    update = live.poll()
    assert update is not None and update.keys == ["z", "a"]
    assert [r.key for r in update.entered] == ["z"] and update.left == ["b"]
    _put(agent, "y", "out", 99)
    assert live.poll() is None, "beyond the page: no change of the result"


def test_sync_events_change_the_result(agent: Agent) -> None:
    """An ack turns a row synced (changed), a rejection rolls a write back (left), a
    delta from the server brings a record in (entered), a wipe empties the result."""
    _put(agent, "a", "out", 3)
    live = agent.live_query("tasks", **OUT)
    assert live.poll() is not None
    batch = agent.sync.next_batch()
    agent.sync.apply_ack(wire.Ack(ok=[(n, "route-42", 1) for n in batch.numbers]))
    update = live.poll()
    assert update is not None and [r.key for r in update.changed] == ["a"]
    assert update.changed[0].pending == 0 and set(update.changed[0].sync.values()) == {"synced"}
    agent.put("tasks", "a", {"status": "done"})
    update = live.poll()
    assert update is not None and update.left == ["a"]
    (n,) = agent.sync.next_batch().numbers
    agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
        n=n, code="rule_rejected", reason="no", perm=True)]))
    update = live.poll()
    assert update is not None and [r.key for r in update.entered] == ["a"], "rolled back"
    agent.sync.apply_delta(wire.Delta(d=[rec("r-1", 2, {"route": "route-42",
                                                        "status": "out", "eta": 1})]))
    update = live.poll()
    assert update is not None and update.keys == ["r-1", "a"]
    agent.wipe("w-1")
    update = live.poll()
    assert update is not None and update.keys == [] and set(update.left) == {"a", "r-1"}


def test_pruned_feed_events_reload_the_result(agent: Agent,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """When the feed pruned events before the live query read them, it runs the query
    again rather than miss a change."""
    monkeypatch.setattr(agent_core, "FEED_KEEP", 40)
    _put(agent, "a", "out", 3)
    live = agent.live_query("tasks", **OUT)
    assert live.poll() is not None
    for i in range(300):
        agent.put("inventory", f"sku-{i}", {"depot": "depot-7"})
    agent.put("tasks", "a", {"status": "done"})
    first = agent._core.read(lambda work: work.tx.first("feed"))
    assert first is not None and int.from_bytes(first[0], "big") > live.position + 1
    update = live.poll()
    assert update is not None and update.left == ["a"]


def test_update_is_json_and_after_is_refused(agent: Agent) -> None:
    """An update serialises to JSON (for the HTTP API's stream); a live query follows the
    first page, so a cursor is refused."""
    _put(agent, "a", "out", 3)
    update = agent.live_query("tasks", **OUT).poll()
    assert update is not None
    doc = orjson.loads(orjson.dumps(update.to_dict()))
    assert doc["keys"] == ["a"] and doc["initial"] is True
    assert doc["entered"][0]["fields"]["status"] == "out"
    _put(agent, "b", "out", 4)
    cursor = agent.query("tasks", **OUT, limit=1).next
    with pytest.raises(QueryError, match="leave out `after`"):
        agent.live_query("tasks", **OUT, after=cursor)


def test_subscription_sees_another_process_write(tmp_path: Path) -> None:
    """A subscription on a thread gets the rows another process writes; stop() ends it."""
    cfg = make_cfg(tmp_path)
    updates: list[LiveUpdate] = []
    seen = threading.Event()

    def on_update(update: LiveUpdate) -> None:
        updates.append(update)
        if len(update.keys) >= 3:
            seen.set()

    with Agent.open(cfg, catalog(extra=False)) as ag:
        sub = ag.subscribe({"collection": "tasks", "where": {"route": "route-42"},
                            "order_by": "eta"}, on_update, poll_s=0.01)
        wait_until(lambda: updates, timeout=30)
        assert updates[0].initial and updates[0].keys == []
        writer = Path(__file__).parents[1] / "agent_writer.py"
        out = subprocess.run([sys.executable, str(writer), str(tmp_path), "p", "3"],
                             capture_output=True, text=True, timeout=120, check=True)
        assert out.stdout.split() == ["ready", "1", "2", "3"]
        assert seen.wait(30), updates
        sub.stop()
        assert not sub.running and sub.error is None
        assert sorted(updates[-1].keys) == ["p-0", "p-1", "p-2"]


def test_subscription_ends_with_the_error_when_its_index_goes(tmp_path: Path) -> None:
    """If the index a live query needs is dropped (the schema changed), the subscription
    stops and keeps the error saying which index to add."""
    cfg = make_cfg(tmp_path)
    with Agent.open(cfg, catalog(extra=True)) as ag:
        _put(ag, "a", "out", 1, customer="x")
        sub = ag.subscribe({"collection": "tasks", "where": {"status": "out"},
                            "order_by": "customer"}, lambda u: None, poll_s=0.01)
        with Agent.open(cfg, catalog(extra=False)):
            pass  # drops the index
        _put(ag, "b", "out", 2, customer="y")
        wait_until(lambda: not sub.running, timeout=30)
        assert sub.error is not None and "status" in str(sub.error)
        assert '["status", "customer"]' in str(sub.error)
        sub.stop()


def test_updates_iterator_stops_at_its_timeout(agent: Agent) -> None:
    """updates(timeout) yields the first result and changes, then ends."""
    _put(agent, "a", "out", 3)
    live = agent.live_query("tasks", **OUT)
    got = list(live.updates(timeout=0.2, poll_s=0.01))
    assert len(got) == 1 and got[0].initial
    live.close()
    assert live.poll() is None
