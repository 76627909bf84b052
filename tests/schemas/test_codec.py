"""schemas.codec: bytes <-> typed messages, rejection codes, lenient batches."""

from __future__ import annotations

import array
import re
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from schemas.codec import (
    ALL_CODES,
    DEFAULT_MAX_DECOMPRESSED,
    DEFAULT_MAX_PAYLOAD,
    INVALID,
    MALFORMED,
    MAX_MESSAGE_DEPTH,
    MAX_REASON_CHARS,
    PERMANENT_CODES,
    TOO_LARGE,
    TRANSIENT_CODES,
    UNKNOWN_TYPE,
    UNSUPPORTED_VERSION,
    BadChange,
    LenientChanges,
    ProtocolError,
    decode,
    decode_changes_lenient,
    decode_lenient,
    encode,
    encode_dict,
    is_permanent,
)
from schemas.wire import (
    ALL_TYPES,
    DOWN_TYPES,
    MAX_SAFE_INT,
    SERVER_TYPES,
    STATUS_TYPES,
    UP_TYPES,
    Ack,
    Changes,
    Checkpoint,
    Command,
    ErrorInfo,
    Hello,
    Message,
    Page,
    Rec,
    Reject,
    Status,
)

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"

# --- PROTOCOL.md §12, copied literally ------------------------------------------------

EXAMPLE_STATUS = b'{"type":"status","v":1,"dev":"van-12","on":true}'
EXAMPLE_HELLO = b'{"type":"hello","v":1,"dev":"van-12","agent":"waystation/0.1.0","sv":3,"z":true}'
EXAMPLE_CATCHUP = b'{"type":"catchup","v":1,"dev":"van-12","req":"c-1","cp":{"route-42":1188}}'
EXAMPLE_CHANGES = b"""{"type":"changes","v":1,"dev":"van-12","sv":3,"ch":[
  {"n":17,"h":"0192f2a4c9b10000","c":"tasks","k":"t-1","s":"route-42","b":1188,"op":"put","f":{"status":"delivered"},"i":{"attempts":1}},
  {"n":18,"h":"0192f2a4c9b20000","c":"tasks","k":"t-1","s":"route-42","b":1188,"op":"put","a":{"tags":["fragile"]}}]}"""
EXAMPLE_PAGE = b"""\
{"type":"page","v":1,"req":"c-1","s":"route-42","from":1188,"to":1190,"reset":false,"more":false,
 "recs":[{"c":"tasks","k":"t-1","s":"route-42","q":1190,
          "f":{"status":"failed","notes":"gate locked"},
          "h":{"status":"0192f2a4c9a00000:van-7","notes":"0192f2a4c9a80000:van-7"}}]}"""
EXAMPLE_CHECKPOINT = b'{"type":"checkpoint","v":1,"req":"c-1","cp":{"route-42":1190}}'
EXAMPLE_ACK = b"""{"type":"ack","v":1,"ok":[[17,"route-42",1191],[18,"route-42",1192]],
 "fx":[{"c":"tasks","k":"t-1","s":"route-42","q":1191,"part":true,"f":{"attempts":1}},
       {"c":"tasks","k":"t-1","s":"route-42","q":1192,"part":true,"f":{"tags":["fragile"]},"t":{"tags":{"fragile":["van-12:18"]}}}]}"""
# PROTOCOL.md §6: a record state.
EXAMPLE_REC = b"""{"c": "tasks", "k": "t-1", "s": "route-42", "q": 1203, "part": true,
 "f": {"status": "delivered", "attempts": 2, "tags": ["fragile", "late"]},
 "h": {"status": "0192f2a4c9b10003:van-12"},
 "t": {"tags": {"fragile": ["van-12:3"], "late": ["van-7:9"]}},
 "cf": {"address": [{"v": "Dock 4", "by": "van-7", "h": "0192f2a4c9b20000:van-7"}]}}"""

EXAMPLES = {
    "status": EXAMPLE_STATUS,
    "hello": EXAMPLE_HELLO,
    "catchup": EXAMPLE_CATCHUP,
    "changes": EXAMPLE_CHANGES,
    "page": EXAMPLE_PAGE,
    "checkpoint": EXAMPLE_CHECKPOINT,
    "ack": EXAMPLE_ACK,
}

# --- builders of (in)valid documents ----------------------------------------------------


def change(**over: Any) -> dict[str, Any]:
    """A valid change as a JSON document, with members replaced or (None) removed."""
    doc: dict[str, Any] = {
        "n": 1,
        "h": "0192f2a4c9b10000",
        "c": "tasks",
        "k": "t-1",
        "s": "route-42",
        "b": 0,
        "op": "put",
        "f": {"status": "delivered"},
    }
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def changes(*chs: Any, **over: Any) -> bytes:
    """A `changes` message with the given changes (one valid change by default)."""
    doc: dict[str, Any] = {"type": "changes", "v": 1, "dev": "van-12", "sv": 3}
    doc["ch"] = list(chs) if chs else [change()]
    doc.update(over)
    return orjson.dumps(doc)


def hello(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "hello", "v": 1, "dev": "van-12", "agent": "a/1", "sv": 3}
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def raw_hello(extra: bytes) -> bytes:
    """A valid hello with raw JSON text `extra` spliced in as the member `x`."""
    return b'{"type":"hello","v":1,"dev":"van-12","agent":"a/1","sv":3,"x":' + extra + b"}"


def nested(depth: int) -> Any:
    """A JSON value of exactly `depth` levels (json_depth): [[...[0]...]]."""
    value: Any = 0
    for _ in range(depth - 1):
        value = [value]
    return value


def rejected(payload: Any, code: str, **kwargs: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(payload, **kwargs)
    err = info.value
    assert err.code == code, err.reason
    assert 0 < len(err.reason) < MAX_REASON_CHARS
    return err


def bomb(size: int) -> bytes:
    """A small zlib stream that inflates to a `size`-byte JSON object."""
    packer = zlib.compressobj(9)
    parts = [packer.compress(b'{"type":"hello","x":"')]
    chunk = b"0" * (1 << 20)
    for _ in range(size // len(chunk)):
        parts.append(packer.compress(chunk))
    parts.append(packer.compress(b'"}'))
    parts.append(packer.flush())
    return b"".join(parts)


# --- round trips ----------------------------------------------------------------------


def test_samples_cover_every_message_type(samples: dict[str, Message]) -> None:
    """The realistic samples include at least one message of every wire type."""
    assert {getattr(m, "type") for m in samples.values()} == set(ALL_TYPES)  # noqa: B009


def test_round_trip(sample: Message) -> None:
    """encode then decode gives back an equal message, and re-encoding is byte-stable."""
    data = encode(sample)
    back = decode(data)
    assert back == sample
    assert type(back) is type(sample)
    assert encode(back) == data


def test_round_trip_on_its_topic(sample: Message) -> None:
    """Every message decodes with `allowed` set to the types of its own topic only."""
    topics = (UP_TYPES, DOWN_TYPES, STATUS_TYPES, SERVER_TYPES)
    own = [types for types in topics if type(sample) in types.values()]
    assert len(own) == 1
    assert decode(encode(sample), allowed=own[0]) == sample


def test_round_trip_compressed(sample: Message) -> None:
    """A compressed frame (forced with compress_over=0 when it helps) decodes equal."""
    plain = encode(sample)
    data = encode(sample, compress_over=0)
    if len(zlib.compress(plain, 6)) < len(plain):
        assert data[0] == 0x78
    else:
        assert data == plain
    assert decode(data) == sample


def test_encode_writes_type_and_v_first_and_drops_defaults() -> None:
    """`type` and `v` lead every payload; members at their defaults are left out."""
    data = encode(Hello(dev="van-12", agent="a", sv=3))
    assert data == b'{"type":"hello","v":1,"dev":"van-12","agent":"a","sv":3}'
    assert encode(Status(dev="d", on=False)) == b'{"type":"status","v":1,"dev":"d","on":false}'
    assert encode(Checkpoint(req="r", cp={})) == b'{"type":"checkpoint","v":1,"req":"r","cp":{}}'
    assert encode(Command(id="c", cmd="ping")) == b'{"type":"command","v":1,"id":"c","cmd":"ping"}'


def test_encode_always_writes_members_section_7_requires() -> None:
    """page.reset/more/recs, reject.rj and a change's b are written even at their defaults."""
    page = Page.model_validate({"req": "r", "s": "s", "from": 0, "to": 5})
    assert encode(page) == (
        b'{"type":"page","v":1,"req":"r","s":"s","from":0,"to":5,'
        b'"reset":false,"more":false,"recs":[]}'
    )
    assert encode(Reject()) == b'{"type":"reject","v":1,"rj":[]}'
    err = Reject(err=ErrorInfo(code="invalid", reason="r"))
    assert orjson.loads(encode(err)) == {
        "type": "reject",
        "v": 1,
        "rj": [],
        "err": {"code": "invalid", "reason": "r"},
    }
    batch = decode(changes(change(n=1, b=0), change(n=2, b=7)))
    assert isinstance(batch, Changes)
    assert [c["b"] for c in orjson.loads(encode(batch))["ch"]] == [0, 7]
    assert decode(encode(batch)) == batch


def test_encode_uses_wire_alias() -> None:
    """Page.from_ travels as the member `from`."""
    page = Page.model_validate({"req": "r", "s": "s", "from": 7, "to": 9})
    assert orjson.loads(encode(page))["from"] == 7


def test_encode_matches_model_dump(sample: Message) -> None:
    """The fast encoder writes model_dump(by_alias, exclude_defaults) plus required members."""
    expected = {
        "type": getattr(sample, "type"),  # noqa: B009
        "v": 1,
        **sample.model_dump(mode="json", by_alias=True, exclude_defaults=True),
    }
    full = sample.model_dump(mode="json", by_alias=True)
    for name in REQUIRED_WITH_DEFAULT.get(expected["type"], ()):
        expected.setdefault(name, full[name])
    if isinstance(sample, Changes):
        for written, change_ in zip(expected["ch"], sample.ch, strict=True):
            written["b"] = change_.b
    assert orjson.loads(encode(sample)) == expected


# Members of PROTOCOL.md §7 without "?" whose model has a default.
REQUIRED_WITH_DEFAULT = {"page": ("reset", "more", "recs"), "reject": ("rj",)}


def test_encode_keeps_integral_floats_floats() -> None:
    """A float value 5.0 comes back as a float, not the int 5."""
    msg = Command(id="c", cmd="ping", args={"a": 5.0, "b": 5, "c": -0.0, "d": 1e300})
    back = decode(encode(msg))
    assert isinstance(back, Command)
    assert [type(back.args[k]) for k in "abcd"] == [float, int, float, float]
    assert back == msg


def test_encode_dict_matches_encode() -> None:
    """encode_dict of the equivalent dict yields the same bytes as encode."""
    msg = Ack(ok=[(17, "route-42", 1191)], rs=[17])
    obj = {"type": "ack", "v": 1, "ok": [[17, "route-42", 1191]], "rs": [17]}
    assert encode_dict(obj) == encode(msg)
    assert decode(encode_dict(obj, compress_over=0)) == msg


def test_compress_only_when_over_threshold_and_smaller(samples: dict[str, Message]) -> None:
    """compress_over=None never compresses; otherwise only larger and shrinking payloads."""
    big = samples["page"]
    plain = encode(big)
    assert encode(big, compress_over=None) == plain
    assert encode(big, compress_over=len(plain)) == plain
    packed = encode(big, compress_over=len(plain) - 1)
    assert packed[0] == 0x78 and len(packed) < len(plain)
    assert zlib.decompress(packed) == plain
    tiny = Status(dev="d", on=True)
    assert encode(tiny, compress_over=0) == encode(tiny)  # zlib would not make it smaller


def test_encode_refuses_values_json_cannot_carry() -> None:
    """Unencodable content raises ProtocolError(invalid), not an orjson/pydantic error."""
    bad = Command.model_construct(id="c", cmd="ping", args={"s": {1, 2}, "o": object()})
    with pytest.raises(ProtocolError) as info:
        encode(bad)
    assert info.value.code == INVALID
    unencodable: list[Any] = [{"a": {1, 2}}, {"a": "\ud800"}, {"a": 2**64}, {"a": 2**53}, {1: 2}]
    for obj in unencodable:
        with pytest.raises(ProtocolError) as info:
            encode_dict(obj)
        assert info.value.code == INVALID


# --- the worked example ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_protocol_examples_decode(name: str) -> None:
    """Every message of PROTOCOL.md §12 decodes as its type and survives a round trip."""
    msg = decode(EXAMPLES[name])
    assert getattr(msg, "type") == name  # noqa: B009
    assert decode(encode(msg)) == msg
    assert orjson.loads(encode(msg)) == orjson.loads(EXAMPLES[name])


def test_protocol_example_details() -> None:
    """Spot checks of the decoded §12 messages: tuples in ok, `from`, set adds."""
    ack = decode(EXAMPLE_ACK)
    assert isinstance(ack, Ack)
    assert ack.ok == [(17, "route-42", 1191), (18, "route-42", 1192)]
    assert ack.fx[1].t == {"tags": {"fragile": ["van-12:18"]}}
    page = decode(EXAMPLE_PAGE)
    assert isinstance(page, Page) and page.from_ == 1188 and page.recs[0].q == 1190
    batch = decode(EXAMPLE_CHANGES)
    assert isinstance(batch, Changes)
    assert [c.n for c in batch.ch] == [17, 18]
    assert batch.ch[0].i == {"attempts": 1} and batch.ch[1].a == {"tags": ["fragile"]}


def test_protocol_record_state_example_validates() -> None:
    """The record state of PROTOCOL.md §6 is a valid Rec."""
    rec = Rec.model_validate(orjson.loads(EXAMPLE_REC))
    assert rec.part and rec.cf["address"][0].by == "van-7"


# --- input kinds ----------------------------------------------------------------------


def test_bytes_like_inputs_decode() -> None:
    """bytearray, memoryview (also sliced) and other buffers are accepted like bytes."""
    expected = decode(EXAMPLE_HELLO)
    assert decode(bytearray(EXAMPLE_HELLO)) == expected
    assert decode(memoryview(EXAMPLE_HELLO)) == expected
    assert decode(memoryview(b"  " + EXAMPLE_HELLO + b"  ")[2:-2]) == expected
    assert decode(array.array("B", EXAMPLE_HELLO)) == expected  # type: ignore[arg-type]
    assert decode(b" \n\t" + EXAMPLE_HELLO + b"\n") == expected


@pytest.mark.parametrize("junk", ["{}", None, 17, 1.5, ["a"], {"type": "hello"}, object()])
def test_non_bytes_input_is_malformed(junk: Any) -> None:
    """Anything that is not a bytes-like buffer is refused as malformed."""
    rejected(junk, MALFORMED)


def test_released_memoryview_is_malformed() -> None:
    """A released memoryview is refused as malformed, not a ValueError."""
    view = memoryview(EXAMPLE_HELLO)
    view.release()
    rejected(view, MALFORMED)


# --- rejection codes ------------------------------------------------------------------


def test_too_large_payload() -> None:
    """A payload over max_payload is too_large, whatever container carries it."""
    big = raw_hello(b'"' + b"a" * DEFAULT_MAX_PAYLOAD + b'"')
    for payload in (big, bytearray(big), memoryview(big)):
        err = rejected(payload, TOO_LARGE)
        assert str(DEFAULT_MAX_PAYLOAD) in err.reason
    rejected(EXAMPLE_HELLO, TOO_LARGE, max_payload=len(EXAMPLE_HELLO) - 1)
    assert decode(EXAMPLE_HELLO, max_payload=len(EXAMPLE_HELLO))


def test_zip_bomb_is_refused_with_bounded_memory() -> None:
    """A 64 MiB zlib bomb is too_large and decoding it allocates about 1 MiB, not 64."""
    payload = bomb(64 << 20)
    assert len(payload) < DEFAULT_MAX_PAYLOAD
    tracemalloc.start()
    try:
        rejected(payload, TOO_LARGE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * DEFAULT_MAX_DECOMPRESSED


def test_decompressed_limit_is_exact() -> None:
    """A frame inflating to exactly max_decompressed passes; one byte more is too_large."""
    plain = encode(Hello(dev="van-12", agent="x" * 100, sv=3))
    packed = zlib.compress(plain)
    assert decode(packed, max_decompressed=len(plain)) == decode(plain)
    err = rejected(packed, TOO_LARGE, max_decompressed=len(plain) - 1)
    assert "decompressed" in err.reason


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        pytest.param(b"", "JSON", id="empty"),
        pytest.param(b'{"type":"hello",', "JSON", id="truncated"),
        pytest.param(b'{"type":"hello"} x', "JSON", id="trailing-data"),
        pytest.param(b"\xef\xbb\xbf" + EXAMPLE_HELLO, "JSON", id="bom"),
        pytest.param(raw_hello(b'"\xff\xfe"'), "JSON", id="invalid-utf8"),
        pytest.param(raw_hello(b'"\xed\xa0\x80"'), "JSON", id="utf8-encoded-surrogate"),
        pytest.param(raw_hello(b'"\\ud800"'), "JSON", id="lone-surrogate-escape"),
        pytest.param(raw_hello(b'"\\udc00x"'), "JSON", id="lone-low-surrogate"),
        pytest.param(raw_hello(b"NaN"), "JSON", id="nan"),
        pytest.param(raw_hello(b"Infinity"), "JSON", id="infinity"),
        pytest.param(raw_hello(b"-Infinity"), "JSON", id="minus-infinity"),
        pytest.param(raw_hello(b"1e400"), "JSON", id="float-overflow"),
        pytest.param(raw_hello(b"'single'"), "JSON", id="single-quotes"),
        pytest.param(b"[]", "object", id="array"),
        pytest.param(b'"hello"', "object", id="string"),
        pytest.param(b"1", "object", id="number"),
        pytest.param(b"null", "object", id="null"),
        pytest.param(b"x\x9c\x00\x01\x02", "zlib", id="broken-zlib"),
        pytest.param(zlib.compress(EXAMPLE_HELLO)[:-6], "zlib", id="truncated-zlib"),
        pytest.param(zlib.compress(EXAMPLE_HELLO) + b"{}", "zlib", id="zlib-trailing-bytes"),
        pytest.param(zlib.compress(b"not json"), "JSON", id="zlib-of-non-json"),
        pytest.param(zlib.compress(zlib.compress(EXAMPLE_HELLO)), "JSON", id="zlib-twice"),
        pytest.param(b"x", "zlib", id="lone-0x78"),
    ],
)
def test_malformed(payload: bytes, fragment: str) -> None:
    """Bytes that are not one JSON object (or a broken zlib frame) are malformed."""
    err = rejected(payload, MALFORMED)
    assert fragment in err.reason


@pytest.mark.parametrize(
    "version",
    [2, 0, -1, "1", True, 1.0, None, [1], {"v": 1}, 2**70],
    ids=lambda v: f"v={v!r}"[:20],
)
def test_unsupported_version(version: Any) -> None:
    """Only the integer 1 is a supported `v`; "1", true and 1.0 are not it."""
    payload = (
        raw_hello(b"0").replace(b'"v":1', b'"v":' + str(version).encode())
        if version == 2**70
        else orjson.dumps(hello(v=version) if version is not None else {**hello(), "v": None})
    )
    err = rejected(payload, UNSUPPORTED_VERSION)
    assert err.reason.startswith("v:")


def test_missing_version_is_invalid() -> None:
    """A message without `v` is invalid, and the reason names `v`."""
    doc = hello()
    del doc["v"]
    err = rejected(orjson.dumps(doc), INVALID)
    assert err.reason.startswith("v:")


def test_version_is_checked_before_type() -> None:
    """An unknown type with an unsupported version reports the version."""
    rejected(orjson.dumps({"type": "nope", "v": 9}), UNSUPPORTED_VERSION)


def test_missing_type_is_invalid() -> None:
    """A message without `type` is invalid, and the reason names `type`."""
    err = rejected(b'{"v":1,"dev":"van-12"}', INVALID)
    assert err.reason.startswith("type:")


@pytest.mark.parametrize("name", ["nope", "", "Hello", "hello ", 5, None, ["hello"], True])
def test_unknown_type(name: Any) -> None:
    """A `type` that is not a known message name (or not a string) is unknown_type."""
    rejected(orjson.dumps({**hello(), "type": name}), UNKNOWN_TYPE)


@pytest.mark.parametrize(
    ("message", "allowed"),
    [
        (EXAMPLE_ACK, UP_TYPES),
        (EXAMPLE_HELLO, DOWN_TYPES),
        (EXAMPLE_STATUS, UP_TYPES),
        (EXAMPLE_CHANGES, STATUS_TYPES),
        (EXAMPLE_CHANGES, {"hello": Hello}),
    ],
)
def test_type_not_allowed_on_topic(message: bytes, allowed: dict[str, type[Message]]) -> None:
    """A known type that is not allowed on the receiving topic is unknown_type."""
    rejected(message, UNKNOWN_TYPE, allowed=allowed)


def test_batch_over_1000_changes_is_too_large() -> None:
    """1,000 changes are accepted; 1,001 are too_large (checked before validation)."""
    ok = decode(changes(*(change(n=i + 1) for i in range(1000))))
    assert isinstance(ok, Changes) and len(ok.ch) == 1000
    err = rejected(changes(*(change(n=i + 1) for i in range(1001))), TOO_LARGE)
    assert "1001" in err.reason
    rejected(changes(*(["junk"] * 1001)), TOO_LARGE)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(
            changes(change(n=1), change(n=2), change(n=3), change(n=0)),
            "ch.3.n: Input should be greater than or equal to 1",
            id="n-zero",
        ),
        pytest.param(orjson.dumps(hello(dev=None)), "dev: Field required", id="missing-member"),
        pytest.param(
            orjson.dumps(hello(dev="bad id")),
            "dev: String should match pattern",
            id="bad-device-id",
        ),
        pytest.param(
            orjson.dumps(hello(sv="3")), "sv: Input should be a valid integer", id="string-int"
        ),
        pytest.param(
            changes(change(n=True)), "ch.0.n: Input should be a valid integer", id="bool-n"
        ),
        pytest.param(
            orjson.dumps(hello(sv=False)), "sv: Input should be a valid integer", id="bool-sv"
        ),
        pytest.param(
            changes(change(n=1.0)), "ch.0.n: Input should be a valid integer", id="float-n"
        ),
        pytest.param(
            changes(change(i={"attempts": True}, f=None)),
            "ch.0.i.attempts: must be a number",
            id="bool-increment",
        ),
        pytest.param(orjson.dumps(hello(z=1)), "z: Input should be a valid boolean", id="int-bool"),
        pytest.param(
            changes(change(k="t\x01")), "ch.0.k: must not contain control characters", id="key-ctl"
        ),
        pytest.param(
            changes(change(k="t\n")), "ch.0.k: must not contain control characters", id="key-lf"
        ),
        pytest.param(changes(change(k="")), "ch.0.k: must be 1 to 200", id="empty-key"),
        pytest.param(changes(change(k="é" * 101)), "ch.0.k: must be 1 to 200", id="long-key"),
        pytest.param(
            changes(change(h="0192F2A4C9B10000")), "ch.0.h: String should match", id="stamp-upper"
        ),
        pytest.param(
            changes(change(h="0192f2a4c9b1000")), "ch.0.h: String should match", id="stamp-short"
        ),
        pytest.param(
            changes(change(h="0192f2a4c9b10000:van-12")),
            "ch.0.h: String should match",
            id="stamp-with-node",
        ),
        pytest.param(
            orjson.dumps(
                {
                    "type": "delta",
                    "v": 1,
                    "d": [{"c": "t", "k": "k", "s": "s", "q": 1, "xh": "0192f2a4c9b10000"}],
                }
            ),
            "d.0.xh: String should match",
            id="full-stamp-without-node",
        ),
        pytest.param(
            changes(change(f=None)), "ch.0: a 'put' change must name at least one field", id="put"
        ),
        pytest.param(
            changes(change(op="del")), "ch.0: a 'del' change must not name fields", id="del-fields"
        ),
        pytest.param(
            changes(change(op="upsert")), "ch.0.op: Input should be 'put' or 'del'", id="bad-op"
        ),
        pytest.param(
            changes(change(f={"x": 1}, i={"x": 1})),
            "ch.0: field 'x' appears in more than one of f/i/a/r",
            id="f-and-i",
        ),
        pytest.param(
            changes(change(f={"tags": 1}, r={"tags": {"a": ["van-1:1"]}})),
            "ch.0: field 'tags' appears in more than one",
            id="f-and-r",
        ),
        pytest.param(
            changes(change(f=None, i={"attempts": 0})),
            "ch.0: increment of 'attempts' must not be 0",
            id="increment-0",
        ),
        pytest.param(
            changes(change(f=None, i={"attempts": 0.0})),
            "ch.0: increment of 'attempts' must not be 0",
            id="increment-0.0",
        ),
        pytest.param(
            changes(change(f=None, a={"tags": []})), "ch.0: set add of 'tags'", id="empty-add"
        ),
        pytest.param(
            changes(change(f=None, a={"tags": ["x"]}, r={"tags": {"x": ["van-1:1"]}})),
            "ch.0: set field 'tags' adds and removes the same member",
            id="add-and-remove-member",
        ),
        pytest.param(
            changes(change(f={"bad-name": 1})),
            "ch.0.f: 'bad-name' is not a valid field name",
            id="field-name",
        ),
        pytest.param(
            changes(change(f={"status\n": 1})),
            "ch.0.f: 'status\\n' is not a valid field name",
            id="field-name-newline",
        ),
        pytest.param(
            changes(change(f={f"f{i}": i for i in range(257)})),
            "ch.0: a change may name at most 256 fields",
            id="257-fields",
        ),
        pytest.param(
            changes(change(f=None, r={"tags": {"x": ["van-1:0"]}})),
            "ch.0.r.tags.x.0: String should match",
            id="bad-tag",
        ),
        pytest.param(changes(ch=[]), "ch: List should have at least 1 item", id="empty-batch"),
        pytest.param(changes(ch={"0": change()}), "ch: Input should be an array", id="ch-object"),
        pytest.param(changes(ch=[1]), "ch.0: Input should be an object", id="change-not-object"),
        pytest.param(
            orjson.dumps({"type": "catchup", "v": 1, "dev": "d", "req": "r", "cp": {}, "lim": 0}),
            "lim: Input should be greater than or equal to 1",
            id="lim-0",
        ),
        pytest.param(
            orjson.dumps({"type": "catchup", "v": 1, "dev": "d", "req": "x" * 65, "cp": {}}),
            "req: String should have at most 64 characters",
            id="long-req",
        ),
        pytest.param(
            orjson.dumps({"type": "ack", "v": 1, "ok": [[1, "s"]]}),
            "ok.0.2: Field required",
            id="short-ok-entry",
        ),
        pytest.param(
            orjson.dumps({"type": "command", "v": 1, "id": "c", "cmd": "format-disk"}),
            "cmd: Input should be 'wipe', 'resync', 'ping', 'scopes', 'sync', 'creds' or "
            "'cert_renew'",
            id="bad-command",
        ),
        pytest.param(
            orjson.dumps({"type": "command", "v": 1, "id": "c", "cmd": "ping", "args": nested(34)}),
            "args: Input should be an object",
            id="args-not-object",
        ),
        pytest.param(
            orjson.dumps(
                {"type": "command", "v": 1, "id": "c", "cmd": "ping", "args": {"a": nested(33)}}
            ),
            "args.a: value nested deeper than 32 levels",
            id="args-too-deep",
        ),
    ],
)
def test_invalid_member(payload: bytes, reason: str) -> None:
    """A message of a known type with a bad member is invalid; the reason names the path."""
    err = rejected(payload, INVALID)
    assert err.reason.startswith(reason), err.reason


def test_set_member_may_hold_control_characters() -> None:
    """Set members are 1-200 UTF-8 bytes with no character restriction (PROTOCOL.md §2)."""
    msg = decode(changes(change(f=None, a={"tags": ["a\tb", "\x00"]})))
    assert isinstance(msg, Changes) and msg.ch[0].a == {"tags": ["a\tb", "\x00"]}
    assert decode(changes(change(f=None, a={"tags": ["é" * 100]})))
    rejected(changes(change(f=None, a={"tags": ["é" * 101]})), INVALID)
    rejected(changes(change(f=None, a={"tags": [""]})), INVALID)


def test_set_field_may_add_and_remove_different_members() -> None:
    """A set field may be in both `a` and `r` when the members differ (§7.2)."""
    msg = decode(changes(change(f=None, a={"tags": ["x"]}, r={"tags": {"y": ["van-1:4"]}})))
    assert isinstance(msg, Changes) and msg.ch[0].r == {"tags": {"y": ["van-1:4"]}}


@pytest.mark.parametrize(
    ("extra", "ok"),
    [
        (str(MAX_SAFE_INT).encode(), True),
        (str(-MAX_SAFE_INT).encode(), True),
        (str(MAX_SAFE_INT + 1).encode(), False),
        (str(-MAX_SAFE_INT - 1).encode(), False),
        (str(2**63 - 1).encode(), False),
        (str(2**64 - 1).encode(), False),
        (str(2**64).encode(), False),  # orjson reads this one as a float
        (str(-(2**63) - 1).encode(), False),
        (b"1" + b"0" * 300, False),
        (b"18446744073709551616.0", True),  # a float literal, not an integer
        (b"1e300", True),
        (b"9007199254740993.5", True),
        (b'[1, {"a": ' + str(2**60).encode() + b"}]", False),
    ],
    ids=lambda v: v.decode()[:24] if isinstance(v, bytes) else str(v),
)
def test_integers_beyond_2_53_are_invalid(extra: bytes, ok: bool) -> None:
    """Any integer literal with |x| >= 2^53 is invalid, even in an unknown member."""
    if ok:
        assert isinstance(decode(raw_hello(extra)), Hello)
    else:
        err = rejected(raw_hello(extra), INVALID)
        assert err.reason.startswith("x"), err.reason
        assert "53-bit" in err.reason


def test_big_integer_reason_names_its_path() -> None:
    """The 53-bit error names the first offending member path inside a change."""
    payload = changes(change(n=1), change(n=2, f={"w": {"deep": [0, 2**60]}}))
    err = rejected(payload, INVALID)
    assert err.reason.startswith("ch.1.f.w.deep.1: integer outside the signed 53-bit range")
    huge = changes(change(n=1)).replace(b'"n":1', b'"n":99999999999999999999999')
    err = rejected(huge, INVALID)
    assert err.reason.startswith("ch.0.n:"), err.reason


def test_nesting_depth_of_values() -> None:
    """A field value may nest 32 levels; 33 is invalid, and the reason names the field."""
    assert decode(changes(change(f={"x": nested(32)})))
    err = rejected(changes(change(f={"x": nested(33)})), INVALID)
    assert err.reason == "ch.0.f.x: value nested deeper than 32 levels"
    err = rejected(changes(change(f={"x": {"a": nested(32)}})), INVALID)
    assert err.reason.startswith("ch.0.f.x: value nested deeper")
    deep_rec = {"c": "t", "k": "k", "s": "s", "q": 1, "f": {"x": nested(33)}}
    rejected(orjson.dumps({"type": "delta", "v": 1, "d": [deep_rec]}), INVALID)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(raw_hello(b"[" * 2000 + b"]" * 2000), id="hello-member-2000"),
        pytest.param(raw_hello(b"[" * 5001 + b"]" * 5001), id="hello-member-5001"),
        pytest.param(b"[" * 5001 + b"]" * 5001, id="bare-array-5001"),
        pytest.param(raw_hello(b'{"a":' * 5001 + b"1" + b"}" * 5001), id="objects-5001"),
        pytest.param(b"[" * 5001, id="unclosed-5001"),
        pytest.param(zlib.compress(raw_hello(b"[" * 5001 + b"]" * 5001)), id="zlib-5001"),
    ],
)
def test_nesting_past_the_parser_limit_is_invalid(payload: bytes) -> None:
    """Any nesting past the message depth limit is `invalid` (never `malformed`), even
    beyond the JSON parser's own 1,024-level stop."""
    err = rejected(payload, INVALID)
    assert err.reason == f"message nested deeper than {MAX_MESSAGE_DEPTH} levels"


def test_deepest_legitimate_message_passes() -> None:
    """A 32-level value inside a reject's conflict candidate (39 levels in all) decodes."""
    rec = {
        "c": "t",
        "k": "k",
        "s": "s",
        "q": 1,
        "cf": {"f": [{"v": nested(32), "by": "a", "h": "0192f2a4c9b10000:a"}]},
    }
    rj = {"n": 1, "code": "invalid", "reason": "r", "perm": True, "rec": rec}
    assert decode(orjson.dumps({"type": "reject", "v": 1, "rj": [rj]}))


def test_deeply_nested_unknown_member_is_invalid() -> None:
    """Unknown members are ignored, but a message may not nest beyond 40 levels."""
    assert decode(orjson.dumps(hello(x=nested(39))))
    err = rejected(orjson.dumps(hello(x=nested(40))), INVALID)
    assert err.reason.startswith("x.0.0")
    assert "nested deeper than 40 levels" in err.reason
    rejected(orjson.dumps(hello(x={"a": [{"b": nested(45)}]})), INVALID)


def test_unknown_members_are_ignored() -> None:
    """Members a v1 receiver does not know are ignored (forward compatibility, §3)."""
    doc = orjson.loads(EXAMPLE_CHANGES)
    doc["future"] = {"x": [1, 2]}
    doc["ch"][0]["prio"] = 5
    assert decode(orjson.dumps(doc)) == decode(EXAMPLE_CHANGES)


def test_duplicate_members_last_one_wins() -> None:
    """A repeated member name is accepted; the last occurrence counts."""
    msg = decode(b'{"type":"hello","v":1,"dev":"van-7","dev":"van-12","agent":"a","sv":3}')
    assert isinstance(msg, Hello) and msg.dev == "van-12"


def test_reasons_are_short_and_do_not_echo_input() -> None:
    """Reasons stay under 300 characters and never repeat a large piece of the input."""
    long_name = "x" * 100_000
    cases = [
        changes(change(f={long_name: 1})),
        orjson.dumps(hello(type=long_name)),
        orjson.dumps({**hello(), "dev": long_name}),
        orjson.dumps(
            {
                "type": "delta",
                "v": 1,
                "d": [{"c": "t", "k": "k", "s": "s", "q": 1, "h": {"f": long_name}}],
            }
        ),
        orjson.dumps(
            {
                "type": "delta",
                "v": 1,
                "d": [{"c": "t", "k": "k", "s": "s", "q": 1, "t": {"f": {long_name: ["bad"]}}}],
            }
        ),
        orjson.dumps(hello(type="\x00\x1b[2J\u2028" + long_name)),
    ]
    for payload in cases:
        with pytest.raises(ProtocolError) as info:
            decode(payload)
        reason = info.value.reason
        assert len(reason) < MAX_REASON_CHARS
        assert "x" * 100 not in reason
        assert reason.isprintable()


def test_protocol_error_carries_code_and_reason() -> None:
    """ProtocolError exposes code and reason, and str() is 'code: reason'."""
    err = rejected(b"[]", MALFORMED)
    assert str(err) == f"{err.code}: {err.reason}"


# --- codes ----------------------------------------------------------------------------


def _section_8_codes() -> dict[str, bool]:
    """code -> perm, read from the table of PROTOCOL.md §8."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    section = text.split("## 8. Rejection codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| [^|]+ \| (yes|no) \|", section, flags=re.M)
    return {code: perm == "yes" for code, perm in rows}


def test_codes_match_protocol_section_8() -> None:
    """The code constants and their permanent/transient split follow PROTOCOL.md §8."""
    table = _section_8_codes()
    assert len(table) == 22
    assert set(table) == ALL_CODES
    assert {code for code, perm in table.items() if perm} == PERMANENT_CODES
    assert {code for code, perm in table.items() if not perm} == TRANSIENT_CODES
    assert not PERMANENT_CODES & TRANSIENT_CODES
    assert all(is_permanent(code) == perm for code, perm in table.items())
    assert is_permanent("a_code_from_the_future")


# --- lenient batches ------------------------------------------------------------------


def test_lenient_keeps_good_changes_and_reports_bad_ones() -> None:
    """Valid changes survive in order; each bad one is reported with its index and n."""
    payload = changes(
        change(n=1),
        change(n=2, f=None, i={"attempts": 0}),
        change(n=3, k="bad\x00key"),
        change(n=4, f={"x": 2**60}),
        change(n=True),
        "junk",
        change(n=0),
        change(n=5),
        change(n=6, f={"x": nested(33)}),
    )
    result = decode_changes_lenient(payload)
    assert isinstance(result, LenientChanges)
    assert (result.dev, result.sv) == ("van-12", 3)
    assert result.changes is not None
    assert [c.n for c in result.changes.ch] == [1, 5]
    assert [(b.index, b.n) for b in result.bad] == [
        (1, 2),
        (2, 3),
        (3, 4),
        (4, None),
        (5, None),
        (6, None),
        (8, 6),
    ]
    assert all(isinstance(b, BadChange) and b.error.code == INVALID for b in result.bad)
    assert result.bad[0].error.reason == "ch.1: increment of 'attempts' must not be 0"
    assert result.bad[2].error.reason.startswith("ch.3.f.x: integer outside")
    assert result.bad[4].error.reason == "ch.5: Input should be an object"


def test_lenient_tells_huge_integer_literals_from_large_floats() -> None:
    """A 1e19 float is a valid value; an integer literal beyond 2^64 marks only its change."""
    good = orjson.dumps(change(n=1, f={"x": 1e19}))
    bad = orjson.dumps(change(n=2, f={"x": 0})).replace(b'"x":0', b'"x":100000000000000000000000')
    payload = b'{"type":"changes","v":1,"dev":"van-12","sv":3,"ch":[' + good + b"," + bad + b"]}"
    result = decode_changes_lenient(payload)
    assert result.changes is not None and [c.n for c in result.changes.ch] == [1]
    assert [(b.index, b.n) for b in result.bad] == [(1, 2)]
    assert result.bad[0].error.reason.startswith("ch.1.f.x: integer outside")


def test_lenient_with_every_change_bad_still_reports_them() -> None:
    """When no change is valid, `changes` is None but dev, sv and every n are reported."""
    result = decode_changes_lenient(changes(change(n=7, op="nope"), change(n=8, h="x")))
    assert result.changes is None
    assert (result.dev, result.sv) == ("van-12", 3)
    assert [b.n for b in result.bad] == [7, 8]


def test_lenient_of_a_valid_batch_equals_decode() -> None:
    """A valid batch decodes leniently to the same message with no bad entries."""
    result = decode_changes_lenient(EXAMPLE_CHANGES)
    assert result.changes == decode(EXAMPLE_CHANGES) and result.bad == ()
    assert decode_lenient(zlib.compress(EXAMPLE_CHANGES)) == result


def test_lenient_keeps_unknown_envelope_members_out_of_the_way() -> None:
    """Unknown envelope members do not disturb the lenient split."""
    payload = changes(change(n=1), change(n=2, op="x"), extra={"a": [1]})
    result = decode_changes_lenient(payload)
    assert result.changes is not None and [c.n for c in result.changes.ch] == [1]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (changes(dev="not a device"), INVALID),
        (changes(sv=-1), INVALID),
        (changes(sv=True), INVALID),
        (changes(ch=[]), INVALID),
        (changes(ch="all"), INVALID),
        (orjson.dumps({"type": "changes", "v": 1, "dev": "van-12", "sv": 3}), INVALID),
        (changes(extra=2**60), INVALID),
        (changes(extra=nested(40)), INVALID),
        (changes(*(change(n=i + 1) for i in range(1001))), TOO_LARGE),
        (changes(v=2), UNSUPPORTED_VERSION),
        (b"[1]", MALFORMED),
        (EXAMPLE_HELLO, UNKNOWN_TYPE),
    ],
)
def test_lenient_envelope_errors_still_raise(payload: bytes, code: str) -> None:
    """Errors outside the change entries reject the whole message."""
    with pytest.raises(ProtocolError) as info:
        decode_changes_lenient(payload)
    assert info.value.code == code


def test_decode_lenient_passes_other_types_through(samples: dict[str, Message]) -> None:
    """decode_lenient returns non-changes messages as decode would, changes as a split."""
    for sample in samples.values():
        result = decode_lenient(encode(sample))
        if isinstance(sample, Changes):
            assert isinstance(result, LenientChanges) and result.changes == sample
        else:
            assert result == sample
    with pytest.raises(ProtocolError) as info:
        decode_lenient(EXAMPLE_ACK, allowed=UP_TYPES)
    assert info.value.code == UNKNOWN_TYPE


def test_default_limits_match_protocol() -> None:
    """The default limits are those of PROTOCOL.md §3."""
    assert DEFAULT_MAX_PAYLOAD == 256 * 1024
    assert DEFAULT_MAX_DECOMPRESSED == 1024 * 1024
