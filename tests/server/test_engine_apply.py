"""Applying changes: exactly once, contiguous sequences, deltas, conflicts, group commit."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from broker.server.engine import Engine
from broker.server.store.base import Store, WriteTxn
from tests.server.conftest import StoreFactory, reopen
from tests.server.helpers import (
    T0,
    by_device,
    changes,
    decode,
    hello,
    hp,
    make_engine,
    of_type,
    oks,
    rejections,
    status,
    task,
)
from waystation import merge

T = TypeVar("T")
DEVICES = {"van-1": ["r1"], "van-2": ["r1"], "van-3": ["r1", "r2"], "van-4": ["r2"]}


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    """An engine over a fresh store of each backend."""
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory())
    yield engine, store


def _record(store: Store, key: str, c: str = "tasks") -> merge.RecordState | None:
    with store.read() as txn:
        raw = txn.get_record(c, key)
    return None if raw is None else merge.from_json(raw)


def _online(engine: Engine, *devs: str) -> None:
    for dev in devs:
        engine.handle_status(dev, status(dev))


def test_same_batch_three_times_applies_once(env: tuple[Engine, Store]) -> None:
    """A batch delivered 3 times is applied once and acked 3 times with the same q."""
    engine, store = env
    batch = changes("van-1", [task(1, "t", status="a"),
                              {"n": 2, "h": hp(T0 + 5), "c": "tasks", "k": "t", "s": "r1",
                               "op": "put", "i": {"attempts": 1}}])
    acks = [oks(by_device(engine.handle_up("van-1", batch))["van-1"]) for _ in range(3)]
    assert acks == [[[1, "r1", 1], [2, "r1", 2]]] * 3
    rec = _record(store, "t")
    assert rec is not None and rec.value("attempts") == 1 and rec.q == 2
    with store.read() as txn:
        assert txn.scope_seq("r1") == 2


def test_duplicate_ack_carries_whole_record(env: tuple[Engine, Store]) -> None:
    """A re-acked duplicate brings the whole current record in fx (§7.4)."""
    engine, _ = env
    batch = changes("van-1", [task(1, "t", status="a")])
    first = by_device(engine.handle_up("van-1", batch))["van-1"][0]
    assert "fx" not in first  # its own value won: nothing to echo
    engine.handle_up("van-2", changes("van-2", [task(1, "t", h=hp(T0 + 50), b=1,
                                                     create=False, status="b")]))
    again = by_device(engine.handle_up("van-1", batch))["van-1"][0]
    assert again["ok"] == [[1, "r1", 1]]
    assert again["fx"][0]["f"]["status"] == "b" and again["fx"][0]["q"] == 2
    assert not again["fx"][0].get("part")


def test_same_batch_in_one_group_applies_once(env: tuple[Engine, Store]) -> None:
    """The same batch twice within one handle_many group is still applied once."""
    engine, store = env
    batch = changes("van-1", [{"n": 1, "h": hp(T0), "c": "tasks", "k": "t", "s": "r1",
                               "op": "put", "f": {"route": "r1"}, "i": {"attempts": 2}}])
    out = by_device(engine.handle_many([("van-1", batch), ("van-1", batch)]))
    assert oks(out["van-1"]) == [[1, "r1", 1], [1, "r1", 1]]
    rec = _record(store, "t")
    assert rec is not None and rec.value("attempts") == 2


def test_lost_ack_then_resend_does_not_double_apply(tmp_path: Path,
                                                   store_factory: StoreFactory) -> None:
    """Server restarts after applying but before the ack went out: the resend is a duplicate."""
    engine, store, time = make_engine(tmp_path, DEVICES, store=store_factory())
    batch = changes("van-1", [{"n": n, "h": hp(T0 + n), "c": "inventory", "k": "sku",
                               "s": "r1", "op": "put", "f": {"depot": "r1"},
                               "i": {"stock": 5}} for n in range(1, 4)])
    engine.handle_up("van-1", batch)  # the outgoing ack is "lost"
    store.close()
    store = reopen(store)
    engine = Engine(store, engine.catalog, engine.config, time)
    try:
        out = by_device(engine.handle_up("van-1", batch))
        assert oks(out["van-1"]) == [[1, "r1", 1], [2, "r1", 2], [3, "r1", 3]]
        rec = _record(store, "sku", "inventory")
        assert rec is not None and rec.value("stock") == 15
    finally:
        store.close()


def _random_changes(rng: random.Random, dev: str, count: int) -> list[dict[str, Any]]:
    out = []
    for n in range(1, count + 1):
        key = f"t{rng.randrange(8)}"
        wall = T0 + rng.randrange(10_000)
        kind = rng.randrange(4)
        ch: dict[str, Any] = {"n": n, "h": hp(wall, n), "c": "tasks", "k": key, "s": "r1",
                              "b": 0, "op": "put", "f": {"route": "r1"}}
        if kind == 0:
            ch["f"]["status"] = f"{dev}-{n}"
        elif kind == 1:
            ch["i"] = {"attempts": rng.randrange(1, 5)}
        elif kind == 2:
            ch["a"] = {"labels": [rng.choice("abcdef")]}
        else:
            ch["f"]["notes"] = rng.choice(["x", "y", None])
        out.append(ch)
    return out


def _values(store: Store) -> dict[str, Any]:
    out = {}
    with store.read() as txn:
        for _q, c, k in txn.index_range("r1", 0, 10_000):
            raw = txn.get_record(c, k)
            assert raw is not None
            rec = merge.to_rec(merge.from_json(raw))
            out[k] = {"f": rec.get("f"), "h": rec.get("h"), "t": rec.get("t")}
    return out


def test_duplicated_reordered_delivery_converges(tmp_path: Path,
                                                store_factory: StoreFactory) -> None:
    """Many changes from 3 devices, duplicated and shuffled, give the same records."""
    rng = random.Random(7)
    devs = ["van-1", "van-2", "van-3"]
    per_dev = {d: _random_changes(rng, d, 60) for d in devs}
    results = []
    for trial in range(3):
        engine, store, _ = make_engine(tmp_path / str(trial), DEVICES, store=store_factory())
        try:
            msgs = [(d, changes(d, [ch])) for d in devs for ch in per_dev[d]]
            if trial:
                msgs = msgs + rng.sample(msgs, len(msgs) // 2)
                rng.shuffle(msgs)
            for i in range(0, len(msgs), 7):
                engine.handle_many(msgs[i:i + 7])
            results.append(_values(store))
            with store.read() as txn:
                assert txn.scope_seq("r1") == 180  # each change applied exactly once
        finally:
            store.close()
    assert results[0] == results[1] == results[2]


def test_sequences_contiguous_and_only_for_applied(env: tuple[Engine, Store]) -> None:
    """q runs 1, 2, 3, ... per scope; refused changes take no number."""
    engine, store = env
    batch = []
    for n in range(1, 41):
        if n % 5 == 0:
            batch.append(task(n, f"k{n}", eta="bad"))
        elif n % 3 == 0:
            batch.append(task(n, f"k{n}", "r2", status="x"))
        else:
            batch.append(task(n, f"k{n}", status="x"))
    out = by_device(engine.handle_many([("van-3", changes("van-3", batch[:20])),
                                        ("van-3", changes("van-3", batch[20:]))]))["van-3"]
    got = oks(out)
    for scope in ("r1", "r2"):
        qs = [q for _, s, q in got if s == scope]
        assert qs == list(range(1, len(qs) + 1))
    assert len(rejections(out)) == 8
    with store.read() as txn:
        assert txn.scope_seqs() == {"r1": len([g for g in got if g[1] == "r1"]),
                                    "r2": len([g for g in got if g[1] == "r2"])}


def test_deltas_only_to_other_online_devices_of_the_scope(env: tuple[Engine, Store]) -> None:
    """A change goes to online subscribers of its scope, never back to its writer."""
    engine, _ = env
    _online(engine, "van-1", "van-2", "van-4")  # van-3 offline; van-4 follows r2 only
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(1, "t", status="a")])))
    assert set(out) == {"van-1", "van-2"}
    assert of_type(out["van-1"], "delta") == []
    (delta,) = of_type(out["van-2"], "delta")
    assert delta["d"] == [{"c": "tasks", "k": "t", "s": "r1", "q": 1,
                           "f": {"route": "r1", "status": "a"},
                           "h": {"route": f"{hp(T0 + 1)}:van-1", "status": f"{hp(T0 + 1)}:van-1"}}]
    engine.handle_status("van-2", status("van-2", on=False))
    out = by_device(engine.handle_up("van-1", changes("van-1", [task(2, "t", status="b")])))
    assert set(out) == {"van-1"}


def test_one_delta_per_device_per_group(env: tuple[Engine, Store]) -> None:
    """All deltas of a group reach a device in one message, in q order, without its own."""
    engine, _ = env
    _online(engine, "van-1", "van-2", "van-3")
    out = by_device(engine.handle_many([
        ("van-1", changes("van-1", [task(1, "a", status="x"), task(2, "b", status="x")])),
        ("van-2", changes("van-2", [task(1, "c", status="x")]))]))
    (d3,) = of_type(out["van-3"], "delta")
    assert [r["q"] for r in d3["d"]] == [1, 2, 3]
    (d1,) = of_type(out["van-1"], "delta")
    assert [r["k"] for r in d1["d"]] == ["c"]
    (d2,) = of_type(out["van-2"], "delta")
    assert [r["k"] for r in d2["d"]] == ["a", "b"]


def test_every_applied_change_yields_a_delta_state(env: tuple[Engine, Store]) -> None:
    """A change that changes nothing visible (a losing write) still reaches others' q."""
    engine, _ = env
    _online(engine, "van-2")
    engine.handle_up("van-1", changes("van-1", [task(1, "t", h=hp(T0 + 100), status="new")]))
    out = by_device(engine.handle_up("van-3", changes("van-3", [
        task(1, "t", h=hp(T0 + 1), create=False, status="old")])))
    ack = out["van-3"][0]
    assert ack["ok"] == [[1, "r1", 2]] and ack["fx"][0]["f"] == {"status": "new"}
    (delta,) = of_type(out["van-2"], "delta")
    assert delta["d"] == [{"c": "tasks", "k": "t", "s": "r1", "q": 2, "part": True}]


def test_lww_loser_and_manual_conflicts_are_logged(env: tuple[Engine, Store]) -> None:
    """Concurrent writes leave conflict-log entries; manual ones stay open until settled."""
    engine, store = env
    engine.handle_up("van-1", changes("van-1", [task(1, "t", status="a", address="Dock 1")]))
    engine.handle_up("van-2", changes("van-2", [
        task(1, "t", h=hp(T0 + 50), create=False, status="b", address="Dock 2")]))
    with store.read() as txn:
        rows = txn.conflicts(open_only=False, limit=10)
        open_rows = txn.conflicts(open_only=True, limit=10)
    assert {(r.field, r.entry["kind"]) for r in rows} == {("status", "lww"),
                                                          ("address", "manual")}
    assert [r.field for r in open_rows] == ["address"]
    # van-1 saw the conflict (b = 2) and settles it
    engine.handle_up("van-1", changes("van-1", [
        task(2, "t", h=hp(T0 + 90), b=2, create=False, address="Dock 3")]))
    with store.read() as txn:
        assert txn.conflicts(open_only=True, limit=10) == []
        row = txn.get_conflict(open_rows[0].id)
        assert row is not None and row.resolution == "device van-1 change 2"


def test_messages_compressed_for_z_devices(env: tuple[Engine, Store]) -> None:
    """Large messages to a device that said z=true are zlib-compressed; others are not."""
    engine, _ = env
    engine.handle_many([("van-2", hello("van-2", z=True)), ("van-1", hello("van-1"))])
    _online(engine, "van-1", "van-2", "van-3")
    batch = changes("van-3", [task(n, f"key-{n}", notes="delivered" * 5) for n in range(1, 30)])
    out = engine.handle_up("van-3", batch)
    raw = {dev: payload for dev, payload in out if dev != "van-3"}
    assert raw["van-2"][:1] == b"\x78" and raw["van-1"][:1] == b"{"
    assert decode(raw["van-2"]) == decode(raw["van-1"])


class CountingStore:
    """A real store that counts write transactions."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.writes = 0

    def read(self) -> Any:
        return self.inner.read()

    def transact(self, fn: Callable[[WriteTxn], T]) -> T:
        self.writes += 1
        return self.inner.transact(fn)

    def info(self) -> Any:
        return self.inner.info()

    def close(self) -> None:
        self.inner.close()


def test_group_commit_uses_one_transaction(env: tuple[Engine, Store]) -> None:
    """handle_many applies the batches of many devices in a single write transaction."""
    engine, store = env
    counting = CountingStore(store)
    engine.store = counting
    group = [(d, changes(d, [task(n, f"{d}-{n}", status="x") for n in range(1, 51)]))
             for d in ("van-1", "van-2", "van-3")]
    out = by_device(engine.handle_many(group))
    assert counting.writes == 1
    assert sum(len(oks(out[d])) for d in out) == 150


def test_large_acks_and_deltas_are_split(env: tuple[Engine, Store]) -> None:
    """Down messages stay under the size bound: a big ack or delta comes in parts."""
    engine, _ = env
    _online(engine, "van-2")
    blob = "x" * 30_000
    out = engine.handle_many([("van-1", changes("van-1", [
        task(n, f"k{n}", proof={"blob": blob}) for n in range(i, i + 5)]))
        for i in range(1, 21, 5)])
    assert all(len(payload) <= 200 * 1024 for _, payload in out)
    msgs = by_device(out)
    assert [r["q"] for m in of_type(msgs["van-2"], "delta") for r in m["d"]] == list(range(1, 21))
    assert len(of_type(msgs["van-2"], "delta")) > 1
