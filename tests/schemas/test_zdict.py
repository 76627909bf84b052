"""The preset-dictionary encoding (schemas.zdict, PROTOCOL.md §3 and §11 `zd1`): it
round-trips every message, makes a lone change and its ack small, and the decoder
stays safe against hostile streams (unknown dictionary, broken or truncated streams,
decompression bombs: output bounded)."""

from __future__ import annotations

import json
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec, zdict
from schemas.errors import ProtocolError

CHANGE: dict[str, Any] = {
    "type": "changes", "v": 1, "dev": "van-1", "sv": 1,
    "ch": [{"n": 17, "h": "01a24555ad220000", "c": "tasks", "k": "t-0000017", "s": "route-1",
            "b": 0, "op": "put",
            "f": {"route": "route-1", "customer": "Brouwer Optiek #43280",
                  "address": "Czaar Peterstraat 574, 1023 MP Amsterdam", "status": "failed",
                  "eta": 1764000040035,
                  "notes": "South by chain deliver ask dock box building in delivery lunch "
                           "manager time returned time locked number cold after gate."}}],
    "inc": "_8fJuOITBORpLjlk"}
ACK = {"type": "ack", "v": 1, "ok": [[17, "route-1", 4242]]}


def _dict_stream(data: bytes, dictionary: bytes = zdict.DICTIONARY) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, dictionary)
    return co.compress(data) + co.flush()


def test_the_dictionary_is_frozen() -> None:
    # It is part of the protocol: changing it breaks every deployed device that speaks
    # zd1. A new dictionary needs a new capability (and keeps this one readable).
    assert zdict.DICT_ID == zlib.adler32(zdict.DICTIONARY) == 0x9C7C84A4
    assert len(zdict.DICTIONARY) < 32 * 1024, "deflate can only refer back 32 KiB"


def test_the_published_dictionary_file_is_the_dictionary() -> None:
    """schemas/zd1.dict is the language-neutral copy PROTOCOL.md §3 points implementers to
    (a Go or JS device cannot take bytes out of a Python literal): byte for byte
    `DICTIONARY`, with the length and DICTID the text states, shipped in the package."""
    path = Path(zdict.__file__).with_name("zd1.dict")
    published = path.read_bytes()
    assert published == zdict.DICTIONARY, "schemas/zd1.dict drifted from schemas.zdict"
    assert len(published) == 1366 and zlib.adler32(published) == 0x9C7C84A4
    protocol = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    assert "`schemas/zd1.dict`" in protocol and "1,366 bytes" in protocol
    assert "DICTID `0x9c7c84a4`" in protocol
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"zd1.dict"' in pyproject, "the package must ship schemas/zd1.dict"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_another_language_reads_and_writes_zd1_with_the_published_file() -> None:
    """What PROTOCOL.md §3 tells a Node.js implementer works: zlib with
    `{dictionary: <schemas/zd1.dict>}` inflates our zd1 ack and deflates a change our
    codec reads."""
    path = Path(zdict.__file__).with_name("zd1.dict")
    ack = codec.encode_dict(ACK, zdict=True)
    assert zdict.wants_dictionary(ack) == zdict.DICT_ID
    script = (
        "const fs = require('fs'), zlib = require('zlib');"
        "const dict = fs.readFileSync(process.argv[1]);"
        "const [ack, change] = JSON.parse(fs.readFileSync(0, 'utf8'));"
        "const text = zlib.inflateSync(Buffer.from(ack, 'hex'), {dictionary: dict});"
        "const out = zlib.deflateSync(Buffer.from(change), {dictionary: dict, level: 9});"
        "process.stdout.write(JSON.stringify([text.toString(), out.toString('hex')]));")
    done = subprocess.run(["node", "-e", script, str(path)], check=True, capture_output=True,
                          input=json.dumps([ack.hex(), codec.encode_dict(CHANGE).decode()]),
                          text=True, timeout=60)
    text, packed_hex = json.loads(done.stdout)
    assert json.loads(text) == ACK
    packed = bytes.fromhex(packed_hex)
    assert zdict.wants_dictionary(packed) == zdict.DICT_ID
    assert codec.decode(packed).model_dump(by_alias=True, exclude_defaults=True) == \
        codec.decode(codec.encode_dict(CHANGE)).model_dump(by_alias=True, exclude_defaults=True)


def test_a_lone_change_and_its_ack_shrink() -> None:
    for msg in (CHANGE, ACK):
        plain = codec.encode_dict(msg)
        packed = codec.encode_dict(msg, zdict=True)
        assert packed[:1] == b"\x78" and zdict.wants_dictionary(packed) == zdict.DICT_ID
        assert codec.decode(packed).model_dump(by_alias=True, exclude_defaults=True) == \
            codec.decode(plain).model_dump(by_alias=True, exclude_defaults=True)
    change = codec.encode_dict(CHANGE)
    assert len(codec.encode_dict(CHANGE, zdict=True)) < 0.65 * len(change)
    assert len(codec.encode_dict(CHANGE, zdict=True)) < len(zlib.compress(change, 9)) - 30
    assert len(codec.encode_dict(ACK, zdict=True)) <= 36


def test_without_the_capability_nothing_changes() -> None:
    assert codec.encode_dict(ACK) == orjson.dumps(ACK)
    assert codec.encode_dict(CHANGE, compress_over=512)[:1] == b"{"


def test_a_v1_receiver_could_not_read_it() -> None:
    """Why it is negotiated: plain zlib (every v1 device) refuses the stream."""
    with pytest.raises(zlib.error):
        zlib.decompress(codec.encode_dict(CHANGE, zdict=True))


def test_tiny_messages_stay_plain_when_that_is_smaller() -> None:
    tiny = b'{"v":1}'
    assert zdict.pack(tiny) == tiny


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@settings(max_examples=200)
@given(data=st.binary(max_size=3000) | json_values.map(orjson.dumps))
def test_pack_round_trips_any_bytes(data: bytes) -> None:
    packed = zdict.pack(data)
    assert len(packed) <= len(data)
    if packed is not data:
        assert zdict.unpack(packed) == data


@settings(max_examples=100)
@given(notes=st.text(max_size=2000), n=st.integers(1, 2**53 - 1))
def test_any_change_round_trips_through_the_codec(notes: str, n: int) -> None:
    msg = orjson.loads(orjson.dumps(CHANGE))
    msg["ch"][0]["n"] = n
    msg["ch"][0]["f"]["notes"] = notes
    got = codec.decode(codec.encode_dict(msg, zdict=True))
    assert got.ch[0].n == n and got.ch[0].f["notes"] == notes  # type: ignore[attr-defined]


# ------------------------------------------------------------------ hostile input


def _code(payload: bytes, **limits: int) -> str:
    with pytest.raises(ProtocolError) as err:
        codec.decode(payload, **limits)
    assert len(err.value.reason) < 300
    return err.value.code


def test_an_unknown_dictionary_is_malformed() -> None:
    stream = _dict_stream(orjson.dumps(ACK), b"some other dictionary")
    assert _code(stream) == codec.MALFORMED


@pytest.mark.parametrize("payload", [
    b"\x78\xbb",                          # FDICT set, no DICTID
    b"\x78\xbb\x9a\x4b",                  # DICTID cut short
    b"\x78\xbb" + zdict.DICT_ID.to_bytes(4, "big"),   # the id, no data
    b"\x78\xbb" + zdict.DICT_ID.to_bytes(4, "big") + b"\xff" * 20,  # garbage data
])
def test_broken_dictionary_streams_are_malformed(payload: bytes) -> None:
    assert _code(payload) == codec.MALFORMED


def test_truncated_and_trailing_streams_are_malformed() -> None:
    stream = codec.encode_dict(CHANGE, zdict=True)
    assert _code(stream[:-3]) == codec.MALFORMED
    assert _code(stream + b"\x00") == codec.MALFORMED


def test_a_bomb_with_the_dictionary_stops_at_the_limit() -> None:
    body = b'{"type":"ack","v":1,"ok":[' + b"[1," * 0 + b'"' + b"a" * (8 << 20) + b'"]}'
    bomb = _dict_stream(body)
    assert len(bomb) < 20_000
    assert _code(bomb, max_decompressed=1 << 20) == codec.TOO_LARGE
