"""Property: a filter means the same on both sides. After any mix of local writes on a
real agent store, sent to a real merge server (LMDB store), the device's local query,
the pure filter (`waystation.filters`) over the device's views, and the server's fetch
by query (PROTOCOL.md §7.14.1, followed page by page) name the same records."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import Agent
from agent.errors import WriteRefused
from agent.query.model import Query
from broker.server.engine import Engine
from schemas import wire
from schemas.collection import Catalog, example_catalog_path, load_catalog
from tests.agent.agentkit import FakeClock, make_cfg
from tests.agent.query.checks import all_pages, views
from tests.server.helpers import by_device, make_engine, of_type
from waystation.filters import compile_filter

CATALOG: Catalog = load_catalog(example_catalog_path())
SCOPE_OF = {"k1": "route-42", "k2": "route-42", "k3": "depot-7", "k4": "route-42",
            "k5": "depot-7"}
KEYS = tuple(SCOPE_OF)
STATUS = st.sampled_from(["out", "done", "Out", None])
ETA = st.sampled_from([None, -1, 0, 1, 2, 2.5, 3, 2**53 - 1, -(2**53) + 1])
CUSTOMER = st.sampled_from([None, "Ann", "Andy", "Bob", "", "an\x00x"])
MEMBER = st.sampled_from(["x", "y"])

ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS),
              st.fixed_dictionaries({}, optional={"status": STATUS, "eta": ETA,
                                                  "customer": CUSTOMER})),
    st.tuples(st.just("add"), st.sampled_from(KEYS), MEMBER),
    st.tuples(st.just("remove"), st.sampled_from(KEYS), MEMBER),
    st.tuples(st.just("delete"), st.sampled_from(KEYS), st.none()),
), max_size=25)


def _in(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.lists(values, min_size=1, max_size=3).map(lambda vs: {"in": vs})


def _range(values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(["gt", "gte", "lt", "lte"]), values,
                           min_size=1, max_size=2)


# Every number on the wire is in the 53-bit range (PROTOCOL.md §3): no 2**60 bound here.
ETA_BOUND = st.sampled_from([-1, 0, 1, 2, 2.5, 3, 2**53 - 1, 1e300])
wheres = st.one_of(
    st.builds(lambda s, e: {"status": s, **({"eta": e} if e else {})},
              st.one_of(STATUS.map(lambda v: {"eq": v}), _in(STATUS)),
              st.one_of(st.none(), _range(ETA_BOUND))),
    st.builds(lambda r, e: {"route": r, **({"eta": e} if e else {})},
              st.one_of(st.sampled_from(["route-42", "depot-7"]).map(lambda v: {"eq": v}),
                        _in(st.sampled_from(["route-42", "depot-7", "x"]))),
              st.one_of(st.none(), ETA.map(lambda v: {"eq": v}), _range(ETA_BOUND))),
    st.builds(lambda m: {"labels": {"eq": m}}, MEMBER),
    st.builds(lambda c: {"customer": c},
              st.one_of(CUSTOMER.map(lambda v: {"eq": v}), _in(CUSTOMER),
                        st.sampled_from(["A", "An", "", "an"]).map(lambda p: {"prefix": p}),
                        _range(st.sampled_from(["A", "Am", "B", "z"])))),
    st.just({}),
)


def _write(ag: Agent, op: str, k: str, arg: Any) -> None:
    try:
        if op == "put":
            ag.put("tasks", k, {"route": SCOPE_OF[k], **arg})
        elif op == "add":
            ag.add("tasks", k, "labels", [arg])
        elif op == "remove":
            ag.remove("tasks", k, "labels", [arg])
        elif op == "delete":
            ag.delete("tasks", k)
    except WriteRefused:
        pass  # e.g. a set change on a record this device does not hold


def _send_all(ag: Agent, engine: Engine) -> None:
    while True:
        batch = ag.sync.next_batch(max_changes=1000)
        if not batch:
            return
        out = by_device(engine.handle_up("van-1", batch.payload("van-1")))["van-1"]
        assert not of_type(out, "reject"), out
        for ack in of_type(out, "ack"):
            ag.sync.apply_ack(wire.Ack.model_validate(ack))


def _server_keys(engine: Engine, where: dict[str, Any], lim: int) -> list[str]:
    keys: list[str] = []
    after: str | None = None
    for i in range(100):
        req: dict[str, Any] = {"type": "fetchq", "v": 1, "dev": "van-1", "req": f"q-{i}",
                               "c": "tasks", "w": where, "lim": lim}
        if after is not None:
            req["after"] = after
        out = of_type(by_device(engine.handle_up("van-1", orjson.dumps(req)))["van-1"],
                      "fetchedq")
        keys += [r["k"] for m in out for r in m["recs"]]
        (end,) = [m for m in out if m["end"]]
        assert "err" not in end, end
        after = end.get("next")
        if after is None:
            return keys
    raise AssertionError("the server's cursor never reached the end")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(script=ops, checks=st.lists(wheres, min_size=1, max_size=5), lim=st.integers(1, 3))
def test_local_query_pure_filter_and_server_fetch_agree(
        script: list[tuple[str, str, Any]], checks: list[dict[str, Any]], lim: int) -> None:
    clock = FakeClock()
    with tempfile.TemporaryDirectory() as tmp:
        engine, _, _ = make_engine(Path(tmp) / "server",
                                   {"van-1": ["route-42", "depot-7"]})
        with Agent.open(make_cfg(Path(tmp) / "agent"), CATALOG, now_ms=clock) as ag:
            for op, k, arg in script:
                clock.advance(0.01)
                _write(ag, op, k, arg)
            _send_all(ag, engine)
            spec = CATALOG.collection("tasks")
            assert spec is not None
            held = [v for v in views(ag, "tasks") if not v.x]
            for where in checks:
                local = sorted(r.key for r in all_pages(
                    ag, {"collection": "tasks", "where": where}, 4))
                flt = compile_filter(spec, Query.model_validate(
                    {"collection": "tasks", "where": where}).where)
                pure = sorted(v.k for v in held if flt.matches(v.s, v.f))
                server = _server_keys(engine, where, lim)
                assert local == pure, (where, local, pure)
                assert server == pure, (where, server, pure)
