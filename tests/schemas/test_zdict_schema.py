"""Dictionaries derived from a collection schema (schemas.zdict_schema, PROTOCOL.md §3 and
§11 `zd2`): both ends derive the same bytes from the same schema, any valid message of any
schema round-trips, a lone change shrinks beyond zd1, and the decoder stays safe against
hostile streams (a dictionary it does not hold, garbage, truncation, bombs: output
bounded). The registry is bounded and keeps the first of two colliding ids."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.server import caps as server_caps
from schemas import codec, zdict, zdict_schema
from schemas.codec import decode, encode
from schemas.collection import Catalog, example_catalog_path, load_catalog, parse_catalog
from schemas.errors import ProtocolError
from schemas.wire import Message
from tests.schemas.test_fuzz import messages
from tests.schemas.test_zdict import CHANGE

EXAMPLE = load_catalog(example_catalog_path())


@pytest.fixture(autouse=True)
def _example_registered() -> None:
    """The property tests below register hundreds of schemas, more than the bounded
    registry keeps (`MAX_REGISTERED`): EXAMPLE's dictionary is registered again for
    each test, as a process that holds a catalog does when it loads it."""
    zdict_schema.register(EXAMPLE)

# Field kinds a schema may declare, with the group of a change that carries them and a
# strategy for their values.
_KINDS: dict[str, tuple[dict[str, Any], str, st.SearchStrategy[Any]]] = {
    "string": ({"type": "string"}, "f", st.text(max_size=60)),
    "manual": ({"type": "string", "merge": "manual"}, "f", st.text(max_size=20)),
    "int": ({"type": "int"}, "f", st.integers(-(2**53) + 1, 2**53 - 1)),
    "float": ({"type": "float"}, "f", st.floats(allow_nan=False, allow_infinity=False)),
    "bool": ({"type": "bool"}, "f", st.booleans()),
    "counter": ({"type": "int", "merge": "counter"}, "i",
                st.integers(1, 1000) | st.integers(-1000, -1)),
    "set": ({"type": "set"}, "a", st.lists(st.text(min_size=1, max_size=10), min_size=1,
                                           max_size=3)),
}
names = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)


@st.composite
def schemas_and_changes(draw: st.DrawFn) -> tuple[Catalog, dict[str, Any]]:
    """A valid schema (1-3 collections, 1-6 fields each) and a `changes` message of one
    put to one of its collections, with values of the right kinds."""
    collections: dict[str, Any] = {}
    for cname in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
        fields = draw(st.dictionaries(names, st.sampled_from(sorted(_KINDS)), min_size=1,
                                      max_size=6))
        collections[cname] = {"scope": "fleet",
                              "fields": {f: dict(_KINDS[k][0]) for f, k in fields.items()}}
    catalog = parse_catalog({"version": draw(st.integers(1, 99)), "collections": collections})
    cname = draw(st.sampled_from(sorted(collections)))
    groups: dict[str, dict[str, Any]] = {}
    for field, spec in collections[cname]["fields"].items():
        kind = next(k for k, v in _KINDS.items() if v[0] == spec)
        _, group, values = _KINDS[kind]
        groups.setdefault(group, {})[field] = draw(values)
    change = {"n": draw(st.integers(1, 2**53 - 1)), "h": "01a24555ad220000", "c": cname,
              "k": draw(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)),
              "s": "fleet", "b": 0, "op": "put", **groups}
    return catalog, {"type": "changes", "v": 1, "dev": "van-1", "sv": catalog.version,
                     "ch": [change], "inc": "_8fJuOITBORpLjlk"}


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(case=schemas_and_changes())
def test_any_message_of_any_schema_round_trips(case: tuple[Catalog, dict[str, Any]]) -> None:
    catalog, msg = case
    data = zdict_schema.dictionary(catalog)
    assert data.startswith(zdict.DICTIONARY) and len(data) < 32 * 1024
    assert zdict_schema.lookup(zdict_schema.dict_id(data)) == data, "registered on parse"
    plain = codec.encode_dict(msg)
    packed = codec.encode_dict(msg, zdict=data)
    assert len(packed) <= len(plain)
    assert codec.decode(packed) == codec.decode(plain)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(case=schemas_and_changes(), msg=messages)
def test_any_valid_message_round_trips_with_any_schemas_dictionary(
        case: tuple[Catalog, dict[str, Any]], msg: Message) -> None:
    data = zdict_schema.dictionary(case[0])
    packed = encode(msg, zdict=data)
    assert decode(packed) == msg
    assert len(packed) <= len(encode(msg))


@settings(max_examples=50)
@given(case=schemas_and_changes())
def test_both_ends_derive_the_same_bytes(case: tuple[Catalog, dict[str, Any]]) -> None:
    """From the same schema, however it was read; descriptions and indexes (local to a
    device) do not change it."""
    catalog, _ = case
    doc = {"version": catalog.version,
           "collections": {name: {"scope": "fleet", "description": "local words",
                                  "fields": {f: {**spec.model_dump(exclude_defaults=True),
                                                 "description": "anything"}
                                             for f, spec in col.fields.items()}}
                           for name, col in catalog.collections.items()}}
    again = parse_catalog(orjson.loads(orjson.dumps(doc)), "other copy")
    assert zdict_schema.dictionary(again) == zdict_schema.dictionary(catalog)


def test_a_schema_change_is_another_dictionary() -> None:
    doc = orjson.loads(orjson.dumps({"version": 1, "collections": {
        "tasks": {"scope": "fleet", "fields": {"notes": {"type": "string"}}}}}))
    one = zdict_schema.dictionary(parse_catalog(doc))
    doc["collections"]["tasks"]["fields"]["status"] = {"type": "string"}
    two = zdict_schema.dictionary(parse_catalog(doc))
    assert zdict_schema.dict_id(one) != zdict_schema.dict_id(two)


def test_a_lone_change_shrinks_beyond_zd1() -> None:
    data = zdict_schema.dictionary(EXAMPLE)
    zd1 = codec.encode_dict(CHANGE, zdict=True)
    zd2 = codec.encode_dict(CHANGE, zdict=data)
    assert zdict.wants_dictionary(zd2) == zdict_schema.dict_id(data)
    assert len(zd2) <= len(zd1) - 20, (len(zd1), len(zd2))
    assert codec.decode(zd2) == codec.decode(zd1)


def test_a_v1_or_zd1_reader_cannot_read_it() -> None:
    """Why it is negotiated and why the server agrees only to ids it holds."""
    zd2 = codec.encode_dict(CHANGE, zdict=zdict_schema.dictionary(EXAMPLE))
    with pytest.raises(zlib.error):
        zlib.decompress(zd2)
    with pytest.raises(zlib.error):
        do = zlib.decompressobj(zdict=zdict.DICTIONARY)
        do.decompress(zd2)


# ------------------------------------------------------------------ hostile input


def _code(payload: bytes, **limits: int) -> str:
    with pytest.raises(ProtocolError) as err:
        codec.decode(payload, **limits)
    assert len(err.value.reason) < 300
    return err.value.code


def _stream(data: bytes, dictionary: bytes) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, dictionary)
    return co.compress(data) + co.flush()


def test_a_schema_this_receiver_never_parsed_is_malformed() -> None:
    # Its bytes, built without a Catalog (so never registered here).
    class _F:
        type = "string"
        strategy = "lww"

    class _C:
        fields = {"secret_field_xyz": _F()}

    class _Cat:
        collections = {"never_parsed_here": _C()}

    foreign = zdict.DICTIONARY + zdict_schema.schema_part(_Cat())
    assert not zdict_schema.known(zdict_schema.dict_id(foreign))
    assert _code(_stream(orjson.dumps(CHANGE), foreign)) == codec.MALFORMED


@settings(max_examples=200)
@given(garbage=st.binary(max_size=200))
def test_garbage_after_a_known_dictionary_id_is_malformed(garbage: bytes) -> None:
    ident = zdict_schema.dict_id(zdict_schema.dictionary(EXAMPLE))
    payload = b"\x78\xbb" + ident.to_bytes(4, "big") + garbage
    with pytest.raises(ProtocolError) as err:
        codec.decode(payload)
    assert err.value.code in (codec.MALFORMED, codec.INVALID, codec.UNKNOWN_TYPE,
                              codec.UNSUPPORTED_VERSION, codec.TOO_LARGE)


def test_truncated_and_trailing_streams_are_malformed() -> None:
    stream = codec.encode_dict(CHANGE, zdict=zdict_schema.dictionary(EXAMPLE))
    assert _code(stream[:-3]) == codec.MALFORMED
    assert _code(stream + b"\x00") == codec.MALFORMED
    assert _code(stream[:6]) == codec.MALFORMED


def test_a_bomb_with_the_schema_dictionary_stops_at_the_limit() -> None:
    body = b'{"type":"ack","v":1,"ok":[' + b'"' + b"a" * (8 << 20) + b'"]}'
    bomb = _stream(body, zdict_schema.dictionary(EXAMPLE))
    assert len(bomb) < 20_000
    assert _code(bomb, max_decompressed=1 << 20) == codec.TOO_LARGE


# ------------------------------------------------------------------ registry, agreement


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, bytes]]:
    """A private copy of the registry, so these tests evict nothing others rely on."""
    private = dict(zdict_schema._known)
    monkeypatch.setattr(zdict_schema, "_known", private)
    yield private


def _catalog(i: int) -> Catalog:
    return parse_catalog({"version": 1, "collections": {
        f"c{i}": {"scope": "fleet", "fields": {"x": {"type": "string"}}}}})


def test_the_registry_is_bounded(registry: dict[int, bytes]) -> None:
    for i in range(zdict_schema.MAX_REGISTERED + 50):
        _catalog(i)
    assert len(registry) <= zdict_schema.MAX_REGISTERED + 1
    assert zdict.DICT_ID in registry, "zd1's dictionary is never forgotten"
    assert zdict_schema.known(zdict_schema.dict_id(zdict_schema.dictionary(_catalog(10**6))))


def test_a_colliding_id_keeps_the_first_dictionary(registry: dict[int, bytes]) -> None:
    catalog = _catalog(1)
    ident = zdict_schema.dict_id(zdict_schema.dictionary(catalog))
    registry[ident] = b"another dictionary with the same adler-32"
    assert zdict_schema.register(catalog) is None
    assert registry[ident] == b"another dictionary with the same adler-32"


def test_the_server_agrees_to_zd2_only_for_a_dictionary_it_holds() -> None:
    ident = zdict_schema.dict_id(zdict_schema.dictionary(EXAMPLE))
    assert "zd2" in server_caps.agreed(["zd1", "zd2"], zd=ident)
    assert server_caps.agreed(["zd1", "zd2"], zd=None) == ("zd1",)
    assert server_caps.agreed(["zd1", "zd2"], zd=(ident + 1) % 2**32) == ("zd1",)


@pytest.mark.parametrize("zd", ["1", -1, 2**32, True, 1.0, [1], None])
def test_a_hello_zd_out_of_range_is_invalid(zd: Any) -> None:
    hello = {"type": "hello", "v": 1, "dev": "van-1", "agent": "t/1", "sv": 1,
             "caps": ["zd2"], "zd": zd}
    if zd is None:
        assert codec.decode(orjson.dumps(hello)).zd is None  # type: ignore[attr-defined]
        return
    assert _code(orjson.dumps(hello)) == codec.INVALID
