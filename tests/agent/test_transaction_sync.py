"""How a device transaction travels: never split across batches (a property test over
random outboxes and limits), marked `tx` only when the server negotiated `txn`, and
rolled back as one when the server refuses a change of it."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import Agent
from schemas import wire
from schemas.collection import Catalog, example_catalog_path, load_catalog
from tests.agent.agentkit import FakeClock, assert_views_consistent, make_cfg

S = "route-42"
CATALOG: Catalog = load_catalog(example_catalog_path())

# A plan: units of (priority, size); size 1 is a plain write, more is a transaction.
plans = st.lists(st.tuples(st.integers(0, 2), st.integers(1, 5)), min_size=1, max_size=12)


def _write(agent: Agent, plan: list[tuple[int, int]]) -> list[list[int]]:
    """Write the plan; returns each transaction's change numbers (plain writes: one)."""
    units: list[list[int]] = []
    for u, (priority, size) in enumerate(plan):
        if size == 1:
            units.append([agent.put("tasks", f"p-{u}", {"route": S, "notes": "x" * 50},
                                    priority=priority).n or 0])
            continue
        with agent.transaction(priority=priority) as tx:
            for i in range(size):
                tx.put("tasks", f"t-{u}-{i}", {"route": S, "notes": "y" * 50})
        units.append([r.n or 0 for r in tx.results])
    return units


@given(plan=plans, max_changes=st.integers(1, 8), max_bytes=st.integers(300, 2000),
       txn=st.booleans(), in_flight=st.sets(st.integers(0, 11), max_size=3))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_batches_never_split_a_transaction(plan: list[tuple[int, int]], max_changes: int,
                                           max_bytes: int, txn: bool,
                                           in_flight: set[int]) -> None:
    """Draining with any limits and any units in flight: every pending change is sent
    exactly once, a transaction's changes all in one batch, next to each other and in
    n order, in drain order (priority, then n); a unit partly in flight is held back
    whole; `tx` markers only with `txn`, and right."""
    root = Path(tempfile.mkdtemp(prefix="ws-txs-"))
    try:
        with Agent.open(make_cfg(root / "data"), CATALOG, now_ms=FakeClock()) as agent:
            units = _write(agent, plan)
            prio = {n: plan[u][0] for u, ns in enumerate(units) for n in ns}
            unit_of = {n: u for u, ns in enumerate(units) for n in ns}
            held = {n for u in in_flight if u < len(units) for n in units[u][:1]}
            excluded = set(held)
            sent: list[list[int]] = []
            while True:
                batch = agent.sync.next_batch(excluded, max_changes, max_bytes, txn=txn)
                if not batch:
                    break
                sent.append(batch.numbers)
                if len(batch.payload("van-1")) > max_bytes:  # only a unit alone goes over
                    assert len({unit_of[n] for n in batch.numbers}) == 1
                excluded.update(batch.numbers)
                for n, ch in batch:
                    wire.Change.model_validate(ch)
                    tx_units = len(units[unit_of[n]]) > 1
                    if txn and tx_units:
                        size = len(units[unit_of[n]])
                        assert ch["tx"] == [units[unit_of[n]][0], size]
                    else:
                        assert "tx" not in ch
                wire.Changes.model_validate_json(batch.payload("van-1"))
            flat = [n for numbers in sent for n in numbers]
            held_units = {unit_of[n] for n in held}
            expected = {n for u, ns in enumerate(units) if u not in held_units for n in ns}
            assert sorted(flat) == sorted(expected) and len(flat) == len(set(flat))
            for numbers in sent:
                for u in {unit_of[n] for n in numbers}:
                    mine = [n for n in numbers if unit_of[n] == u]
                    assert mine == units[u], "a transaction was split or reordered"
                    at = numbers.index(mine[0])
                    assert numbers[at:at + len(mine)] == mine, "not next to each other"
                over = len(numbers) > max_changes
                assert not over or len({unit_of[n] for n in numbers}) == 1
            for numbers in sent:  # within a batch: drain order
                keys = [(-prio[n], n) for n in numbers]
                assert keys == sorted(keys)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_one_refused_change_rolls_back_the_whole_transaction(agent: Agent) -> None:
    """The server refuses one change of a transaction (with or without naming the
    others): every change of it leaves the outbox for the dead letters, in one local
    transaction, and the view drops all its writes."""
    agent.put("tasks", "keep", {"route": S, "status": "kept"})
    with agent.transaction() as tx:
        tx.put("tasks", "o-1", {"route": S, "status": "ordered"})
        tx.put("tasks", "o-1:1", {"route": S, "notes": "2 x A"})
        tx.add("tasks", "keep", "labels", ["has-order"])
    first = tx.results[0].n
    assert first == 2
    position = agent.feed_position()
    # A server without `txn` refuses just the one change (rule_rejected).
    result = agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
        n=3, code="rule_rejected", reason="a line needs a sku", perm=True)]))
    assert sorted(result.dead) == [2, 3, 4]
    assert [e["ch"]["n"] for e in agent.pending()] == [1]
    assert agent.get("tasks", "o-1") is None and agent.get("tasks", "o-1:1") is None
    keep = agent.get("tasks", "keep")
    assert keep is not None and "labels" not in keep.fields
    letters = {d.n: d for d in agent.dead_letters()}
    assert letters[3].code == "rule_rejected"
    for n in (2, 4):
        assert letters[n].code == "txn_aborted"
        assert "van-1:2 was rejected as a whole" in letters[n].reason
        assert "van-1:3" in letters[n].reason and "a line needs a sku" in letters[n].reason
    assert {d.transaction for d in letters.values()} == {"van-1:2"}
    events = agent.feed_after(position)
    rejected = [e for e in events if e.kind == "rejected"]
    assert len(rejected) == 3
    assert all(e.data["transaction"] == "van-1:2" for e in rejected)
    assert_views_consistent(agent)
    # The server's own txn_aborted answers for the others change nothing more.
    again = agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
        n=n, code="txn_aborted", reason="x", perm=True) for n in (2, 4)]))
    assert again.ignored == [2, 4]


def test_transient_refusal_keeps_the_transaction_whole(agent: Agent) -> None:
    with agent.transaction() as tx:
        tx.put("tasks", "o-1", {"route": S})
        tx.put("tasks", "o-2", {"route": S})
    result = agent.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
        n=1, code="schema_version", reason="later", perm=False)]))
    assert result.transient == [1] and result.dead == []
    assert [e["ch"]["n"] for e in agent.pending()] == [1, 2]
    batch = agent.sync.next_batch(txn=True)
    assert batch.numbers == [1, 2]
    # Partly in flight: held back whole.
    assert agent.sync.next_batch({1}, txn=True).numbers == []


def test_before_the_welcome_nothing_overtakes_a_transaction(agent: Agent) -> None:
    """Until the server said whether it applies transactions whole (txn=None), the
    drain stops at the first transaction: plain changes before it go, none after it."""
    agent.put("tasks", "p-1", {"route": S})
    with agent.transaction() as tx:
        tx.put("tasks", "o-1", {"route": S})
        tx.put("tasks", "o-2", {"route": S})
    agent.put("tasks", "p-2", {"route": S})
    assert agent.sync.next_batch(txn=None).numbers == [1]
    assert agent.sync.next_batch({1}, txn=None).numbers == []
    marked = agent.sync.next_batch({1}, txn=True)
    assert marked.numbers == [2, 3, 4] and [ch.get("tx") for _, ch in marked] == [
        [2, 2], [2, 2], None]
    plain = agent.sync.next_batch({1}, txn=False)
    assert plain.numbers == [2, 3, 4] and all("tx" not in ch for _, ch in plain)
