"""Capability negotiation (PROTOCOL.md §7.1 `caps`, §7.11 `welcome`, §11): a device that
offers features is told which are agreed, the agreement is kept in its row across a
server restart, and a v1 device that offers none is sent nothing new. Both backends."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from broker.errors import InvalidArgument, UnknownDevice
from broker.server import caps as server_caps
from broker.server.engine import Engine
from broker.server.registry import change_scopes
from broker.server.store.base import Store
from schemas import codec, zdict
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    by_device,
    changes,
    decode,
    errors,
    make_engine,
    of_type,
    oks,
    task,
)

DEVICES = {"van-1": ["r1"]}


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    engine, store, _ = make_engine(tmp_path, DEVICES, store=store_factory())
    yield engine, store


def hello(caps: Any = None, **extra: Any) -> bytes:
    msg: dict[str, Any] = {"type": "hello", "v": 1, "dev": "van-1", "agent": "t/1", "sv": 1,
                           **extra}
    if caps is not None:
        msg["caps"] = caps
    return orjson.dumps(msg)


def _row_caps(store: Store) -> tuple[str, ...]:
    with store.read() as txn:
        row = txn.get_device("van-1")
    assert row is not None
    return row.caps


def test_a_hello_without_caps_gets_no_welcome(env: tuple[Engine, Store]) -> None:
    engine, store = env
    out = by_device(engine.handle_up("van-1", hello()))
    assert of_type(out.get("van-1", []), "welcome") == []
    assert _row_caps(store) == ()


def test_offered_caps_are_answered_with_the_agreed_ones_first(
        env: tuple[Engine, Store], monkeypatch: pytest.MonkeyPatch) -> None:
    engine, store = env
    monkeypatch.setattr(server_caps, "SERVER_CAPS", frozenset({"alpha", "beta"}))
    out = by_device(engine.handle_up("van-1", hello(["beta", "zeta"])))
    msgs = out["van-1"]
    assert msgs[0]["type"] == "welcome"
    assert msgs[0]["caps"] == ["beta"]
    assert msgs[0]["srv"].startswith("waystation-server/")
    assert _row_caps(store) == ("beta",)
    # A later hello without caps (an agent downgraded to v1) withdraws the agreement.
    engine.handle_up("van-1", hello())
    assert _row_caps(store) == ()


def test_an_empty_offer_is_welcomed_with_nothing(env: tuple[Engine, Store]) -> None:
    engine, store = env
    out = by_device(engine.handle_up("van-1", hello([])))
    assert [m for m in out["van-1"] if m["type"] == "welcome"] == [
        {"type": "welcome", "v": 1, "caps": [], "srv": out["van-1"][0]["srv"]}]
    assert _row_caps(store) == ()


@pytest.mark.parametrize("bad", [
    ["Bad-Name"], ["x" * 33], [""], [1], "txn", [f"c{i}" for i in range(33)], {"a": 1}])
def test_malformed_caps_are_refused_as_invalid(env: tuple[Engine, Store], bad: Any) -> None:
    engine, store = env
    out = by_device(engine.handle_up("van-1", hello(bad)))
    msgs = out.get("van-1", [])
    assert of_type(msgs, "welcome") == []
    assert [e["code"] for e in errors(msgs)] == ["invalid"]
    with store.read() as txn:
        assert txn.dead_letters(10)  # the operator sees the refused hello


# ------------------------------------------------ scope changes (capability `scopes`)


def _commands(store: Store) -> list[Any]:
    with store.read() as txn:
        return txn.commands("van-1")


def test_changed_scopes_take_effect_and_supersede_an_unsent_change(
        env: tuple[Engine, Store]) -> None:
    _, store = env
    row, first = change_scopes(store, "van-1", 1, add=["r2"])
    assert row.scopes == ("r1", "r2") and first is not None
    row, second = change_scopes(store, "van-1", 2, remove=["r1"])
    assert row.scopes == ("r2",) and second is not None
    pending = [c for c in _commands(store) if not c.done_ms]
    assert [(c.cmd, c.args) for c in pending] == [("scopes", {"scopes": ["r2"]})]
    assert change_scopes(store, "van-1", 3, add=["r2"]) == (row, None), "no change, no command"


@pytest.mark.parametrize(("add", "remove", "message"), [
    ((), ("r1",), "would follow no scope"),
    ((), ("r7",), "does not follow r7"),
    (("bad scope",), (), "not a valid scope"),
])
def test_impossible_scope_changes_are_refused(env: tuple[Engine, Store], add: Any,
                                             remove: Any, message: str) -> None:
    _, store = env
    with pytest.raises(InvalidArgument, match=message):
        change_scopes(store, "van-1", 1, add=add, remove=remove)
    assert _commands(store) == []
    with pytest.raises(UnknownDevice):
        change_scopes(store, "nobody", 1, add=["r1"])


def test_the_scopes_command_goes_only_to_a_device_that_speaks_it(
        env: tuple[Engine, Store]) -> None:
    engine, store = env
    change_scopes(store, "van-1", 1, add=["r2"])
    legacy = by_device(engine.handle_up("van-1", hello()))
    assert of_type(legacy.get("van-1", []), "command") == [], "v1 device: kept pending"
    out = by_device(engine.handle_up("van-1", hello(["scopes"])))
    assert [m["type"] for m in out["van-1"]] == ["welcome", "command"]
    assert out["van-1"][1]["cmd"] == "scopes"
    assert out["van-1"][1]["args"] == {"scopes": ["r1", "r2"]}


# ----------------------------------- compact encoding (capability `zd1`, schemas.zdict)


def _zd1(payload: bytes) -> bool:
    return zdict.wants_dictionary(payload) == zdict.DICT_ID


def test_a_device_that_agreed_to_zd1_gets_small_messages_with_the_dictionary(
        env: tuple[Engine, Store]) -> None:
    engine, store = env
    out = engine.handle_up("van-1", hello(["schema", "txn", "zd1"]))
    [welcome] = [codec.decode(p) for _, p in out if codec.decode(p).type == "welcome"]
    assert "zd1" in welcome.caps  # type: ignore[attr-defined]
    assert "zd1" in _row_caps(store)
    # its change sent with the dictionary is read; the ack comes back with it too
    payload = codec.encode_dict(orjson.loads(changes("van-1", [task(1, "t-1")])), zdict=True)
    assert _zd1(payload)
    out = engine.handle_up("van-1", payload)
    [(dev, ack)] = [(d, p) for d, p in out if codec.decode(p).type == "ack"]
    assert dev == "van-1" and _zd1(ack)
    assert oks(by_device(out)["van-1"]) == [[1, "r1", 1]]
    assert len(ack) < len(orjson.dumps(decode(ack)))


@pytest.mark.parametrize("offer", [None, ["schema", "txn"]])
def test_a_device_without_zd1_gets_what_v1_devices_always_got(
        env: tuple[Engine, Store], offer: list[str] | None) -> None:
    engine, _ = env
    engine.handle_up("van-1", hello(offer, z=True))
    out = engine.handle_up("van-1", changes("van-1", [task(1, "t-1")]))
    for _, payload in out:
        assert payload[:1] == b"{", "a small message stays plain JSON"
        assert not _zd1(payload)
    assert oks(by_device(out)["van-1"]) == [[1, "r1", 1]]
    # a big one is compressed as before: plain zlib, which any v1 device reads
    chs = [task(i, f"t-{i}", notes="x" * 200) for i in range(2, 120)]
    out = engine.handle_up("van-1", changes("van-1", chs))
    packed = [p for _, p in out if p[:1] == b"\x78"]
    assert packed and all(not _zd1(p) for p in packed)
    assert all(orjson.loads(zlib.decompress(p)) for p in packed)


# ------------------------ schema dictionary (capability `zd2`, schemas.zdict_schema)


def test_a_device_with_the_servers_schema_dictionary_agrees_to_zd2(
        env: tuple[Engine, Store]) -> None:
    from schemas import zdict_schema
    from tests.server.helpers import CATALOG

    engine, store = env
    data = zdict_schema.dictionary(CATALOG)
    assert _row_caps(store) == ()
    out = engine.handle_up("van-1", hello(["txn", "zd1", "zd2"],
                                          zd=zdict_schema.dict_id(data)))
    [welcome] = [codec.decode(p) for _, p in out if codec.decode(p).type == "welcome"]
    assert {"zd1", "zd2"} <= set(welcome.caps)  # type: ignore[attr-defined]
    payload = codec.encode_dict(orjson.loads(changes("van-1", [task(1, "t-1")])), zdict=data)
    assert zdict.wants_dictionary(payload) == zdict_schema.dict_id(data)
    out = engine.handle_up("van-1", payload)
    assert oks(by_device(out)["van-1"]) == [[1, "r1", 1]]
    [(_, ack)] = [(d, p) for d, p in out if codec.decode(p).type == "ack"]
    assert _zd1(ack), "down messages keep the zd1 dictionary, which the device holds"


@pytest.mark.parametrize("zd", [None, 12345])
def test_zd2_is_not_agreed_for_a_dictionary_the_server_lacks(
        env: tuple[Engine, Store], zd: int | None) -> None:
    engine, store = env
    extra = {} if zd is None else {"zd": zd}
    out = engine.handle_up("van-1", hello(["zd1", "zd2"], **extra))
    [welcome] = [codec.decode(p) for _, p in out if codec.decode(p).type == "welcome"]
    assert welcome.caps == ["zd1"]  # type: ignore[attr-defined]
    assert _row_caps(store) == ("zd1",)
    # a stream made with a dictionary this server does not hold is refused, not guessed
    stream = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY,
                              zdict.DICTIONARY + b'"c":"nope"')
    payload = stream.compress(changes("van-1", [task(1, "t-1")])) + stream.flush()
    out = engine.handle_up("van-1", payload)
    assert [e["code"] for e in errors(by_device(out)["van-1"])] == [codec.MALFORMED]
