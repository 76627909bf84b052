"""A hostile device and capability `zd3` (PROTOCOL.md §3 "Recent traffic", §8, §11):
random DICTIDs at a high rate, caps flapping, `zd3` offered without `zd2`, messages
around the 2,048-byte reference boundary, many devices filling their 8 references,
and limits below one device's references. The cache stays within
`merge.recent_dictionary_bytes`, every bad message gets its documented code, no dead
letter is kept for `dictionary_unknown`, and another device keeps syncing."""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from broker.server.engine import Engine
from broker.server.recent import RecentTraffic
from broker.server.registry import add_device
from broker.server.store.base import Store
from schemas import codec, zdict, zdict_recent, zdict_schema
from tests.server.helpers import CATALOG, by_device, changes, errors, make_engine, oks, task

BASE = zdict_schema.dictionary(CATALOG)
ZD = zdict_schema.dict_id(BASE)
CAPS = ["txn", "zd1", "zd2", "zd3"]
FDICT_HEADER = bytes([0x78, next(f for f in range(256)
                                 if f & 0x20 and (0x78 * 256 + f) % 31 == 0)])
"""A zlib header (RFC 1950) with FDICT set: a DICTID follows."""


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    zdict_schema.register(CATALOG)
    eng, store, _ = make_engine(tmp_path, {"van-1": ["r1"], "van-2": ["r1"]})
    try:
        yield eng
    finally:
        store.close()


def _hello(caps: list[str], dev: str = "van-1", zd: int | None = ZD) -> bytes:
    msg: dict[str, Any] = {"type": "hello", "v": 1, "dev": dev, "agent": "t/1", "sv": 1,
                           "caps": caps}
    if zd is not None:
        msg["zd"] = zd
    return orjson.dumps(msg)


def _welcome(out: list[tuple[str, bytes]]) -> list[str]:
    [w] = [m for m in (codec.decode(p) for _, p in out) if m.type == "welcome"]
    return list(w.caps)  # type: ignore[attr-defined]


def _letters(store: Store) -> list[Any]:
    with store.read() as txn:
        return list(txn.dead_letters(100_000))


def _sized(dev: str, n: int, size: int) -> bytes:
    """A `changes` message of exactly `size` bytes of JSON (first change `n`)."""
    plain = changes(dev, [task(n, f"t-{n}", notes="")])
    pad = size - len(plain)
    assert pad >= 0
    out = changes(dev, [task(n, f"t-{n}", notes="x" * pad)])
    assert len(out) == size
    return out


def test_zd3_offered_without_zd2_is_neither_agreed_nor_kept(engine: Engine) -> None:
    """The hello names a dictionary the server holds but offers `zd3` without `zd2`: the
    welcome leaves `zd3` out, nothing of the device is kept, and a stream made with its
    messages is `malformed` (kept as a dead letter, like any unreadable stream)."""
    assert engine.recent is not None
    assert "zd3" not in _welcome(engine.handle_up("van-1", _hello(["zd1", "zd3"])))
    first = changes("van-1", [task(1, "t-1")])
    assert oks(by_device(engine.handle_up("van-1", zlib.compress(first)))["van-1"])
    assert not engine.recent.tracked("van-1") and engine.recent.bytes == 0
    stream = zdict.pack(changes("van-1", [task(2, "t-2")]), BASE + first)
    out = by_device(engine.handle_up("van-1", stream))["van-1"]
    assert [e["code"] for e in errors(out)] == [codec.MALFORMED]


def test_caps_flapping_keeps_nothing_while_zd3_is_off(engine: Engine) -> None:
    """zd3 on and off every few messages, 20 times: while off the device's references
    are gone (bytes back to 0) and a `zd3` stream is `malformed`; once on again a `zd2`
    stream starts them anew and a `zd3` stream made of it is read; every change is
    applied exactly once."""
    recent = engine.recent
    assert recent is not None
    n = 0
    for _ in range(20):
        assert "zd3" in _welcome(engine.handle_up("van-1", _hello(CAPS)))
        n += 1
        first = changes("van-1", [task(n, f"t-{n}")])
        assert oks(by_device(engine.handle_up("van-1", zdict.pack(first, BASE)))["van-1"]) \
            == [[n, "r1", n]]
        n += 1
        out = by_device(engine.handle_up(
            "van-1", zdict.pack(changes("van-1", [task(n, f"t-{n}")]), BASE + first)))
        assert oks(out["van-1"]) == [[n, "r1", n]], out
        assert 0 < recent.bytes <= recent.limit
        assert "zd3" not in _welcome(engine.handle_up("van-1", _hello(["zd1", "zd2"])))
        assert not recent.tracked("van-1") and recent.bytes == 0
        out = by_device(engine.handle_up(
            "van-1", zdict.pack(changes("van-1", [task(n + 1, "t-x")]), BASE + first)))
        assert [e["code"] for e in errors(out["van-1"])] == [codec.MALFORMED]


def test_random_dictids_are_refused_without_dead_letters_and_others_sync(
        tmp_path: Path) -> None:
    """500 streams naming random DICTIDs (garbage bodies), each in a group with another
    device's change: each is `dictionary_unknown` with no dead letter, the cache does
    not grow, and every change of the other device is acked."""
    zdict_schema.register(CATALOG)
    engine, store, _ = make_engine(tmp_path, {"van-1": ["r1"], "van-2": ["r1"]})
    try:
        recent = engine.recent
        assert recent is not None
        engine.handle_up("van-1", _hello(CAPS))
        engine.handle_up("van-1", zdict.pack(changes("van-1", [task(1, "t-1")]), BASE))
        held = recent.bytes
        rng = random.Random(3)
        for i in range(500):
            stream = FDICT_HEADER + rng.getrandbits(32).to_bytes(4, "big") + rng.randbytes(
                rng.randint(0, 300))
            assert zdict.wants_dictionary(stream) is not None
            other = changes("van-2", [task(i + 1, f"o-{i}")])
            out = by_device(engine.handle_many([("van-1", stream), ("van-2", other)]))
            assert [e["code"] for e in errors(out["van-1"])] == [codec.DICTIONARY_UNKNOWN]
            assert oks(out["van-2"]) == [[i + 1, "r1", i + 2]]
        engine.tick()
        assert recent.bytes == held and recent.misses == 500
        assert [d for d in _letters(store) if d.device == "van-1"] == []
    finally:
        store.close()


@pytest.mark.parametrize(("size", "kept"), [(2047, True), (2048, True), (2049, False)])
def test_the_reference_boundary_is_2048_bytes(engine: Engine, size: int, kept: bool) -> None:
    """A `changes` message of at most 2,048 bytes is a reference: a stream made with it
    is read; one byte more and it is not, so such a stream is `dictionary_unknown`."""
    engine.handle_up("van-1", _hello(CAPS))
    first = _sized("van-1", 1, size)
    assert zdict_recent.is_reference(first) is kept
    assert oks(by_device(engine.handle_up("van-1", zdict.pack(first, BASE)))["van-1"])
    out = by_device(engine.handle_up(
        "van-1", zdict.pack(changes("van-1", [task(2, "t-2")]), BASE + first)))["van-1"]
    if kept:
        assert oks(out) == [[2, "r1", 2]]
    else:
        assert [e["code"] for e in errors(out)] == [codec.DICTIONARY_UNKNOWN]


def test_a_bomb_named_with_a_valid_dictionary_is_too_large(engine: Engine) -> None:
    """A stream naming the device's real references whose body inflates past the limit
    is refused `too_large` (kept as a dead letter), read no further."""
    engine.handle_up("van-1", _hello(CAPS))
    first = changes("van-1", [task(1, "t-1")])
    engine.handle_up("van-1", zdict.pack(first, BASE))
    co = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, BASE + first)
    bomb = co.compress(b'{"type":"changes","v":1,"x":"' + b"a" * (16 << 20)) + co.flush()
    out = by_device(engine.handle_up("van-1", bomb))["van-1"]
    assert [e["code"] for e in errors(out)] == [codec.TOO_LARGE]


def test_many_devices_filling_their_references_stay_within_the_bound(
        tmp_path: Path) -> None:
    """40 devices each sending 12 reference-sized (~2 KB) messages, with a 64 KiB limit:
    after every message the cache holds at most its limit (least recently used devices
    dropped), and the latest device's references still read."""
    zdict_schema.register(CATALOG)
    limit = 64 << 10
    devs = [f"pd-{i}" for i in range(40)]
    engine, store, _ = make_engine(tmp_path, {d: ["r1"] for d in devs},
                                      recent_dictionary_bytes=limit)
    try:
        recent = engine.recent
        assert recent is not None and recent.limit == limit
        peak = 0
        for dev in devs:
            engine.handle_up(dev, _hello(CAPS, dev))
            last = b""
            for n in range(1, 13):
                last = _sized(dev, n, 2040)
                out = by_device(engine.handle_up(dev, zdict.pack(last, BASE)))[dev]
                assert oks(out) == [[n, "r1", out[0]["ok"][0][2]]]
                peak = max(peak, recent.bytes)
                assert recent.bytes <= limit
            out = by_device(engine.handle_up(dev, zdict.pack(
                changes(dev, [task(13, "t-13")]), BASE + last)))[dev]
            assert oks(out), out
        assert peak > limit // 2 and len(recent) < len(devs)
    finally:
        store.close()


@pytest.mark.parametrize("limit", [1, 64, 1000, 16_000])
def test_a_limit_below_one_devices_references_is_still_the_bound(limit: int) -> None:
    """A limit smaller than one device's 8 references (~17 KiB): the cache never holds
    more than the limit, even with one device (which is then not kept)."""
    recent = RecentTraffic(limit)
    for dev in ("d-1", "d-2"):
        recent.open(dev, BASE)
        assert recent.bytes <= limit
        for n in range(8):
            recent.add(dev, n, b'{"x":"' + b"a" * 2000 + b'"}')
            assert recent.bytes <= limit, (limit, recent.bytes)


def test_an_unregistered_device_keeps_nothing(tmp_path: Path) -> None:
    """A hello offering zd3 from a device the server does not know adds no references."""
    zdict_schema.register(CATALOG)
    engine, store, time = make_engine(tmp_path, {"van-1": ["r1"]})
    try:
        engine.handle_up("ghost-1", _hello(CAPS, "ghost-1"))
        assert engine.recent is not None and not engine.recent.tracked("ghost-1")
        add_device(store, "late-1", ["r1"], time())
        engine.tick()
        assert "zd3" in _welcome(engine.handle_up("late-1", _hello(CAPS, "late-1")))
        assert engine.recent.tracked("late-1")
    finally:
        store.close()
