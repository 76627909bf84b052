"""Local multi-record transactions (`Agent.transaction`, agent.transaction): all or
nothing in one LMDB transaction, reads of the block's own writes, crash safety."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import transaction
from agent.api import Agent
from agent.errors import WriteRefused
from agent.transaction import MAX_TXN_OPS, TransactionError
from schemas.collection import Catalog
from tests.agent.agentkit import assert_views_consistent, make_cfg, outbox_numbers
from tests.agent.crashing import kill_when_ready


def _bins(agent: Agent) -> None:
    for bin_ in ("bin-a", "bin-b"):
        agent.put("inventory", bin_, {"depot": "depot-7", "sku": "A"})
    agent.increment("inventory", "bin-a", "stock", 10)


def _stock(agent: Agent, key: str) -> int:
    record = agent.get("inventory", key)
    assert record is not None
    return int(record.fields.get("stock", 0))


def test_order_and_lines_commit_together(agent: Agent) -> None:
    """Writes across records and collections commit together, with consecutive change
    numbers marked as one unit in the outbox."""
    _bins(agent)
    first = len(outbox_numbers(agent)) + 1
    with agent.transaction() as tx:
        tx.put("tasks", "o-1", {"route": "route-42", "status": "ordered"})
        tx.put("tasks", "o-1:1", {"route": "route-42", "notes": "2 x A"})
        tx.increment("inventory", "bin-a", "stock", -2)
        tx.increment("inventory", "bin-b", "stock", 2)
    assert [r.state for r in tx.results] == ["pending"] * 4
    assert [r.n for r in tx.results] == list(range(first, first + 4))
    assert tx.changes == [f"van-1:{n}" for n in range(first, first + 4)]
    entries = {e["ch"]["n"]: e for e in agent.pending()}
    assert [entries[n]["x"] for n in range(first, first + 4)] == [[first, 4]] * 4
    assert "x" not in entries[1]  # a plain write stays plain
    assert _stock(agent, "bin-a") == 8 and _stock(agent, "bin-b") == 2
    got = agent.get("tasks", "o-1:1")
    assert got is not None and got.fields["notes"] == "2 x A"
    assert_views_consistent(agent)


def test_exception_inside_the_block_writes_nothing(agent: Agent) -> None:
    _bins(agent)
    before = agent.pending()
    position = agent.feed_position()
    with pytest.raises(KeyError), agent.transaction() as tx:
        tx.increment("inventory", "bin-a", "stock", -2)
        tx.increment("inventory", "bin-b", "stock", 2)
        raise KeyError("the app changed its mind")
    assert agent.pending() == before
    assert agent.feed_position() == position
    assert _stock(agent, "bin-a") == 10 and _stock(agent, "bin-b") == 0
    assert tx.results == []


def test_a_refused_operation_at_commit_writes_nothing(agent: Agent) -> None:
    """An operation that can only be judged at commit (delete of a missing record)
    aborts the whole transaction: the earlier operations are not written either."""
    _bins(agent)
    before = agent.pending()
    with pytest.raises(WriteRefused, match="no record tasks/missing"), \
            agent.transaction() as tx:
        tx.increment("inventory", "bin-a", "stock", -2)
        tx.increment("inventory", "bin-b", "stock", 2)
        tx.delete("tasks", "missing")
    assert agent.pending() == before
    assert _stock(agent, "bin-a") == 10
    # ... and the change numbers it would have used are still free (gapless).
    assert agent.put("tasks", "t-9", {"route": "route-42"}).n == len(before) + 1


def test_bad_input_raises_where_it_was_made(agent: Agent) -> None:
    with pytest.raises(WriteRefused), agent.transaction() as tx:
        tx.put("tasks", "o-1", {"route": "route-42"})
        tx.put("tasks", "o-2", {"no_such_field": 1})
    assert agent.pending() == []


def test_reads_inside_see_own_writes(agent: Agent) -> None:
    _bins(agent)
    with agent.transaction() as tx:
        tx.increment("inventory", "bin-a", "stock", -3)
        seen = tx.get("inventory", "bin-a")
        assert seen is not None and seen.fields["stock"] == 7
        assert tx.get("tasks", "o-1") is None
        tx.put("tasks", "o-1", {"route": "route-42", "status": "new"})
        inside = tx.get("tasks", "o-1")
        assert inside is not None and inside.fields["status"] == "new"
        # ... while the store outside the block does not see them yet.
        assert agent.get("tasks", "o-1") is None
        assert _stock(agent, "bin-a") == 10
        tx.delete("tasks", "o-1")
        assert tx.get("tasks", "o-1") is None
        gone = tx.get("tasks", "o-1", include_deleted=True)
        assert gone is not None and gone.deleted
    assert _stock(agent, "bin-a") == 7
    assert_views_consistent(agent)


def test_limits_and_misuse(agent: Agent) -> None:
    _bins(agent)
    with pytest.raises(WriteRefused, match="at most"), agent.transaction() as tx:
        for _ in range(MAX_TXN_OPS + 1):
            tx.increment("inventory", "bin-a", "stock", 1)
    assert _stock(agent, "bin-a") == 10
    big = {"photo": "x" * 50_000}
    with pytest.raises(WriteRefused, match="over the"), \
            agent.transaction() as tx:
        for i in range(3):
            tx.put("tasks", f"big-{i}", {"route": "route-42", "proof": big})
    assert agent.get("tasks", "big-0") is None
    tx = agent.transaction()
    with pytest.raises(TransactionError, match="inside its block"):
        tx.put("tasks", "o-1", {"route": "route-42"})
    with tx:
        pass
    with pytest.raises(TransactionError, match="runs once"), tx:
        pass
    with pytest.raises(TransactionError):
        tx.get("tasks", "o-1")


def test_single_change_transaction_is_a_plain_change(agent: Agent) -> None:
    with agent.transaction() as tx:
        tx.put("tasks", "o-1", {"route": "route-42"})
        tx.remove("tasks", "o-1", "labels", ["never-added"])  # unchanged: no change
    assert [r.state for r in tx.results] == ["pending", "unchanged"]
    assert "x" not in agent.pending()[0]


def test_kill_9_mid_transaction_leaves_none(tmp_path: Path, catalog: Catalog) -> None:
    """A real process killed with SIGKILL after every operation of a transaction was
    written inside the LMDB write transaction, before the commit: none of it survives,
    what was committed before does, and the store takes new writes."""
    data = tmp_path / "data"
    ready = tmp_path / "ready"
    out = kill_when_ready("txn_crasher.py", data, ready)
    before_n = int(out.split("before")[1].split()[0])
    with Agent.open(make_cfg(data), catalog) as agent:
        assert outbox_numbers(agent) == list(range(1, before_n + 1))
        assert agent.get("tasks", "t-before") is not None
        assert agent.get("tasks", "o-1") is None and agent.get("tasks", "o-1:line-1") is None
        assert _stock(agent, "bin-a") == 0 and _stock(agent, "bin-b") == 0
        assert_views_consistent(agent)
        assert agent.put("tasks", "after", {"route": "route-42"}).n == before_n + 1
    assert transaction._before_commit is None  # the hook is the child's alone
