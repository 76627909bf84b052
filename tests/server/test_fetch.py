"""Fetch by key (PROTOCOL.md §7.14): whole states of the device's records, bounded,
and nothing of other scopes; on every store backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from broker.server import fetch
from broker.server.engine import Engine
from broker.server.store.base import Store
from schemas import codec, wire
from tests.server.conftest import StoreFactory
from tests.server.helpers import by_device, changes, errors, make_engine, of_type, task

DEVICES = {"van-1": ["r1", "r2"], "van-2": ["r1"], "van-3": ["r3"]}


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory())
    yield engine, store


def _fetch(dev: str, keys: list[str], c: str = "tasks", req: str = "f-1") -> bytes:
    return orjson.dumps({"type": "fetch", "v": 1, "dev": dev, "req": req, "c": c, "k": keys})


def _ask(engine: Engine, dev: str, payload: bytes) -> list[dict[str, Any]]:
    return by_device(engine.handle_up(dev, payload)).get(dev, [])


def test_fetch_answers_whole_states_and_misses(env: tuple[Engine, Store]) -> None:
    """Found keys come back as whole record states; unknown keys and keys of scopes the
    device does not follow are `miss`, told apart by nothing."""
    engine, _ = env
    engine.handle_up("van-1", changes("van-1", [
        task(1, "t-1", "r1", status="delivered", notes="gate"),
        task(2, "t-2", "r2", status="out"),
        task(3, "t-3", "r1", op="del")]))
    engine.handle_up("van-3", changes("van-3", [task(1, "t-9", "r3", status="x")]))
    msgs = _ask(engine, "van-2", _fetch("van-2", ["t-1", "t-2", "t-3", "t-9", "nope", "t-1"]))
    (answer,) = of_type(msgs, "fetched")
    assert answer["req"] == "f-1" and answer["c"] == "tasks"
    got = {r["k"]: r for r in answer["recs"]}
    assert sorted(got) == ["t-1", "t-3"]
    assert got["t-1"]["f"] == {"route": "r1", "status": "delivered", "notes": "gate"}
    assert not got["t-1"].get("part") and got["t-3"]["x"] is True
    assert answer["miss"] == ["t-2", "t-9", "nope"]
    # Each answer is a valid wire message.
    assert isinstance(codec.decode(orjson.dumps(answer)), wire.Fetched)


@pytest.mark.parametrize("payload", [
    {"k": []},
    {"k": [f"k{i}" for i in range(101)]},
    {"k": "t-1"},
    {"k": ["a\u0000b"]},
    {"k": ["x" * 5000]},
    {"c": "Bad Name!"},
    {"req": ""},
    {"req": "r" * 65},
    {"k": [1, 2]},
])
def test_hostile_fetch_requests_are_refused(env: tuple[Engine, Store],
                                            payload: dict[str, Any]) -> None:
    """Too many keys, no key, bad keys, a bad collection or request id: an error answer
    (and a dead letter), no records."""
    engine, store = env
    msg = {"type": "fetch", "v": 1, "dev": "van-1", "req": "f-1", "c": "tasks", "k": ["t-1"],
           **payload}
    msgs = _ask(engine, "van-1", orjson.dumps(msg))
    assert of_type(msgs, "fetched") == []
    assert errors(msgs)
    with store.read() as txn:
        assert len(txn.dead_letters(10)) == 1


def test_fetch_as_another_device_is_refused(env: tuple[Engine, Store]) -> None:
    """A fetch naming another device than its topic's is refused like any message."""
    engine, _ = env
    msgs = _ask(engine, "van-2", _fetch("van-1", ["t-1"]))
    assert of_type(msgs, "fetched") == [] and errors(msgs)


def test_large_answers_are_split(env: tuple[Engine, Store]) -> None:
    """An answer over the size budget comes in several `fetched` with the same req, the
    misses in the last; every record once."""
    engine, store = env
    engine.handle_up("van-1", changes("van-1", [
        task(n, f"t-{n}", "r1", notes="x" * 1900) for n in range(1, 41)]))
    device = None
    with store.read() as txn:
        device = txn.get_device("van-1")
        assert device is not None
        req = wire.Fetch(dev="van-1", req="f-9", c="tasks",
                         k=[f"t-{n}" for n in range(1, 41)] + ["gone"])
        msgs, count = fetch.answer(txn, device, req, budget=16_000)
    assert count == 40 and len(msgs) > 2
    decoded = [codec.decode(m) for m in msgs]
    assert all(isinstance(m, wire.Fetched) and m.req == "f-9" for m in decoded)
    assert all(len(m) <= 16_000 for m in msgs)
    keys = [r.k for m in decoded for r in m.recs]  # type: ignore[attr-defined]
    assert sorted(keys) == sorted(f"t-{n}" for n in range(1, 41))
    assert [m.miss for m in decoded] == [[]] * (len(msgs) - 1) + [["gone"]]  # type: ignore[attr-defined]


def test_fetch_capability_is_agreed(env: tuple[Engine, Store]) -> None:
    """A device offering `fetch` in hello gets it in welcome."""
    engine, _ = env
    hello = orjson.dumps({"type": "hello", "v": 1, "dev": "van-1", "agent": "t", "sv": 1,
                          "caps": ["fetch", "txn"]})
    (welcome,) = of_type(_ask(engine, "van-1", hello), "welcome")
    assert "fetch" in welcome["caps"]
