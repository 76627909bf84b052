"""Capability `zd3` at the merge server (PROTOCOL.md §3 "Recent traffic", §11): agreed only
with `zd2` and where it is served; a stream compressed with the device's answered
messages is read; one naming messages the server does not hold is refused
`dictionary_unknown` without a dead letter; dead letters keep the message's text; hostile
streams stay bounded. Both backends."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from broker.server import liveness
from broker.server.engine import Engine
from broker.server.store.base import ServerRow, Store
from schemas import codec, zdict, zdict_recent, zdict_schema
from tests.server.conftest import StoreFactory
from tests.server.helpers import (
    CATALOG,
    FakeTime,
    by_device,
    changes,
    errors,
    make_engine,
    oks,
    task,
)

BASE = zdict_schema.dictionary(CATALOG)
CAPS = ["txn", "zd1", "zd2", "zd3"]


@pytest.fixture
def env(tmp_path: Path, store_factory: StoreFactory) -> Iterator[tuple[Engine, Store]]:
    zdict_schema.register(CATALOG)
    engine, store, _ = make_engine(tmp_path, {"van-1": ["r1"]}, store=store_factory())
    yield engine, store


def hello(caps: list[str], zd: int | None = zdict_schema.dict_id(BASE)) -> bytes:
    msg: dict[str, Any] = {"type": "hello", "v": 1, "dev": "van-1", "agent": "t/1", "sv": 1,
                           "caps": caps}
    if zd is not None:
        msg["zd"] = zd
    return orjson.dumps(msg)


def welcome_caps(out: list[tuple[str, bytes]]) -> list[str]:
    [welcome] = [m for m in (codec.decode(p) for _, p in out) if m.type == "welcome"]
    return list(welcome.caps)  # type: ignore[attr-defined]


def test_zd3_is_agreed_with_zd2_only(env: tuple[Engine, Store]) -> None:
    engine, _ = env
    assert "zd3" in welcome_caps(engine.handle_up("van-1", hello(CAPS)))
    assert "zd3" not in welcome_caps(engine.handle_up("van-1", hello(["zd1", "zd3"], None)))
    unknown_schema = hello(CAPS, zd=12345)
    assert "zd3" not in welcome_caps(engine.handle_up("van-1", unknown_schema))


def test_switched_off_it_is_not_agreed(tmp_path: Path, store_factory: StoreFactory) -> None:
    engine, _, _ = make_engine(tmp_path, {"van-1": ["r1"]}, store=store_factory(),
                               recent_dictionary_bytes=0)
    caps = welcome_caps(engine.handle_up("van-1", hello(CAPS)))
    assert "zd2" in caps and "zd3" not in caps


def _put_server(store: Store, row: ServerRow) -> None:
    store.transact(lambda txn: txn.put_server(row))


def test_not_agreed_while_another_server_runs_on_the_store(
        tmp_path: Path, store_factory: StoreFactory) -> None:
    """Servers on one store share the devices' messages (a shared subscription): a device's
    references would mostly be at the other server, so a hello agrees to `zd3` only while
    this server is the only one running; what it saw is from its last liveness write."""
    zdict_schema.register(CATALOG)
    time = FakeTime()
    engine, store, _ = make_engine(tmp_path, {"van-1": ["r1"]}, time=time,
                                   store=store_factory())
    other = ServerRow("server-2", "main", "x", time.now, time.now)
    _put_server(store, other)
    assert "zd3" in welcome_caps(engine.handle_up("van-1", hello(CAPS)))  # not seen yet
    time.now += 5_000
    engine.tick()  # writes its row, reads the others
    caps = welcome_caps(engine.handle_up("van-1", hello(CAPS)))
    assert "zd2" in caps and "zd3" not in caps
    assert "zd3" not in engine.registry.get("van-1").caps  # type: ignore[union-attr]
    _put_server(store, ServerRow("server-2", "main", "x", other.started_ms, time.now,
                                 stopped_ms=time.now))
    time.now += 5_000
    engine.tick()
    assert "zd3" in welcome_caps(engine.handle_up("van-1", hello(CAPS)))
    # A crashed one counts as gone once it has not been seen for the stale threshold.
    _put_server(store, ServerRow("server-3", "main", "x", time.now, time.now))
    time.now += 5_000
    engine.tick()
    assert "zd3" not in welcome_caps(engine.handle_up("van-1", hello(CAPS)))
    time.now += liveness.STALE_AFTER_S * 1000
    engine.tick()
    assert "zd3" in welcome_caps(engine.handle_up("van-1", hello(CAPS)))


def test_a_stream_made_with_answered_messages_is_read(env: tuple[Engine, Store]) -> None:
    engine, _ = env
    engine.handle_up("van-1", hello(CAPS))
    refs = zdict_recent.DeviceRefs(BASE)
    sizes = []
    for n in range(1, 6):
        plain = changes("van-1", [task(n, f"t-{n}", status="out", notes="leave at the door")])
        dictionary = refs.dictionary()
        payload = zdict.pack(plain, dictionary if dictionary is not None else BASE)
        refs.sent(n, plain)
        out = by_device(engine.handle_up("van-1", payload))["van-1"]
        assert oks(out) == [[n, "r1", n]], out
        refs.answered([n])
        sizes.append(len(payload))
    assert engine.recent is not None and engine.recent.hits == 4
    assert sizes[-1] < sizes[0] - 40  # the key, stamp and notes were said before


def test_unknown_references_are_refused_for_a_resend_without_a_dead_letter(
        env: tuple[Engine, Store]) -> None:
    engine, store = env
    engine.handle_up("van-1", hello(CAPS))
    plain = changes("van-1", [task(1, "t-1")])
    payload = zdict.pack(plain, BASE + b'{"something":"the server never read"}')
    out = by_device(engine.handle_up("van-1", payload))["van-1"]
    assert [e["code"] for e in errors(out)] == [codec.DICTIONARY_UNKNOWN]
    assert "zd2" in errors(out)[0]["reason"]
    with store.read() as txn:
        assert txn.dead_letters(10) == []
    # sent again with zd2: applied
    out = by_device(engine.handle_up("van-1", zdict.pack(plain, BASE)))["van-1"]
    assert oks(out) == [[1, "r1", 1]]


def test_a_device_without_zd3_still_gets_malformed(env: tuple[Engine, Store]) -> None:
    engine, _ = env
    engine.handle_up("van-1", hello(["zd1", "zd2"]))
    payload = zdict.pack(changes("van-1", [task(1, "t-1")]), BASE + b'{"x":1}')
    out = by_device(engine.handle_up("van-1", payload))["van-1"]
    assert [e["code"] for e in errors(out)] == [codec.MALFORMED]


def test_a_dead_letter_of_a_zd3_stream_keeps_its_text(env: tuple[Engine, Store]) -> None:
    engine, store = env
    engine.handle_up("van-1", hello(CAPS))
    first = changes("van-1", [task(1, "t-1")])
    engine.handle_up("van-1", zdict.pack(first, BASE))
    bad = changes("van-1", [task(2, "t-2"), {**task(3, "t-3"), "c": "no_such_collection"}])
    payload = zdict.pack(bad, BASE + first)
    out = by_device(engine.handle_up("van-1", payload))["van-1"]
    assert oks(out) == [[2, "r1", 2]]
    with store.read() as txn:
        letters = txn.dead_letters(10)
    assert letters and all(orjson.loads(letter.raw)["type"] == "changes" for letter in letters)


@pytest.mark.parametrize("kind", ["bomb", "truncated", "garbage"])
def test_hostile_streams_with_references_stay_bounded(env: tuple[Engine, Store],
                                                      kind: str) -> None:
    engine, _ = env
    engine.handle_up("van-1", hello(CAPS))
    first = changes("van-1", [task(1, "t-1")])
    engine.handle_up("van-1", zdict.pack(first, BASE))
    dictionary = BASE + first
    if kind == "bomb":
        body = b'{"type":"changes","v":1,"ch":["' + b"a" * (8 << 20) + b'"]}'
        co = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, dictionary)
        payload = co.compress(body) + co.flush()
        expected = codec.TOO_LARGE
    elif kind == "truncated":
        payload = zdict.pack(changes("van-1", [task(2, "t-2")]), dictionary)[:-8]
        expected = codec.MALFORMED
    else:
        payload = zdict.pack(first, dictionary)[:6] + b"\x00garbage"
        expected = codec.MALFORMED
    out = by_device(engine.handle_up("van-1", payload))["van-1"]
    assert [e["code"] for e in errors(out)] == [expected]
