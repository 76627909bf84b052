"""The sortable key encoding (waystation.sortkeys): order, equality, self-delimiting."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.agent.query.reference import compare
from waystation import sortkeys as keys

ints = st.one_of(st.integers(-(2**53), 2**53), st.integers(), st.integers(-(2**1100), 2**1100))
floats = st.floats(allow_nan=False, allow_infinity=False)
texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
scalars: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.booleans(), ints, floats, texts,
    st.sampled_from([0, 0.0, -0.0, 1, 1.0, 2**53, 2**53 + 1, float(2**53), "", "\x00", "a\x00"]))


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


@given(scalars, scalars)
def test_encoding_orders_like_values(a: Any, b: Any) -> None:
    """encode(a) < encode(b) exactly when a sorts before b (kinds, then values); equal
    encodings exactly for equal values (1 == 1.0, -0.0 == 0.0)."""
    ea, eb = keys.encode(a), keys.encode(b)
    assert _sign((ea > eb) - (ea < eb)) == compare(a, b)


@given(scalars, scalars, st.binary(max_size=6), st.binary(max_size=6))
def test_encoding_is_self_delimiting(a: Any, b: Any, ta: bytes, tb: bytes) -> None:
    """Bytes after an encoding never change how two different values compare (what
    makes compound keys compare field by field)."""
    if compare(a, b) == 0:
        return
    ea, eb = keys.encode(a) + ta, keys.encode(b) + tb
    assert _sign((ea > eb) - (ea < eb)) == compare(a, b)


@given(scalars, st.binary(max_size=4))
def test_skip_and_decode_find_the_end(v: Any, tail: bytes) -> None:
    """skip() finds where an encoding ends; decode() gives back an equal value."""
    enc = keys.encode(v)
    assert keys.skip(enc + tail, 0) == len(enc)
    back, end = keys.decode(enc + tail)
    assert end == len(enc)
    assert compare(back, v) == 0


@given(texts, texts)
def test_prefix_encoding_matches_startswith(s: str, p: str) -> None:
    """A string starts with p exactly when its encoding starts with encode_prefix(p),
    i.e. lies in [encode_prefix(p), successor(encode_prefix(p)))."""
    enc, pre = keys.encode(s), keys.encode_prefix(p)
    assert enc.startswith(pre) == s.startswith(p)
    assert (pre <= enc < keys.successor(pre)) == s.startswith(p)


@given(st.binary(min_size=1, max_size=8).filter(lambda b: b.rstrip(b"\xff") != b""),
       st.binary(max_size=8))
def test_successor_bounds_every_extension(prefix: bytes, tail: bytes) -> None:
    """successor(p) is above every key starting with p and at or below every greater
    key that does not."""
    succ = keys.successor(prefix)
    assert prefix + tail < succ
    assert not succ.startswith(prefix)


def test_kinds_sort_in_the_documented_order() -> None:
    """null < false < true < numbers < strings < objects."""
    ordered = [None, False, True, -(2**1100), -1e308, -1, 0, 0.5, 1, 2**64, 2**1100,
               "", "A", "a", "é", {"x": 1}]
    encoded = [keys.encode(v) for v in ordered]
    assert encoded == sorted(encoded)
    assert keys.encode(1) == keys.encode(1.0)
    assert keys.encode(-0.0) == keys.encode(0)
    assert keys.encode(2**53 + 1) != keys.encode(float(2**53 + 1))
    assert keys.encode(2**53 + 1) > keys.encode(float(2**53 + 1))
