"""Who a change is: store incarnations, content digests, and devices that may not sync
(disabled, wipe pending) — PROTOCOL.md §2, §7.9, §10.1, §10.2. Both store backends."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from broker.server.engine import Engine
from broker.server.registry import issue_command, remove_device, set_enabled
from broker.server.store.base import Store
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    T0,
    by_device,
    catchup,
    errors,
    hp,
    make_engine,
    of_type,
    oks,
    rejections,
    task,
)

DEVICES = {"van-13": ["r1"], "van-2": ["r1"]}
INC_A = "incarnationAAAA1"
INC_B = "incarnationBBBB2"


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory())
    yield engine, store


def changes(dev: str, chs: Sequence[dict[str, Any]], inc: str | None) -> bytes:
    msg: dict[str, Any] = {"type": "changes", "v": 1, "dev": dev, "sv": 1, "ch": list(chs)}
    if inc is not None:
        msg["inc"] = inc
    return orjson.dumps(msg)


def hello(dev: str, inc: str | None = None, done: Sequence[str] = (),
          cp: dict[str, int] | None = None) -> bytes:
    msg: dict[str, Any] = {"type": "hello", "v": 1, "dev": dev, "agent": "t/1", "sv": 1,
                           "done": list(done)}
    if inc is not None:
        msg["inc"] = inc
    if cp is not None:
        msg["cp"] = cp
    return orjson.dumps(msg)


def _record(store: Store, key: str) -> dict[str, Any] | None:
    with store.read() as txn:
        return txn.get_record("tasks", key)


def _letters(store: Store) -> list[Any]:
    with store.read() as txn:
        return txn.dead_letters(100)


def test_a_new_store_of_a_known_device_is_a_new_writer(env: tuple[Engine, Store]) -> None:
    """The blocker of issue 8: a second store's van-13:1 is applied, not acked as a
    duplicate of the first store's van-13:1."""
    engine, store = env
    out = by_device(engine.handle_up("van-13", changes("van-13", [task(1, "t-1")], INC_A)))
    assert [ok[0] for ok in oks(out["van-13"])] == [1]
    out = by_device(engine.handle_up("van-13", changes("van-13", [task(1, "t-99")], INC_B)))
    acked = oks(out["van-13"])
    assert [ok[0] for ok in acked] == [1] and acked[0][2] == 2  # a new q: really applied
    assert _record(store, "t-99") is not None
    assert engine.counters["duplicates"] == 0


def test_legacy_and_new_incarnations_are_kept_apart(env: tuple[Engine, Store]) -> None:
    """Changes without `inc` (devices from before incarnations) stay in their own
    namespace: a new store's n=1 does not hit them."""
    engine, _ = env
    engine.handle_up("van-13", changes("van-13", [task(1, "legacy")], None))
    out = by_device(engine.handle_up("van-13", changes("van-13", [task(1, "fresh")], INC_A)))
    assert oks(out["van-13"])[0][2] == 2
    # the legacy outcome still answers its resend as a duplicate
    out = by_device(engine.handle_up("van-13", changes("van-13", [task(1, "legacy")], None)))
    assert oks(out["van-13"])[0][2] == 1
    assert engine.counters["duplicates"] == 1


def test_a_new_stores_set_add_is_not_the_old_stores_tag(env: tuple[Engine, Store]) -> None:
    """A wiped or re-imaged device numbers from 1 again (§2). Its new store's add of a
    member is a new add: another device's remove of the old store's add (tag van-13:1,
    all it saw) must not remove it (add wins, §5), nor may an earlier such remove."""
    engine, _ = env
    first = {**task(1, "t-1"), "a": {"labels": ["fragile"]}}
    engine.handle_up("van-13", changes("van-13", [first], INC_A))
    remove = {**task(1, "t-1", create=False), "h": hp(T0 + 10),
              "r": {"labels": {"fragile": ["van-13:1"]}}}
    remove.pop("f", None)
    engine.handle_up("van-2", changes("van-2", [remove], None))
    again = {**task(1, "t-1", create=False), "h": hp(T0 + 20), "a": {"labels": ["fragile"]}}
    again.pop("f", None)
    out = by_device(engine.handle_up("van-13", changes("van-13", [again], INC_B)))
    assert [ok[0] for ok in oks(out["van-13"])] == [1]
    page = by_device(engine.handle_up("van-13", catchup("van-13", {"r1": 0})))["van-13"]
    [rec] = [r for p in of_type(page, "page") for r in p["recs"]]
    assert rec["f"].get("labels") == ["fragile"], rec


def _labels(engine: Engine, dev: str = "van-2") -> dict[str, list[str]]:
    """The live tags of t-1's `labels`, as a catch-up shows them to `dev`."""
    page = by_device(engine.handle_up(dev, catchup(dev, {"r1": 0})))[dev]
    [rec] = [r for p in of_type(page, "page") for r in p["recs"] if r["k"] == "t-1"]
    tags: dict[str, list[str]] = rec.get("t", {}).get("labels", {})
    return tags


def _set_change(n: int, at: int, *, add: Sequence[str] = (),
                remove: dict[str, list[str]] | None = None) -> dict[str, Any]:
    ch = {**task(n, "t-1", create=False), "h": hp(T0 + at)}
    ch.pop("f", None)
    if add:
        ch["a"] = {"labels": list(add)}
    if remove:
        ch["r"] = {"labels": remove}
    return ch


def test_a_first_store_tags_its_adds_with_its_change_ids(env: tuple[Engine, Store]) -> None:
    """Nothing changes for a device's first store (its tags are what devices always
    saw), while a re-created one's tags are of the same §2 form, apart from them."""
    engine, _ = env
    engine.handle_up("van-13", hello("van-13", INC_A))
    engine.tick()
    engine.handle_up("van-13", changes("van-13", [{**task(1, "t-1"), "a": {"labels": ["a"]}}],
                                       INC_A))
    assert _labels(engine) == {"a": ["van-13:1"]}
    engine.handle_up("van-13", hello("van-13", INC_B))  # re-imaged
    engine.tick()
    engine.handle_up("van-13", changes("van-13", [_set_change(1, 10, add=["b"])], INC_B))
    tags = _labels(engine)
    assert tags["a"] == ["van-13:1"]
    [tag] = tags["b"]
    dev, _, n = tag.rpartition(":")
    assert dev == "van-13" and n != "1" and 1 <= int(n) < 2**53 and n[0] != "0"


def test_a_re_created_store_removes_its_own_adds_by_change_id(
        env: tuple[Engine, Store]) -> None:
    """The device knows its pending add by its change id: its remove naming van-13:1
    removes the add the server tagged apart, whether the remove comes after the add or
    before it (out of order); another device removes it by the tag it was shown."""
    engine, _ = env
    engine.handle_up("van-13", hello("van-13", INC_A))
    engine.handle_up("van-13", changes("van-13", [{**task(1, "t-1"), "a": {"labels": ["x"]}}],
                                       INC_A))
    engine.handle_up("van-13", hello("van-13", INC_B))
    engine.tick()
    engine.handle_up("van-13", changes("van-13", [
        _set_change(1, 10, add=["a"]), _set_change(2, 11, remove={"a": ["van-13:1"]})], INC_B))
    assert "a" not in _labels(engine)
    engine.handle_up("van-13", changes("van-13", [
        _set_change(4, 13, remove={"b": ["van-13:3"]})], INC_B))
    engine.handle_up("van-13", changes("van-13", [_set_change(3, 12, add=["b"])], INC_B))
    assert "b" not in _labels(engine)
    engine.handle_up("van-13", changes("van-13", [_set_change(5, 14, add=["c"])], INC_B))
    [tag] = _labels(engine)["c"]
    engine.handle_up("van-2", changes("van-2", [_set_change(1, 15, remove={"c": [tag]})],
                                      None))
    assert "c" not in _labels(engine)
    assert _labels(engine)["x"] == ["van-13:1"]  # the old store's add: not named by any


def test_reused_id_with_other_content_is_refused_loudly(env: tuple[Engine, Store]) -> None:
    """Same incarnation, same n, other content: id_reused (permanent), a dead letter, no
    write; the id keeps its first outcome (the original resend is still a duplicate)."""
    engine, store = env
    engine.handle_up("van-13", changes("van-13", [task(1, "t-1", status="a")], INC_A))
    out = by_device(engine.handle_up(
        "van-13", changes("van-13", [task(1, "t-99", status="b")], INC_A)))
    rj = rejections(out["van-13"])
    assert [(r["n"], r["code"], r["perm"]) for r in rj] == [(1, "id_reused", True)]
    assert "restored from a backup or copied" in rj[0]["reason"]
    assert not oks(out["van-13"])
    assert _record(store, "t-99") is None
    assert any(d.code == "id_reused" for d in _letters(store))
    out = by_device(engine.handle_up(
        "van-13", changes("van-13", [task(1, "t-1", status="a")], INC_A)))
    assert [ok[:3] for ok in oks(out["van-13"])] == [[1, "r1", 1]]


def test_reused_id_of_a_refused_change_is_refused_loudly(env: tuple[Engine, Store]) -> None:
    """A permanently refused id resent with other content is id_reused too, not the
    old refusal."""
    engine, _ = env
    bad = task(1, "t-1", status=5)  # type_mismatch
    engine.handle_up("van-13", changes("van-13", [bad], INC_A))
    out = by_device(engine.handle_up("van-13", changes("van-13", [task(1, "t-2")], INC_A)))
    assert [r["code"] for r in rejections(out["van-13"])] == ["id_reused"]
    out = by_device(engine.handle_up("van-13", changes("van-13", [bad], INC_A)))
    assert [r["code"] for r in rejections(out["van-13"])] == ["type_mismatch"]


def test_hello_records_incarnations(env: tuple[Engine, Store]) -> None:
    """The device row says which store incarnation it runs, and counts new ones."""
    engine, store = env
    engine.handle_up("van-13", hello("van-13", INC_A, cp={"r1": 7, "r9": 3}))
    with store.read() as txn:
        row = txn.get_device("van-13")
    assert row is not None and (row.inc, row.incs) == (INC_A, 1)
    assert row.cp == {"r1": 7} and row.cp_ms == T0  # not a scope of its: not recorded
    engine.handle_up("van-13", hello("van-13", INC_A))
    engine.handle_up("van-13", hello("van-13", INC_B))
    with store.read() as txn:
        row = txn.get_device("van-13")
    assert row is not None and (row.inc, row.incs, row.cp) == (INC_B, 2, {})


def test_removing_a_device_forgets_every_incarnation(env: tuple[Engine, Store]) -> None:
    """After remove + add, every incarnation starts afresh (nothing is a duplicate)."""
    engine, store = env
    engine.handle_up("van-13", changes("van-13", [task(1, "t-1")], INC_A))
    engine.handle_up("van-13", changes("van-13", [task(1, "t-2")], None))
    with store.read() as txn:
        assert txn.get_outcome(f"van-13/{INC_A}", 1) is not None
        assert txn.get_outcome("van-13", 1) is not None
    remove_device(store, "van-13")
    with store.read() as txn:
        assert txn.get_outcome(f"van-13/{INC_A}", 1) is None
        assert txn.get_outcome("van-13", 1) is None


def test_disabled_device_gets_its_commands_but_no_data(env: tuple[Engine, Store]) -> None:
    """Disabled: hello is answered with commands; catch-up and changes get the transient
    device_disabled; nothing is dead-lettered per message."""
    engine, store = env
    engine.handle_up("van-2", changes("van-2", [task(1, "t-1")], INC_B))
    set_enabled(store, "van-13", False)
    ping = issue_command(store, "van-13", "ping", T0)
    out = by_device(engine.handle_up("van-13", hello("van-13", INC_A)))
    assert [m["id"] for m in of_type(out["van-13"], "command")] == [ping.id]
    before = len(_letters(store))
    for _ in range(5):
        out = by_device(engine.handle_up("van-13", catchup("van-13", {"r1": 0})))
        assert [e["code"] for e in errors(out["van-13"])] == ["device_disabled"]
        assert not of_type(out["van-13"], "page")
    assert len(_letters(store)) == before


@pytest.mark.parametrize("enable_first", [False, True])
def test_a_catchup_in_the_group_of_the_hello_reporting_the_wipe_is_told_the_truth(
        env: tuple[Engine, Store], enable_first: bool) -> None:
    """The new store's hello (wipe done) and its first catch-up handled in one group: the
    catch-up is judged as after the hello, not refused for a wipe "pending" that the
    hello just reported done (the device would show that until its next sync)."""
    engine, store = env
    engine.handle_up("van-2", changes("van-2", [task(1, "t-1")], INC_B))
    wipe = issue_command(store, "van-13", "wipe", T0)
    if enable_first:  # the operator enabled it again before the wipe was carried out
        set_enabled(store, "van-13", True)
    out = by_device(engine.handle_many([
        ("van-13", hello("van-13", INC_B, done=[wipe.id])),
        ("van-13", catchup("van-13", {"r1": 0}))]))
    if enable_first:
        assert not errors(out["van-13"])
        assert [len(p["recs"]) for p in of_type(out["van-13"], "page")] == [1]
    else:
        reasons = [e["reason"] for e in errors(out["van-13"])]
        assert len(reasons) == 1 and "disabled by the operator" in reasons[0], reasons
        assert "wipe pending" not in reasons[0]
    with store.read() as txn:
        row = txn.get_device("van-13")
    assert row is not None and not row.wipe_pending


def test_wipe_goes_first_and_blocks_everything_until_done(env: tuple[Engine, Store]) -> None:
    """A wipe disables the device; its hello gets the wipe first; catch-ups get nothing
    while it is pending and after it is done until the operator enables the device."""
    engine, store = env
    engine.handle_up("van-2", changes("van-2", [task(1, "t-1")], INC_B))
    ping = issue_command(store, "van-13", "ping", T0)
    wipe = issue_command(store, "van-13", "wipe", T0 + 1)
    with store.read() as txn:
        row = txn.get_device("van-13")
    assert row is not None and not row.enabled and row.wipe_pending and row.wipe_ms == T0 + 1
    out = by_device(engine.handle_up("van-13", hello("van-13", INC_A)))
    assert [m["cmd"] for m in of_type(out["van-13"], "command")] == ["wipe", "ping"]
    out = by_device(engine.handle_up("van-13", catchup("van-13", {"r1": 0})))
    assert [e["code"] for e in errors(out["van-13"])] == ["device_disabled"]
    out = by_device(engine.handle_up("van-13", changes("van-13", [task(1, "x")], INC_A)))
    assert [(r["code"], r["perm"]) for r in rejections(out["van-13"])] == [
        ("device_disabled", False)]
    engine.handle_up("van-13", hello("van-13", INC_B, done=[wipe.id, ping.id]))
    with store.read() as txn:
        row = txn.get_device("van-13")
    assert row is not None and not row.wipe_pending and row.wipe_done_ms == T0
    out = by_device(engine.handle_up("van-13", catchup("van-13", {"r1": 0})))
    assert [e["code"] for e in errors(out["van-13"])] == ["device_disabled"]
    set_enabled(store, "van-13", True)
    out = by_device(engine.handle_up("van-13", catchup("van-13", {"r1": 0})))
    assert [len(p["recs"]) for p in of_type(out["van-13"], "page")] == [1]
