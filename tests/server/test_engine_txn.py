"""Device transactions on the server (PROTOCOL.md §7.2.1, §10.5): all or none in one
store transaction, on both backends (LMDB and PostgreSQL)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.server.engine import Engine
from broker.server.store.base import Store
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    by_device,
    changes,
    make_engine,
    oks,
    rejections,
    task,
)
from waystation import merge
from waystation.rules import RuleContext, RuleDecision

DEVICES = {"van-1": ["r1"], "van-2": ["r1"]}


def no_negative_stock(ctx: RuleContext) -> RuleDecision | None:
    """A bin never holds less than nothing."""
    if ctx.change.c == "inventory" and int(ctx.after.value("stock") or 0) < 0:
        return RuleDecision.reject(f"bin {ctx.change.k} would hold "
                                   f"{ctx.after.value('stock')}: count the bin again")
    return None


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory(),
                                   rules=[no_negative_stock])
    yield engine, store


def _bin(n: int, key: str, *, tx: list[int] | None = None, stock: int | None = None,
         create: bool = False) -> dict[str, Any]:
    ch: dict[str, Any] = {"n": n, "h": f"{0x0190_0000_0000 + n:012x}0000", "c": "inventory",
                          "k": key, "s": "r1", "b": 0, "op": "put"}
    if create:
        ch["f"] = {"depot": "r1", "sku": "A"}
    if stock is not None:
        ch["i"] = {"stock": stock}
    if tx is not None:
        ch["tx"] = tx
    return ch


def _record(store: Store, c: str, k: str) -> merge.RecordState | None:
    with store.read() as txn:
        raw = txn.get_record(c, k)
    return None if raw is None else merge.from_json(raw)


def _seq(store: Store) -> int:
    with store.read() as txn:
        return txn.scope_seq("r1")


def _setup(engine: Engine) -> None:
    out = by_device(engine.handle_up("van-1", changes("van-1", [
        _bin(1, "bin-a", create=True, stock=5), _bin(2, "bin-b", create=True)])))
    assert len(oks(out["van-1"])) == 2


def test_transaction_applies_whole(env: tuple[Engine, Store]) -> None:
    engine, store = env
    _setup(engine)
    order = [{**task(3, "o-1", status="ordered"), "tx": [3, 4]},
             {**task(4, "o-1:1", notes="2 x A"), "tx": [3, 4]},
             _bin(5, "bin-a", tx=[3, 4], stock=-2), _bin(6, "bin-b", tx=[3, 4], stock=2)]
    out = by_device(engine.handle_up("van-1", changes("van-1", order)))["van-1"]
    assert oks(out) == [[3, "r1", 3], [4, "r1", 4], [5, "r1", 5], [6, "r1", 6]]
    a, b = _record(store, "inventory", "bin-a"), _record(store, "inventory", "bin-b")
    assert a is not None and b is not None
    assert (a.value("stock"), b.value("stock")) == (3, 2)
    # Sent again (its ack was lost): the same answers, nothing applied twice.
    again = by_device(engine.handle_up("van-1", changes("van-1", order)))["van-1"]
    assert oks(again) == oks(out)
    assert _seq(store) == 6


def test_one_refused_change_rejects_the_whole_transaction(env: tuple[Engine, Store]) -> None:
    """Stock moved out of a bin that would go negative: the rule refuses that change,
    so nothing of the transaction is applied (the other bin is not counted twice)."""
    engine, store = env
    _setup(engine)
    seq = _seq(store)
    move = [_bin(3, "bin-b", tx=[3, 3], stock=9), _bin(4, "bin-a", tx=[3, 3], stock=-9),
            {**task(5, "o-2", status="moved"), "tx": [3, 3]}]
    out = by_device(engine.handle_up("van-1", changes("van-1", move)))["van-1"]
    assert oks(out) == []
    rj = {r["n"]: r for r in rejections(out)}
    assert rj[4]["code"] == "rule_rejected" and "below 0" in rj[4]["reason"]
    for n in (3, 5):
        assert rj[n]["code"] == "txn_aborted" and rj[n]["perm"] is True
        assert "van-1:3 was rejected as a whole" in rj[n]["reason"]
        assert "van-1:4" in rj[n]["reason"] and "rule_rejected" in rj[n]["reason"]
    # The device's rollback gets the records as they stand (bin-b untouched).
    assert rj[3]["rec"]["f"].get("stock", 0) == 0
    b = _record(store, "inventory", "bin-b")
    assert b is not None and b.value("stock") in (0, None)
    assert _record(store, "tasks", "o-2") is None
    assert _seq(store) == seq
    # The operator's dead letter names the cause first.
    with store.read() as txn:
        letters = txn.dead_letters(10)
    assert letters[-1].code == "rule_rejected"
    assert "3 of 3 changes refused: n=4 rule_rejected" in letters[-1].reason
    # A resend gets the same refusals (remembered), and later changes still apply.
    again = by_device(engine.handle_up("van-1", changes("van-1", move)))["van-1"]
    assert [(r["n"], r["code"]) for r in rejections(again)] == [
        (n, rj[n]["code"]) for n in (3, 4, 5)]
    ok = by_device(engine.handle_up("van-1", changes("van-1", [
        _bin(6, "bin-b", tx=[6, 2], stock=1), _bin(7, "bin-a", tx=[6, 2], stock=-1)])))
    assert oks(ok["van-1"]) == [[6, "r1", seq + 1], [7, "r1", seq + 2]]


def test_a_later_change_sees_the_earlier_ones(env: tuple[Engine, Store]) -> None:
    """Changes of one transaction build on each other (a record created, then changed)
    and the rule judges each on what the earlier ones left."""
    engine, store = env
    chain = [_bin(1, "bin-c", tx=[1, 3], create=True, stock=2),
             _bin(2, "bin-c", tx=[1, 3], stock=-2),
             _bin(3, "bin-c", tx=[1, 3], stock=-1)]  # would make it -1: all refused
    out = by_device(engine.handle_up("van-1", changes("van-1", chain)))["van-1"]
    assert [r["code"] for r in rejections(out)] == ["txn_aborted", "txn_aborted",
                                                     "rule_rejected"]
    assert _record(store, "inventory", "bin-c") is None
    ok = chain[:2]
    ok = [{**ch, "n": ch["n"] + 10, "tx": [11, 2]} for ch in ok]
    out = by_device(engine.handle_up("van-1", changes("van-1", ok)))["van-1"]
    assert len(oks(out)) == 2
    c = _record(store, "inventory", "bin-c")
    assert c is not None and c.value("stock") == 0


def test_broken_markers_refuse_the_transaction(env: tuple[Engine, Store]) -> None:
    engine, store = env
    _setup(engine)
    seq = _seq(store)
    cases = [
        # count says 3, two arrive
        [_bin(3, "bin-a", tx=[3, 3], stock=1), _bin(4, "bin-b", tx=[3, 3], stock=1)],
        # members not next to each other
        [_bin(5, "bin-a", tx=[5, 2], stock=1), task(6, "x"), _bin(7, "bin-b", tx=[5, 2],
                                                                   stock=1)],
        # a member that is not a valid change at all
        [_bin(8, "bin-a", tx=[8, 2], stock=1), {"n": 9, "h": "zz", "tx": [8, 2]}],
    ]
    for batch in cases:
        out = by_device(engine.handle_up("van-1", changes("van-1", batch)))["van-1"]
        tx_numbers = {ch["n"] for ch in batch if "tx" in ch}
        refused = {r["n"]: r for r in rejections(out)}
        assert tx_numbers <= set(refused), out
        assert all(refused[n]["code"] == "invalid" and refused[n]["perm"]
                   for n in tx_numbers)
    a = _record(store, "inventory", "bin-a")
    assert a is not None and a.value("stock") == 5
    assert _seq(store) == seq + 1  # only the plain change of case 2 applied


def test_plain_changes_beside_a_transaction_keep_their_own_fate(
        env: tuple[Engine, Store]) -> None:
    engine, _ = env
    _setup(engine)
    batch = [task(3, "p-1", status="a"),
             _bin(4, "bin-a", tx=[4, 2], stock=-100), _bin(5, "bin-b", tx=[4, 2], stock=100),
             task(6, "p-2", status="b")]
    out = by_device(engine.handle_up("van-1", changes("van-1", batch)))["van-1"]
    applied = [n for n, _, _ in oks(out)]
    assert applied == [3, 6]
    assert {r["n"]: r["code"] for r in rejections(out)} == {4: "rule_rejected",
                                                            5: "txn_aborted"}


# A move: (from bin, to bin, qty); bins 0..2 start with 3 units each.
moves = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(1, 5)),
                 min_size=1, max_size=8)


@given(plan=moves, per_message=st.integers(1, 3))
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_property_transactions_are_all_or_nothing(plan: list[tuple[int, int, int]],
                                                  per_message: int) -> None:
    """Random stock moves between bins, as transactions, several per message: each is
    applied whole or not at all; a bin never goes below 0; the stock the server ends
    with is exactly the start plus the moves it applied (nothing counted twice), and
    every change has the outcome of its transaction."""
    root = Path(tempfile.mkdtemp(prefix="ws-txe-"))
    engine, store, _ = make_engine(root, DEVICES)
    try:
        start = [_bin(i + 1, f"bin-{i}", create=True, stock=3) for i in range(3)]
        engine.handle_up("van-1", changes("van-1", start))
        n = 4
        txs: list[tuple[list[int], tuple[int, int, int]]] = []
        batch: list[dict[str, Any]] = []
        for src, dst, qty in plan:
            numbers = [n, n + 1]
            batch += [_bin(n, f"bin-{src}", tx=[n, 2], stock=-qty),
                      _bin(n + 1, f"bin-{dst}", tx=[n, 2], stock=qty)]
            txs.append((numbers, (src, dst, qty)))
            n += 2
            if len(txs) % per_message == 0:
                engine.handle_up("van-1", changes("van-1", batch))
                batch = []
        if batch:
            engine.handle_up("van-1", changes("van-1", batch))
        expected = [3, 3, 3]
        ns = "van-1"
        with store.read() as txn:
            for numbers, (src, dst, qty) in txs:
                rows = [txn.get_outcome(ns, m) for m in numbers]
                assert all(r is not None for r in rows)
                applied = [r.applied for r in rows if r is not None]
                assert applied in ([True, True], [False, False]), applied
                if applied[0]:
                    expected[src] -= qty
                    expected[dst] += qty
                    assert min(expected) >= 0
                else:
                    codes = sorted(r.code for r in rows if r is not None)
                    assert "txn_aborted" in codes
            for i in range(3):
                raw = txn.get_record("inventory", f"bin-{i}")
                assert raw is not None
                assert merge.from_json(raw).value("stock") == expected[i]
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
