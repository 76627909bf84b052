"""Capability `schema_push` on the server (PROTOCOL.md §7.13): a running engine follows
`schema publish` / `rollback` without a restart and sends devices the version they
should run next, at hello and while they are online; on both stores."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import orjson

from broker.server import schema_history
from broker.server.engine import Engine
from broker.server.schema_push import LiveSchema
from broker.server.store.base import Store
from schemas.collection import Catalog, parse_catalog
from schemas.wire import MAX_SCHEMA_PUSH_TEXT
from tests.schema_versions import V1, V2, V3, V4
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    FakeTime,
    by_device,
    changes,
    make_engine,
    of_type,
    oks,
    rejections,
    status,
    task,
)
from waystation import merge

TEXTS = {1: V1, 2: V2, 3: V3, 4: V4}


def catalog(version: int) -> Catalog:
    return parse_catalog(tomllib.loads(TEXTS[version]), f"v{version}")


def hello(dev: str, sv: int, caps: tuple[str, ...] = ("schema", "schema_push")) -> bytes:
    return orjson.dumps({"type": "hello", "v": 1, "dev": dev, "agent": "test/1", "sv": sv,
                         "z": False, "caps": list(caps)})


def setup(store_factory: StoreFactory, tmp_path: Path, upto: int = 2
          ) -> tuple[Engine, Store, FakeTime]:
    """An engine started on schema file v1 with versions 1..`upto` published."""
    store = store_factory()
    for n in range(1, upto + 1):
        schema_history.publish(store, TEXTS[n], f"v{n}.toml", n)
    return make_engine(tmp_path, {"van-1": ["r1"], "van-2": ["r1"], "old-1": ["r1"]},
                       catalog=catalog(1), store=store)


def schema_msgs(msgs: list[dict[str, Any]]) -> list[int]:
    return [m["sv"] for m in of_type(msgs, "schema")]


def test_hello_of_a_device_behind_gets_the_next_version_after_the_welcome(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """The server runs the newest published version (not its file's) and answers a
    device one step at a time: version 2 to a device on 1, nothing to one on 3."""
    engine, _, _ = setup(store_factory, tmp_path, upto=3)
    out = by_device(engine.handle_up("van-1", hello("van-1", 1)))["van-1"]
    assert [m["type"] for m in out] == ["welcome", "schema"]
    assert out[0]["sv"] == 3 and out[0]["sv_min"] == 1
    assert out[1]["sv"] == 2 and out[1]["text"] == V2
    out = by_device(engine.handle_up("van-1", hello("van-1", 2)))["van-1"]
    assert schema_msgs(out) == [3] and out[1]["text"] == V3
    out = by_device(engine.handle_up("van-1", hello("van-1", 3)))["van-1"]
    assert schema_msgs(out) == []


def test_device_without_the_capability_is_never_sent_a_schema(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """Today's behaviour for devices that do not offer `schema_push`: only the welcome."""
    engine, store, time = setup(store_factory, tmp_path)
    out = by_device(engine.handle_up("old-1", hello("old-1", 1, ("schema",))))["old-1"]
    assert [m["type"] for m in out] == ["welcome"] and "schema_push" not in out[0]["caps"]
    engine.handle_status("old-1", status("old-1"))
    schema_history.publish(store, V3, "v3.toml", time())
    assert schema_msgs(by_device(engine.tick()).get("old-1", [])) == []


def test_publish_while_online_reaches_the_device_and_the_engine_at_once(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """A version published by another process is run at the next tick (welcome says it,
    changes under it are accepted) and sent to online devices that agreed the feature."""
    engine, store, time = setup(store_factory, tmp_path)
    for dev in ("van-1", "van-2"):
        engine.handle_up(dev, hello(dev, 2))
        engine.handle_status(dev, status(dev, on=dev == "van-1"))
    assert by_device(engine.tick()).get("van-1") is None
    # v3 renames tasks.notes -> note: before the publish a v3 change is "newer" (held).
    held = by_device(engine.handle_up("van-2", changes("van-2", [task(1, "t-1", note="x")],
                                                       sv=3)))["van-2"]
    assert rejections(held)[0]["code"] == "schema_version"
    schema_history.publish(store, V3, "v3.toml", time())
    out = by_device(engine.tick())
    assert schema_msgs(out["van-1"]) == [3] and "van-2" not in out  # van-2 is offline
    welcome = of_type(by_device(engine.handle_up("van-2", hello("van-2", 2)))["van-2"],
                      "welcome")[0]
    assert welcome["sv"] == 3
    done = by_device(engine.handle_up("van-2", changes("van-2", [task(1, "t-1", note="x")],
                                                       sv=3)))["van-2"]
    assert oks(done) == [[1, "r1", 1]]
    # A change still written under 2 is upcast to 3 (notes -> note).
    done = by_device(engine.handle_up("van-1", changes("van-1", [
        task(1, "t-2", notes="ring")], sv=2)))["van-1"]
    assert oks(done) == [[1, "r1", 2]]


def test_rollback_sends_devices_that_took_the_version_back(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """After `schema rollback` the engine runs the version below at once, and a device
    that runs the rolled-back version is sent the live one (at its hello and online)."""
    engine, store, time = setup(store_factory, tmp_path, upto=3)
    engine.handle_up("van-1", hello("van-1", 3))
    engine.handle_status("van-1", status("van-1"))
    engine.tick()
    schema_history.rollback(store, time())
    out = by_device(engine.tick())
    assert schema_msgs(out["van-1"]) == [2] and of_type(out["van-1"], "schema")[0]["text"] == V2
    answer = by_device(engine.handle_up("van-1", hello("van-1", 3)))["van-1"]
    assert answer[0]["sv"] == 2 and schema_msgs(answer) == [2]


def test_nothing_published_nothing_sent(store_factory: StoreFactory, tmp_path: Path) -> None:
    """Without a history the server runs its file and sends no `schema`."""
    engine, _, _ = setup(store_factory, tmp_path, upto=0)
    out = by_device(engine.handle_up("van-1", hello("van-1", 0)))["van-1"]
    assert [m["type"] for m in out] == ["welcome"] and out[0]["sv"] == 1


def test_live_schema_picks_the_version_to_run(store_factory: StoreFactory) -> None:
    """The file wins only when it is newer than every published version (also rolled
    back ones); a text over the message bound is not sent."""
    store = store_factory()
    for n in (1, 2, 3):
        schema_history.publish(store, TEXTS[n], f"v{n}.toml", n)
    schema_history.rollback(store, 9)
    live = LiveSchema(catalog(3))
    with store.read() as txn:
        assert live.refresh(txn) and not live.refresh(txn)
    assert live.catalog.version == 2  # the file's version 3 was rolled back
    assert [live.target_for(sv) for sv in (0, 1, 2, 3, 7)] == [1, 2, None, 2, 2]
    ahead = LiveSchema(catalog(4))
    with store.read() as txn:
        ahead.refresh(txn)
    assert ahead.catalog.version == 4 and ahead.push_for(1) is None  # 4 is unpublished
    big = V2.replace("version = 2", "version = 4\n# " + "x" * MAX_SCHEMA_PUSH_TEXT)
    schema_history.publish(store, big, "big.toml", 10)
    with store.read() as txn:
        live.refresh(txn)
    assert live.catalog.version == 4 and live.push_for(2) is None


def test_publish_and_rollback_rewrite_the_stored_records(store_factory: StoreFactory,
                                                        tmp_path: Path) -> None:
    """Records stored under version 2 are renamed by the publish of 3 (and its eta kept
    an int), converted by 4 (eta -> string), and taken back by the rollback of 4."""
    engine, store, time = setup(store_factory, tmp_path)
    engine.handle_up("van-1", hello("van-1", 2))
    out = by_device(engine.handle_up("van-1", changes("van-1", [
        task(1, "t-1", notes="ring", eta=17), task(2, "t-2", eta=5)], sv=2)))["van-1"]
    assert len(oks(out)) == 2

    def fields(key: str) -> dict[str, Any]:
        with store.read() as txn:
            raw = txn.get_record("tasks", key)
        assert raw is not None
        return merge.to_rec(merge.from_json(raw))["f"]

    assert schema_history.publish(store, V3, "v3.toml", time()).records == 1  # t-2: no notes
    assert fields("t-1") == {"route": "r1", "note": "ring", "eta": 17}
    assert schema_history.publish(store, V4, "v4.toml", time()).records == 2
    assert fields("t-1")["eta"] == "17" and fields("t-2")["eta"] == "5"
    schema_history.rollback(store, time())
    assert fields("t-1") == {"route": "r1", "note": "ring", "eta": 17}
    # The engine, on version 3 now, projects the record down for a device on 2.
    engine.tick()
    engine.handle_up("van-2", hello("van-2", 2))
    page = of_type(by_device(engine.handle_up("van-2", orjson.dumps({
        "type": "catchup", "v": 1, "dev": "van-2", "req": "c", "cp": {"r1": 0}})))["van-2"],
        "page")[0]
    t1 = next(r for r in page["recs"] if r["k"] == "t-1")
    assert t1["f"] == {"route": "r1", "notes": "ring", "eta": 17}


def test_a_push_the_link_refused_is_offered_again_once_it_is_back(
        store_factory: StoreFactory, tmp_path: Path) -> None:
    """The daemon could not hand the publish's `schema` push to the broker (its link was
    down): a device online all along would otherwise run the old version until its next
    reconnect."""
    engine, store, time = setup(store_factory, tmp_path)
    engine.handle_up("van-1", hello("van-1", 2))
    engine.handle_status("van-1", status("van-1"))
    assert by_device(engine.tick()).get("van-1") is None
    schema_history.publish(store, V3, "v3.toml", time())
    assert schema_msgs(by_device(engine.tick())["van-1"]) == [3]
    engine.undelivered("van-1")  # what the daemon does when link.publish refuses it
    engine.heartbeat.broker(False, time())
    assert by_device(engine.tick()).get("van-1") is None  # not while the link is down
    engine.heartbeat.broker(True, time())
    assert schema_msgs(by_device(engine.tick())["van-1"]) == [3]
    assert by_device(engine.tick()).get("van-1") is None  # once
    engine.handle_up("van-1", hello("van-1", 3))  # took it
    engine.undelivered("van-1")
    assert by_device(engine.tick()).get("van-1") is None  # nothing due: nothing sent
