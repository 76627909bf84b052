"""Down-message building: splitting under the size bound, compression, exact shapes."""

from __future__ import annotations

import random
import zlib

import orjson

from broker.server.messages import (
    MAX_DOWN_BYTES,
    ack_messages,
    compress,
    delta_messages,
    reject_messages,
    rejection,
)
from schemas import codec, wire


def _rec(i: int, size: int = 10) -> bytes:
    return orjson.dumps({"c": "tasks", "k": f"k{i}", "s": "r1", "q": i, "f": {"x": "y" * size}})


def test_small_ack_is_one_valid_message() -> None:
    """An ack carries ok entries, deduplicated fx states and rs, and decodes as an Ack."""
    fx = _rec(1)
    (msg,) = ack_messages([(b'[1,"r1",1]', fx), (b'[2,"r1",2]', fx), (b'[3,"r1",3]', None)],
                          [2])
    ack = codec.decode(msg, allowed=wire.DOWN_TYPES)
    assert isinstance(ack, wire.Ack)
    assert ack.ok == [(1, "r1", 1), (2, "r1", 2), (3, "r1", 3)]
    assert len(ack.fx) == 1 and ack.rs == [2]


def test_big_ack_is_split_keeping_each_fx_with_its_ok() -> None:
    """A large ack is split; every part is a valid ack under the bound, fx beside its ok."""
    entries = [(orjson.dumps([i, "r1", i]), _rec(i, 20_000)) for i in range(1, 40)]
    msgs = ack_messages(entries, [5])
    assert len(msgs) > 1 and all(len(m) <= MAX_DOWN_BYTES for m in msgs)
    seen = []
    for m in msgs:
        ack = codec.decode(m, allowed=wire.DOWN_TYPES, max_payload=1 << 20)
        assert isinstance(ack, wire.Ack)
        assert [ok[0] for ok in ack.ok] == [fx.q for fx in ack.fx]
        seen += [ok[0] for ok in ack.ok]
    assert seen == list(range(1, 40))
    assert orjson.loads(msgs[0])["rs"] == [5] and "rs" not in orjson.loads(msgs[1])


def test_split_ack_puts_each_rs_beside_its_ok() -> None:
    """§7.4: a re-stamped change is named in `rs` of the part that acks it, not the first."""
    entries = [(orjson.dumps([i, "r1", i]), _rec(i, 20_000)) for i in range(1, 40)]
    msgs = ack_messages(entries, [2, 39])
    parts = [orjson.loads(m) for m in msgs]
    assert parts[0]["rs"] == [2] and parts[-1]["rs"] == [39]
    assert all("rs" not in p for p in parts[1:-1])


def test_rejects_and_deltas_split_and_keep_order() -> None:
    """Rejections and delta states are split in order; err goes with the first part."""
    rjs = [rejection(i, "invalid", "x" * 30_000, True) for i in range(1, 12)]
    msgs = reject_messages(rjs, {"code": "invalid", "reason": "nameless"})
    assert len(msgs) > 1
    docs = [orjson.loads(m) for m in msgs]
    assert [r["n"] for d in docs for r in d["rj"]] == list(range(1, 12))
    assert docs[0]["err"]["reason"] == "nameless" and all("err" not in d for d in docs[1:])
    recs = [_rec(i, 50_000) for i in range(1, 10)]
    parts = delta_messages(recs)
    assert [r["q"] for p in parts for r in orjson.loads(p)["d"]] == list(range(1, 10))
    assert all(len(p) <= MAX_DOWN_BYTES for p in parts)


def test_one_oversized_state_still_travels_alone() -> None:
    """A single state bigger than the budget is sent in a message of its own."""
    parts = delta_messages([_rec(1, 10), _rec(2, 300_000), _rec(3, 10)])
    assert [len(orjson.loads(p)["d"]) for p in parts] == [1, 1, 1]


def test_compress_only_when_large_and_smaller() -> None:
    """Compression applies above the bound and only when it shrinks the payload."""
    text = b'{"type":"delta","v":1,"d":[]}' + b" " * 2000
    assert compress(text, None) == text
    assert compress(text, 10_000) == text
    packed = compress(text, 512)
    assert packed[:1] == b"\x78" and zlib.decompress(packed) == text
    noise = random.Random(1).randbytes(1000)
    assert compress(noise, 10) == noise
