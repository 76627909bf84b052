"""Fetch by query (PROTOCOL.md §7.14.1): the matching live records of the device's scopes,
bounded by a limit and a scan budget, with a cursor to go on; on every store backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from broker.server import fetch_query
from broker.server.engine import Engine
from broker.server.fetch_query import QueryLimits
from broker.server.registry import set_enabled
from broker.server.store.base import Store
from schemas import codec, wire
from tests.server.conftest import StoreFactory
from tests.server.helpers import CATALOG, by_device, changes, errors, make_engine, of_type, task

DEVICES = {"van-1": ["r1", "r2"], "van-2": ["r1"], "van-3": ["r3"]}


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory(),
                                   fetch_query_scan_budget=1000)
    yield engine, store


def _q(dev: str, w: dict[str, Any], *, c: str = "tasks", req: str = "q-1", lim: int = 100,
       after: str | None = None) -> bytes:
    msg: dict[str, Any] = {"type": "fetchq", "v": 1, "dev": dev, "req": req, "c": c, "w": w,
                           "lim": lim}
    if after is not None:
        msg["after"] = after
    return orjson.dumps(msg)


def _ask(engine: Engine, dev: str, payload: bytes) -> list[dict[str, Any]]:
    return by_device(engine.handle_up(dev, payload)).get(dev, [])


def _keys(msgs: list[dict[str, Any]]) -> list[str]:
    return [r["k"] for m in of_type(msgs, "fetchedq") for r in m["recs"]]


def _end(msgs: list[dict[str, Any]]) -> dict[str, Any]:
    (last,) = [m for m in of_type(msgs, "fetchedq") if m["end"]]
    return last


def _labelled(ch: dict[str, Any], *members: str) -> dict[str, Any]:
    return {**ch, "a": {"labels": list(members)}}


def _seed(engine: Engine) -> None:
    engine.handle_up("van-1", changes("van-1", [
        _labelled(task(1, "t-1", "r1", status="delivered", eta=10), "fragile"),
        task(2, "t-2", "r1", status="out", eta=20),
        task(3, "t-3", "r2", status="delivered", eta=30),
        task(4, "t-4", "r1", status="delivered", eta=40),
        task(5, "t-5", "r1", status="delivered", eta=50),
        _labelled(task(6, "t-6", "r1", status="delivered", eta=60), "cold", "fragile")]))
    engine.handle_up("van-1", changes("van-1", [task(7, "t-5", "r1", op="del")]))
    engine.handle_up("van-3", changes("van-3", [task(1, "t-7", "r3", status="delivered")]))


def test_answers_matching_live_records_of_the_devices_scopes(env: tuple[Engine, Store]) -> None:
    """Only matching, live records of the device's own scopes, whole, in key order; the
    answer is a valid wire message that says the collection was read to its end."""
    engine, _ = env
    _seed(engine)
    msgs = _ask(engine, "van-2", _q("van-2", {"status": {"eq": "delivered"}}))
    assert _keys(msgs) == ["t-1", "t-4", "t-6"]
    end = _end(msgs)
    assert end["req"] == "q-1" and end["c"] == "tasks"
    assert "next" not in end and "stop" not in end and end["scanned"] == 7
    rec = of_type(msgs, "fetchedq")[0]["recs"][0]
    assert rec["f"]["status"] == "delivered" and not rec.get("part")
    assert isinstance(codec.decode(orjson.dumps(end)), wire.FetchedQuery)
    # van-1 follows r2 as well.
    assert _keys(_ask(engine, "van-1", _q("van-1", {"status": {"eq": "delivered"}}))) == [
        "t-1", "t-3", "t-4", "t-6"]


@pytest.mark.parametrize(("where", "expected"), [
    ({}, ["t-1", "t-2", "t-4", "t-6"]),
    ({"eta": {"gte": 20, "lt": 60}}, ["t-2", "t-4"]),
    ({"status": {"in": ["out", "x"]}}, ["t-2"]),
    ({"labels": {"eq": "fragile"}}, ["t-1", "t-6"]),
    ({"notes": {"eq": None}}, ["t-1", "t-2", "t-4", "t-6"]),
    ({"status": {"prefix": "deliv"}, "eta": {"gt": 10}}, ["t-4", "t-6"]),
    ({"$scope": {"eq": "r1"}}, ["t-1", "t-2", "t-4", "t-6"]),
    ({"$scope": {"eq": "r3"}}, []),
])
def test_filter_operators(env: tuple[Engine, Store], where: dict[str, Any],
                          expected: list[str]) -> None:
    engine, _ = env
    _seed(engine)
    assert _keys(_ask(engine, "van-2", _q("van-2", where))) == expected


def test_limit_pages_with_a_cursor(env: tuple[Engine, Store]) -> None:
    """`lim` records, `stop: limit` and `next`; following `next` pages through every
    match exactly once."""
    engine, _ = env
    engine.handle_up("van-1", changes("van-1", [
        task(n, f"t-{n:03d}", "r1", status="delivered" if n % 3 else "out")
        for n in range(1, 61)]))
    seen: list[str] = []
    after: str | None = None
    for _ in range(20):
        msgs = _ask(engine, "van-2", _q("van-2", {"status": {"eq": "delivered"}}, lim=7,
                                        after=after))
        seen += _keys(msgs)
        end = _end(msgs)
        if "next" not in end:
            break
        assert end["stop"] == "limit"
        after = end["next"]
    assert seen == [f"t-{n:03d}" for n in range(1, 61) if n % 3]


def test_scan_budget_stops_early_and_resumes(env: tuple[Engine, Store]) -> None:
    """A filter that matches little makes the server stop at its budget with `stop:
    budget` and a cursor past what it read; resuming finds the rest."""
    engine, _ = env
    engine.handle_up("van-1", changes("van-1", [
        task(n, f"t-{n:04d}", "r1", status="out") for n in range(1, 1001)]))
    engine.handle_up("van-1", changes("van-1", [
        task(1001, "t-9999", "r1", status="delivered")]))
    msgs = _ask(engine, "van-2", _q("van-2", {"status": {"eq": "delivered"}}))
    end = _end(msgs)
    assert _keys(msgs) == [] and end["stop"] == "budget" and end["scanned"] == 1000
    assert end["next"] == "t-1000"
    msgs = _ask(engine, "van-2", _q("van-2", {"status": {"eq": "delivered"}},
                                    after=end["next"]))
    assert _keys(msgs) == ["t-9999"] and "next" not in _end(msgs)


def test_server_caps_the_limit(tmp_path: Path, store_factory: StoreFactory) -> None:
    engine, _, _ = make_engine(tmp_path, DEVICES, store=store_factory(),
                               fetch_query_max_records=5)
    engine.handle_up("van-1", changes("van-1", [
        task(n, f"t-{n:02d}", "r1", status="out") for n in range(1, 21)]))
    msgs = _ask(engine, "van-2", _q("van-2", {}, lim=1000))
    assert _keys(msgs) == [f"t-{n:02d}" for n in range(1, 6)]
    assert _end(msgs)["stop"] == "limit" and _end(msgs)["next"] == "t-05"


@pytest.mark.parametrize(("where", "code"), [
    ({"nope": {"eq": 1}}, "unknown_field"),
    ({"eta": {"eq": "soon"}}, "bad_query"),
    ({"proof": {"eq": "x"}}, "bad_query"),
    ({"labels": {"gt": "a"}}, "bad_query"),
    ({"eta": {"gt": 1, "lt": "z"}}, "bad_query"),
])
def test_filters_the_schema_cannot_evaluate_get_err(env: tuple[Engine, Store],
                                                    where: dict[str, Any], code: str) -> None:
    engine, _ = env
    _seed(engine)
    msgs = _ask(engine, "van-2", _q("van-2", where))
    end = _end(msgs)
    assert _keys(msgs) == [] and end["err"]["code"] == code and end["err"]["reason"]


def test_set_field_err_shows_the_filter_a_fetchq_takes(env: tuple[Engine, Store]) -> None:
    """The bad_query reason for a set field names the form the wire takes (§7.14.1: a
    field's conditions are an object), and that form is answered without err."""
    engine, _ = env
    _seed(engine)
    reason = _end(_ask(engine, "van-2", _q("van-2", {"labels": {"gt": "a"}})))["err"]["reason"]
    assert '{"labels": {"eq": "member"}}' in reason, reason
    assert "err" not in _end(_ask(engine, "van-2", _q("van-2", {"labels": {"eq": "member"}})))


def test_unknown_collection_gets_err(env: tuple[Engine, Store]) -> None:
    engine, _ = env
    end = _end(_ask(engine, "van-2", _q("van-2", {}, c="nothing_here")))
    assert end["err"]["code"] == "unknown_collection"


@pytest.mark.parametrize("payload", [
    {"lim": 0},
    {"lim": 1001},
    {"lim": "5"},
    {"w": {f"f{i}": {"eq": 1} for i in range(17)}},
    {"w": {"eta": {"eq": {"nested": {"deep": [1, [2, [3]]]}}}}},
    {"w": {"eta": {"in": list(range(257))}}},
    {"w": {"eta": {"in": []}}},
    {"w": {"eta": {"gt": 2**60}}},
    {"w": {"eta": {}}},
    {"w": {"eta": {"ne": 1}}},
    {"w": {"eta": {"gt": None}}},
    {"w": {"eta": [1, 2]}},
    {"w": {"bad name": {"eq": 1}}},
    {"w": {"notes": {"eq": "x" * 5000}}},
    {"w": "status = 'x'"},
    {"after": ""},
    {"after": "a\u0000b"},
    {"after": "x" * 5000},
    {"after": 17},
    {"c": "Bad Name!"},
    {"req": ""},
])
def test_hostile_requests_are_refused(env: tuple[Engine, Store],
                                      payload: dict[str, Any]) -> None:
    """Malformed, oversized or unknown-operator filters, bad limits and garbage cursors:
    an error answer (and a dead letter), no records, no scan."""
    engine, store = env
    _seed(engine)
    msg = {"type": "fetchq", "v": 1, "dev": "van-2", "req": "q-1", "c": "tasks", "w": {},
           **payload}
    msgs = _ask(engine, "van-2", orjson.dumps(msg))
    assert of_type(msgs, "fetchedq") == []
    assert errors(msgs)
    with store.read() as txn:
        assert len(txn.dead_letters(10)) == 1


def test_a_device_cannot_read_another_scope(env: tuple[Engine, Store]) -> None:
    """Naming a scope it does not follow matches nothing; posing as another device is
    refused like any message."""
    engine, _ = env
    _seed(engine)
    assert _keys(_ask(engine, "van-2", _q("van-2", {"$scope": {"in": ["r2", "r3"]}}))) == []
    msgs = _ask(engine, "van-2", _q("van-1", {}))
    assert of_type(msgs, "fetchedq") == [] and errors(msgs)


def test_large_answers_are_split(env: tuple[Engine, Store]) -> None:
    """An answer over the size budget comes in several `fetchedq` with the same req; only
    the last says `end`; every record once."""
    engine, store = env
    engine.handle_up("van-1", changes("van-1", [
        task(n, f"t-{n:02d}", "r1", notes="x" * 1900) for n in range(1, 41)]))
    with store.read() as txn:
        device = txn.get_device("van-1")
        assert device is not None
        req = wire.FetchQuery(dev="van-1", req="q-9", c="tasks", w={}, lim=100)
        ans = fetch_query.answer(txn, device, req, CATALOG, QueryLimits(), budget=16_000)
    assert ans.records == 40 and len(ans.messages) > 2
    decoded = [codec.decode(m) for m in ans.messages]
    assert all(isinstance(m, wire.FetchedQuery) and m.req == "q-9" for m in decoded)
    assert all(len(m) <= 16_000 for m in ans.messages)
    assert [m.end for m in decoded] == [False] * (len(decoded) - 1) + [True]  # type: ignore[attr-defined]
    keys = [r.k for m in decoded for r in m.recs]  # type: ignore[attr-defined]
    assert keys == [f"t-{n:02d}" for n in range(1, 41)]


def test_fetch_query_capability_is_agreed(env: tuple[Engine, Store]) -> None:
    engine, _ = env
    hello = orjson.dumps({"type": "hello", "v": 1, "dev": "van-1", "agent": "t", "sv": 1,
                          "caps": ["fetch", "fetch_query"]})
    (welcome,) = of_type(_ask(engine, "van-1", hello), "welcome")
    assert "fetch_query" in welcome["caps"]


def test_disabled_device_gets_no_records(env: tuple[Engine, Store]) -> None:
    engine, store = env
    _seed(engine)
    set_enabled(store, "van-2", False)
    msgs = _ask(engine, "van-2", _q("van-2", {}))
    assert of_type(msgs, "fetchedq") == [] and errors(msgs)[0]["code"] == "device_disabled"


def test_a_device_without_the_capability_is_not_offered_it(env: tuple[Engine, Store]) -> None:
    """A device offering only older features is not told of `fetch_query`; a v1 device
    (no caps) gets no welcome at all, and its catch-up is answered as before."""
    engine, _ = env
    _seed(engine)
    hello = orjson.dumps({"type": "hello", "v": 1, "dev": "van-2", "agent": "t", "sv": 1,
                          "caps": ["fetch", "txn"]})
    (welcome,) = of_type(_ask(engine, "van-2", hello), "welcome")
    assert "fetch_query" not in welcome["caps"] and "fetch" in welcome["caps"]
    v1 = orjson.dumps({"type": "hello", "v": 1, "dev": "van-2", "agent": "t", "sv": 1})
    assert of_type(_ask(engine, "van-2", v1), "welcome") == []
    catchup = orjson.dumps({"type": "catchup", "v": 1, "dev": "van-2", "req": "c-1",
                            "cp": {"r1": 0}})
    msgs = _ask(engine, "van-2", catchup)
    assert sorted(r["k"] for m in of_type(msgs, "page") for r in m["recs"]) == [
        "t-1", "t-2", "t-4", "t-5", "t-6"]
    assert of_type(msgs, "checkpoint") and of_type(msgs, "fetchedq") == []


def test_a_device_asking_again_and_again_gets_smaller_scans(
        tmp_path: Path, store_factory: StoreFactory) -> None:
    """Each device's scans are paid from its own allowance (burst 4 x the budget, then
    `fetch_query_scan_rate` records a second): past it a request reads MIN_SCAN records
    and says `stop: budget` with a cursor; the other devices are not affected; time
    refills it."""
    engine, _, clock = make_engine(tmp_path, DEVICES, store=store_factory(),
                                   fetch_query_scan_budget=1000, fetch_query_scan_rate=100)
    for start in range(0, 3000, 1000):
        engine.handle_up("van-1", changes("van-1", [
            task(n, f"t-{n:04d}", "r1", status="out") for n in range(start + 1, start + 1001)]))
    rare = {"status": {"eq": "delivered"}}
    scans = [_end(_ask(engine, "van-2", _q("van-2", rare)))["scanned"] for _ in range(6)]
    assert scans == [1000, 1000, 1000, 1000, fetch_query.MIN_SCAN, fetch_query.MIN_SCAN]
    end = _end(_ask(engine, "van-2", _q("van-2", rare)))
    assert end["stop"] == "budget" and end["next"] == f"t-{fetch_query.MIN_SCAN:04d}"
    assert _end(_ask(engine, "van-1", _q("van-1", rare)))["scanned"] == 1000
    clock.now += 10_000  # 10 s at 100 records a second
    assert _end(_ask(engine, "van-2", _q("van-2", rare)))["scanned"] == 1000
