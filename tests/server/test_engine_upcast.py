"""Changes written under older schema versions are upcast by the server before the
merge, along the published history (broker.server.upcast), on both stores."""

from __future__ import annotations

import tomllib
from pathlib import Path

import orjson

from broker.server import schema_history
from broker.server.engine import Engine
from broker.server.store.base import Store
from schemas.collection import Catalog, parse_catalog
from tests.schema_versions import V1, V2, V3, V4
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    T0,
    FakeTime,
    by_device,
    catchup,
    changes,
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


def catalog(text: str) -> Catalog:
    return parse_catalog(tomllib.loads(text), "test")


def test_version_texts_are_what_the_test_means() -> None:
    v3, v4 = catalog(V3), catalog(V4)
    assert v3.version == 3 and "note" in v3.collections["tasks"].fields
    assert v4.version == 4 and v4.collections["tasks"].fields["eta"].type == "string"
    assert v4.collections["inventory"].fields["bin"].type == "int"


def published(store_factory: StoreFactory, tmp_path: Path,
              upto: int = 4) -> tuple[Engine, Store, FakeTime]:
    store = store_factory()
    for n, text in enumerate((V1, V2, V3, V4)[:upto], start=1):
        schema_history.publish(store, text, f"v{n}.toml", n)
    return make_engine(tmp_path, {"van-1": ["r1", "d1"], "van-2": ["r1"]},
                       catalog=catalog((V1, V2, V3, V4)[upto - 1]), store=store)


def test_device_offline_across_three_versions_is_upcast(store_factory: StoreFactory,
                                                        tmp_path: Path) -> None:
    engine, store, _ = published(store_factory, tmp_path)
    # Written under version 1: `notes`, and `eta` as an int.
    out = by_device(engine.handle_up("van-1", changes("van-1", [
        task(1, "t-1", notes="ring twice", eta=1764000000001)], sv=1)))
    assert oks(out["van-1"]) == [[1, "r1", 1]] and rejections(out["van-1"]) == []
    # Written under version 3: `note` already, `eta` still an int.
    out = by_device(engine.handle_up("van-2", changes("van-2", [
        task(1, "t-2", note="back door", eta=5, floor=2)], sv=3)))
    assert oks(out["van-2"]) == [[1, "r1", 2]]
    # Written under version 4: as is.
    out = by_device(engine.handle_up("van-2", changes("van-2", [
        task(2, "t-3", eta="tomorrow")], sv=4)))
    assert oks(out["van-2"]) == [[2, "r1", 3]]
    with store.read() as txn:
        t1 = merge.from_json(txn.get_record("tasks", "t-1"))
        t2 = merge.from_json(txn.get_record("tasks", "t-2"))
        assert (t1.value("note"), t1.value("eta"), t1.value("notes")) == (
            "ring twice", "1764000000001", None)
        assert (t2.value("note"), t2.value("eta"), t2.value("floor")) == ("back door", "5", 2)
        assert txn.dead_letters(10) == []
    assert engine.counters.get("rejected", 0) == 0


def test_resend_of_an_upcast_change_is_recognised(store_factory: StoreFactory,
                                                  tmp_path: Path) -> None:
    engine, _, _ = published(store_factory, tmp_path)
    batch = changes("van-1", [task(1, "t-1", notes="x", eta=7)], sv=1)
    engine.handle_up("van-1", batch)
    out = by_device(engine.handle_up("van-1", batch))
    assert oks(out["van-1"]) == [[1, "r1", 1]] and rejections(out["van-1"]) == []


def test_value_that_cannot_be_converted_is_refused_naming_the_migration(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    engine, _, _ = published(store_factory, tmp_path)
    inv = {"c": "inventory", "s": "d1", "op": "put", "b": 0}
    out = by_device(engine.handle_up("van-1", changes("van-1", [
        {**inv, "n": 1, "h": hp(T0 + 1), "k": "a", "f": {"depot": "d1", "bin": "12"}},
        {**inv, "n": 2, "h": hp(T0 + 2), "k": "b",
         "f": {"depot": "d1", "bin": "A-12"}}], sv=1)))
    assert [ok[0] for ok in oks(out["van-1"])] == [1]
    (rj,) = rejections(out["van-1"])
    assert rj["n"] == 2 and rj["code"] == "type_mismatch" and rj["perm"] is True
    assert "schema version 1" in rj["reason"] and "convert" in rj["reason"]
    assert "'A-12' is not an integer" in rj["reason"]


def test_without_a_history_nothing_is_upcast(store_factory: StoreFactory,
                                             tmp_path: Path) -> None:
    # The server runs version 4 but nothing was published: changes are judged as
    # written (the behaviour before schema histories).
    engine, _, _ = make_engine(tmp_path, {"van-1": ["r1"]}, catalog=catalog(V4),
                               store=store_factory())
    out = by_device(engine.handle_up("van-1", changes("van-1", [
        task(1, "t-1", eta=1764000000001)], sv=1)))
    (rj,) = rejections(out["van-1"])
    assert rj["code"] == "type_mismatch"


def test_device_on_an_older_version_gets_records_projected_down(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    engine, _, _ = published(store_factory, tmp_path)
    for dev, sv in (("van-1", 1), ("van-2", 4)):
        engine.handle_status(dev, status(dev))
        engine.handle_up(dev, hello(dev, sv=sv))
    out = by_device(engine.handle_up("van-2", changes("van-2", [
        task(1, "t-1", note="gate code 12", eta="1764000000001", floor=3)], sv=4)))
    assert oks(out["van-2"]) == [[1, "r1", 1]]
    (delta,) = of_type(out["van-1"], "delta")
    (rec,) = delta["d"]
    # van-1 runs version 1: `notes`, `eta` as an int, and no `floor` (added in v2).
    assert rec["f"] == {"route": "r1", "notes": "gate code 12", "eta": 1764000000001}
    assert set(rec["h"]) == {"route", "notes", "eta"}
    # The catch-up page is projected the same way.
    page_out = by_device(engine.handle_up("van-1", catchup("van-1", {"r1": 0})))
    (page,) = of_type(page_out["van-1"], "page")
    assert page["recs"][0]["f"] == rec["f"]
    # A device on the newest version gets the record as stored.
    out = by_device(engine.handle_up("van-1", changes("van-1", [
        task(1, "t-2", notes="n", eta=9)], sv=1)))
    (delta,) = of_type(out["van-2"], "delta")
    assert delta["d"][0]["f"] == {"route": "r1", "note": "n", "eta": "9"}
    # ... and the writer on version 1 sees no echo it could not read.
    assert rejections(out["van-1"]) == []


def test_value_that_cannot_go_back_is_left_out_for_the_old_device(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    engine, _, _ = published(store_factory, tmp_path)
    for dev, sv in (("van-1", 1), ("van-2", 4)):
        engine.handle_status(dev, status(dev))
        engine.handle_up(dev, hello(dev, sv=sv))
    out = by_device(engine.handle_up("van-2", changes("van-2", [
        task(1, "t-1", eta="tomorrow", note="x")], sv=4)))
    (delta,) = of_type(out["van-1"], "delta")
    assert delta["d"][0]["f"] == {"route": "r1", "notes": "x"}
    assert "eta" not in delta["d"][0]["h"]


def test_welcome_states_the_versions_and_too_old_changes_wait(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    store = store_factory()
    for n, text in ((2, V2), (3, V3), (4, V4)):  # the history starts at version 2
        schema_history.publish(store, text, f"v{n}.toml", n)
    engine, _, _ = make_engine(tmp_path, {"van-1": ["r1"], "van-2": ["r1"]},
                               catalog=catalog(V4), store=store)
    hello_caps = orjson.dumps({"type": "hello", "v": 1, "dev": "van-1", "agent": "t/1",
                               "sv": 1, "caps": ["schema"]})
    (welcome,) = of_type(by_device(engine.handle_up("van-1", hello_caps))["van-1"], "welcome")
    assert welcome["caps"] == ["schema"] and (welcome["sv"], welcome["sv_min"]) == (4, 2)
    # van-1 agreed `schema` and runs version 1: its changes wait (transient).
    out = by_device(engine.handle_up("van-1", changes("van-1", [
        task(1, "t-1", notes="n", eta=5)], sv=1)))
    (rj,) = rejections(out["van-1"])
    assert (rj["code"], rj["perm"]) == ("schema_version", False)
    assert "upgrade needed" in rj["reason"] and "(2)" in rj["reason"]
    engine.tick()
    with store.read() as txn:  # a foreseen wait, not a problem for the operator
        assert txn.dead_letters(10) == []
    # Sent again as version 2 after its upgrade: upcast and applied.
    out = by_device(engine.handle_up("van-1", changes("van-1", [
        task(1, "t-1", notes="n", eta=5)], sv=2)))
    assert oks(out["van-1"]) == [[1, "r1", 1]]
    # van-2 never offered `schema`: judged as before (no welcome, not held back).
    engine.handle_up("van-2", hello("van-2", sv=1))
    out = by_device(engine.handle_up("van-2", changes("van-2", [
        task(1, "t-2", status="out")], sv=1)))
    assert oks(out["van-2"]) == [[1, "r1", 2]]


def test_welcome_without_a_history_states_no_oldest(store_factory: StoreFactory,
                                                    tmp_path: Path) -> None:
    engine, _, _ = make_engine(tmp_path, {"van-1": ["r1"]}, store=store_factory())
    hello_caps = orjson.dumps({"type": "hello", "v": 1, "dev": "van-1", "agent": "t/1",
                               "sv": 1, "caps": ["schema"]})
    (welcome,) = of_type(by_device(engine.handle_up("van-1", hello_caps))["van-1"], "welcome")
    assert welcome["sv"] == 1 and "sv_min" not in welcome


def test_too_old_changes_in_the_same_group_as_the_hello_wait_too(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """A device that connects and sends at once: its hello (agreeing `schema`) and its
    too-old changes are merged in ONE group. The changes are judged with the
    capabilities that hello agreed, so they wait (transient) instead of being refused
    for good against the newest schema (a flaky e2e failure: `unknown_field`)."""
    store = store_factory()
    for n, text in ((2, V2), (3, V3), (4, V4)):
        schema_history.publish(store, text, f"v{n}.toml", n)
    engine, _, _ = make_engine(tmp_path, {"van-1": ["r1"]}, catalog=catalog(V4), store=store)
    hello_caps = orjson.dumps({"type": "hello", "v": 1, "dev": "van-1", "agent": "t/1",
                               "sv": 1, "caps": ["schema"]})
    out = by_device(engine.handle_many([
        ("van-1", hello_caps),
        ("van-1", changes("van-1", [task(1, "t-1", notes="n", eta=5)], sv=1))]))
    (rj,) = rejections(out["van-1"])
    assert (rj["code"], rj["perm"]) == ("schema_version", False)
