"""Property: after any mix of local writes, acks, rejections, deltas, catch-up pages,
snapshots, resyncs and wipes on a real store, every query equals a brute-force filter
of the views, and every index holds exactly the entries the views imply."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import Agent
from agent.errors import WriteRefused
from schemas import wire
from schemas.collection import Catalog
from tests.agent.agentkit import FakeClock, make_cfg, rec
from tests.agent.query.checks import assert_indexes_consistent, assert_query_matches_reference

SCOPE_OF = {"k1": "route-42", "k2": "route-42", "k3": "depot-7", "k4": "route-42"}
KEYS = tuple(SCOPE_OF)
STATUS = st.sampled_from(["out", "done", "Out", None])
ETA = st.sampled_from([None, -1, 0, 1, 2, 2.5, 3, 2**53 - 1, -(2**53) + 1])
CUSTOMER = st.sampled_from([None, "Ann", "Andy", "Bob", "", "an\x00x"])
MEMBER = st.sampled_from(["x", "y"])

ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS),
              st.fixed_dictionaries({}, optional={"status": STATUS, "eta": ETA,
                                                  "customer": CUSTOMER})),
    st.tuples(st.just("incr"), st.sampled_from(KEYS), st.integers(-2, 2).filter(bool)),
    st.tuples(st.just("add"), st.sampled_from(KEYS), MEMBER),
    st.tuples(st.just("remove"), st.sampled_from(KEYS), MEMBER),
    st.tuples(st.just("delete"), st.sampled_from(KEYS), st.none()),
    st.tuples(st.just("ack"), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("reject"), st.booleans(), st.none()),
    st.tuples(st.just("delta"), st.sampled_from(KEYS),
              st.tuples(STATUS, ETA, st.lists(MEMBER, max_size=2, unique=True),
                        st.booleans())),
    st.tuples(st.just("snapshot"), st.lists(st.sampled_from(KEYS), unique=True), st.none()),
    st.tuples(st.just("resync"), st.none(), st.none()),
    st.tuples(st.just("wipe"), st.none(), st.none()),
), max_size=30)


def _in(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.lists(values, min_size=1, max_size=3).map(lambda vs: {"in": vs})


def _range(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(["gt", "gte", "lt", "lte"]), values,
                           min_size=1, max_size=2)


ETA_BOUND = st.sampled_from([-1, 0, 1, 2, 2.5, 3, 2**53 - 1, 2**60])
queries = st.one_of(
    st.builds(lambda s, e, d: {"where": {"status": s, **({"eta": e} if e else {})},
                               "order_by": "eta", "desc": d},
              st.one_of(STATUS, _in(STATUS)), st.one_of(st.none(), _range(ETA_BOUND)),
              st.booleans()),
    st.builds(lambda r, e: {"where": {"route": r, **({"eta": e} if e else {})}},
              st.one_of(st.sampled_from(["route-42", "depot-7"]),
                        _in(st.sampled_from(["route-42", "depot-7", "x"]))),
              st.one_of(st.none(), ETA, _range(ETA_BOUND))),
    st.builds(lambda m, d: {"where": {"labels": m}, "order_by": "eta", "desc": d},
              MEMBER, st.booleans()),
    st.builds(lambda c: {"where": {"customer": c}},
              st.one_of(CUSTOMER, _in(CUSTOMER), st.sampled_from(["A", "An", "", "an"]).map(
                  lambda p: {"prefix": p}), _range(st.sampled_from(["A", "Am", "B", "z"])))),
    st.builds(lambda d: {"order_by": "customer", "desc": d}, st.booleans()),
    st.just({}),
)


class Driver:
    """Plays a script against an agent, as the server and the daemon would."""

    def __init__(self, ag: Agent, clock: FakeClock) -> None:
        self.ag, self.clock = ag, clock
        self.q = {"route-42": 0, "depot-7": 0}
        self.tag = itertools.count(1)
        self.req = itertools.count(1)

    def run(self, op: str, a: Any, b: Any) -> None:
        ag = self.ag
        self.clock.advance(0.01)
        try:
            if op == "put":
                ag.put("tasks", a, {"route": SCOPE_OF[a], **b})
            elif op == "incr":
                ag.increment("tasks", a, "attempts", b)
            elif op == "add":
                ag.add("tasks", a, "labels", [b])
            elif op == "remove":
                ag.remove("tasks", a, "labels", [b])
            elif op == "delete":
                ag.delete("tasks", a)
        except WriteRefused:
            pass  # e.g. deleting a record this device does not hold
        if op == "ack":
            batch = ag.sync.next_batch(max_changes=a)
            ok = []
            for _, ch in batch:
                ok.append((ch["n"], ch["s"], self._next_q(ch["s"])))
            ag.sync.apply_ack(wire.Ack(ok=ok))
            if b:
                ag.sync.apply_ack(wire.Ack(ok=ok))
        elif op == "reject":
            batch = ag.sync.next_batch(max_changes=1)
            if batch:
                ag.sync.apply_reject(wire.Reject(rj=[wire.Rejection(
                    n=batch.numbers[0], code="rule_rejected", reason="r", perm=a)]))
        elif op == "delta":
            ag.sync.apply_delta(wire.Delta(d=[self._remote(a, *b)]))
        elif op == "snapshot":
            req = f"c-{next(self.req)}"
            ag.sync.catchup_request(req)
            for scope in ("route-42", "depot-7"):
                recs = [self._remote(k, "done", 1, [], False) for k in a if SCOPE_OF[k] == scope]
                to = self.q[scope]
                ag.sync.apply_page(wire.Page.model_validate(
                    {"req": req, "s": scope, "from": 0, "to": to, "reset": True,
                     "more": False, "recs": recs}))
                ag.sync.apply_checkpoint(wire.Checkpoint(req=req, cp={scope: self.q[scope]}))
        elif op == "resync":
            ag.sync.execute_command(wire.Command(id=f"cmd-{next(self.req)}", cmd=op))
        elif op == "wipe":
            ag.wipe(f"cmd-{next(self.req)}")
            self.q = {s: 0 for s in self.q}

    def _next_q(self, scope: str) -> int:
        self.q[scope] += 1
        return self.q[scope]

    def _remote(self, k: str, status: Any, eta: Any, labels: list[str],
                deleted: bool) -> wire.Rec:
        scope = SCOPE_OF[k]
        q = self._next_q(scope)
        if deleted:
            return rec(k, q, {}, s=scope, part=True, x=True,
                       xh=f"{0x0190_0000_0000 + q:012x}0000:van-7")
        tags = {m: [f"van-7:{next(self.tag)}"] for m in labels}
        return rec(k, q, {"route": scope, "status": status, "eta": eta, "labels": labels},
                   s=scope, part=True, t={"labels": tags})


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(script=ops, checks=st.lists(queries, min_size=1, max_size=6),
       include_deleted=st.booleans(), limit=st.integers(1, 4))
def test_queries_equal_brute_force_after_any_sync_history(
        catalog: Catalog, script: list[tuple[str, Any, Any]], checks: list[dict[str, Any]],
        include_deleted: bool, limit: int) -> None:
    """Every query equals the brute-force filter of the views and no index entry is
    missing or stale, whatever the history of writes and server messages."""
    clock = FakeClock()
    with tempfile.TemporaryDirectory() as tmp, \
            Agent.open(make_cfg(Path(tmp)), catalog, now_ms=clock) as ag:
        driver = Driver(ag, clock)
        for step in script:
            driver.run(*step)
        assert_indexes_consistent(ag)
        for query in checks:
            assert_query_matches_reference(
                ag, {"collection": "tasks", "include_deleted": include_deleted, **query},
                limit)
