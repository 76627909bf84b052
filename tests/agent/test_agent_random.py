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
