"""Random interleavings of local writes and server messages on a real store."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import Agent
from agent.errors import WriteRefused
from schemas import wire
from schemas.collection import Catalog
from tests.agent.agentkit import FakeClock, assert_views_consistent, make_cfg, rec

S = "route-42"
KEYS = ("k1", "k2")

ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.sampled_from(["a", "b", None])),
    st.tuples(st.just("incr"), st.sampled_from(KEYS), st.integers(-3, 3).filter(bool)),
    st.tuples(st.just("add"), st.sampled_from(KEYS), st.sampled_from("xyz")),
    st.tuples(st.just("remove"), st.sampled_from(KEYS), st.sampled_from("xyz")),
    st.tuples(st.just("delete"), st.sampled_from(KEYS), st.none()),
    st.tuples(st.just("ack"), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("reject"), st.booleans(), st.none()),
    st.tuples(st.just("delta"), st.sampled_from(KEYS), st.sampled_from(["p", "q"])),
), max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=ops)
def test_views_always_equal_base_plus_pending(catalog: Catalog,
                                              script: list[tuple[str, Any, Any]]) -> None:
    """After any mix of writes, acks (duplicated), rejects and deltas, every stored view
    equals its base with its pending changes on top, and status counts match."""
    clock = FakeClock()
    with tempfile.TemporaryDirectory() as tmp, \
            Agent.open(make_cfg(Path(tmp)), catalog, now_ms=clock) as ag:
        q = 0
        for op, a, b in script:
            clock.advance(0.01)
            try:
                if op == "put":
                    ag.put("tasks", a, {"route": S, "status": b})
                elif op == "incr":
                    ag.increment("tasks", a, "attempts", b)
                elif op == "add":
                    ag.add("tasks", a, "labels", [b])
                elif op == "remove":
                    ag.remove("tasks", a, "labels", [b])
                elif op == "delete":
                    ag.delete("tasks", a)
            except WriteRefused:
                pass  # e.g. increment before the record exists
            if op == "ack":
                batch = ag.sync.next_batch(max_changes=a)
                ok = []
                for n, _ in batch:
                    q += 1
                    ok.append((n, S, q))
                message = wire.Ack(ok=ok)
                ag.sync.apply_ack(message)
                if b:
                    ag.sync.apply_ack(message)
            elif op == "reject":
                batch = ag.sync.next_batch(max_changes=1)
                if batch:
                    ag.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
                        n=batch.numbers[0], code="rule_rejected", reason="r", perm=a)]))
            elif op == "delta":
                q += 1
                ag.sync.apply_delta(wire.Delta(d=[rec(a, q, {"notes": b}, part=True)]))
        assert_views_consistent(ag)
        assert ag.status().checkpoints[S] == q


# ------------------------------------------------- an independent oracle (no compute_view)


class Model:
    """What a user of the device should see, kept by hand from the writes it made: each
    record's fields are its local writes replayed in order, minus those the server
    refused for good. No merge code from the product is used. (Set fields are left to
    the property tests of the merge rules: their acked state needs the server's add-tags.)
    """

    def __init__(self) -> None:
        self.writes: list[tuple[int, str, str, Any]] = []   # (n, key, op, argument)
        self.refused: set[int] = set()
        self.acked: set[int] = set()

    def view(self, key: str) -> dict[str, Any]:
        fields: dict[str, Any] = {"route": S, "status": "new", "attempts": 0}
        for n, k, op, arg in self.writes:
            if k != key or n in self.refused:
                continue
            if op == "put":
                fields["status"] = arg
            elif op == "incr":
                fields["attempts"] += arg
        return fields

    def acked_total(self, key: str) -> int:
        """The counter total the server holds: the increments it applied (acked)."""
        return sum(arg for n, k, op, arg in self.writes
                   if k == key and op == "incr" and n in self.acked)

    def pending(self) -> int:
        return sum(1 for n, *_ in self.writes if n not in self.refused | self.acked)


def _seen(ag: Agent, key: str) -> dict[str, Any]:
    record = ag.get("tasks", key)
    assert record is not None, key
    f = record.fields
    return {"route": f.get("route"), "status": f.get("status"),
            "attempts": f.get("attempts") or 0}


model_ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.sampled_from(["a", "b", "c"])),
    st.tuples(st.just("incr"), st.sampled_from(KEYS), st.integers(-3, 3).filter(bool)),
    st.tuples(st.just("ack"), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("reject"), st.booleans(), st.none()),
), max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=model_ops)
def test_views_match_an_independent_model(catalog: Catalog,
                                          script: list[tuple[str, Any, Any]]) -> None:
    """After any mix of writes, duplicated acks and rejections (for good or to retry),
    each record reads as the hand-kept model says, and the outbox holds exactly the
    writes neither acked nor refused."""
    clock = FakeClock()
    model = Model()
    with tempfile.TemporaryDirectory() as tmp, \
            Agent.open(make_cfg(Path(tmp)), catalog, now_ms=clock) as ag:
        for key in KEYS:   # records exist on the server before the script starts
            ag.put("tasks", key, {"route": S, "status": "new"})
        q = 0
        first = ag.sync.next_batch(max_changes=10)
        ok = []
        for n, _ in first:
            q += 1
            ok.append((n, S, q))
        ag.sync.apply_ack(wire.Ack(ok=ok))
        for op, a, b in script:
            clock.advance(0.01)
            if op in ("put", "incr"):
                if op == "put":
                    result = ag.put("tasks", a, {"status": b})
                else:
                    result = ag.increment("tasks", a, "attempts", b)
                if result.state == "pending":
                    assert result.n is not None
                    model.writes.append((result.n, a, op, b))
            elif op == "ack":
                batch = ag.sync.next_batch(max_changes=a)
                ok = []
                last_q: dict[str, int] = {}
                for n, ch in batch:
                    q += 1
                    ok.append((n, S, q))
                    model.acked.add(n)
                    if ch.get("i"):
                        last_q[ch["k"]] = q
                # counter totals come from the server in the ack's fx states (§7.4)
                fx = [rec(k, kq, {"attempts": model.acked_total(k)}, part=True)
                      for k, kq in last_q.items()]
                message = wire.Ack(ok=ok, fx=fx)
                ag.sync.apply_ack(message)
                if b:
                    ag.sync.apply_ack(message)
            else:
                batch = ag.sync.next_batch(max_changes=1)
                if batch:
                    n = batch.numbers[0]
                    ag.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
                        n=n, code="rule_rejected", reason="r", perm=a)]))
                    if a:
                        model.refused.add(n)
            for key in KEYS:
                assert _seen(ag, key) == model.view(key), (key, model.writes, model.refused)
            assert len(ag.pending()) == model.pending()
        assert sorted(d.n for d in ag.dead_letters()) == sorted(model.refused)
