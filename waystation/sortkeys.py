"""Sortable, self-delimiting byte encoding of JSON scalars, for index keys.

Pure: no I/O. For any two values a, b of the kinds below, ``encode(a) < encode(b)``
(bytewise) exactly when a sorts before b, and ``encode(a) == encode(b)`` exactly when
they are equal, where values sort first by kind and then within it:

=========  ====  ==================================================================
kind       tag   order within the kind
=========  ====  ==================================================================
null       0x10  (one value; a missing field is null)
false      0x20  false < true
true       0x21
number     0x30  numerically: ints and floats together, 1 == 1.0, -0.0 == 0.0;
                 exact for ints of any size (not only the 53-bit range)
string     0x40  by Unicode code point (the UTF-8 byte order)
other      0x50  objects and nested arrays: all equal (never ordered, never matched)
=========  ====  ==================================================================

Every encoding is self-delimiting: no encoding is a proper prefix of another, so the
components of a compound key can be concatenated and still compare component by
component, and a key extended by more bytes stays between the same neighbours
(`successor` gives the first key after every extension of a prefix).

- number: tag, the float64 of the value with the sign bit flipped (positive) or every
  bit inverted (negative) -- big-endian, so bytes compare as numbers -- then one or more
  bytes for the difference between an int and its float64 (0x80 when exact; ints past
  2**53 that the float rounds carry the exact rest, so they stay distinct and ordered).
- string: tag, the UTF-8 bytes with 0x00 written as 0x00 0xFF, then 0x00 0x01.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Any

TAG_NULL = 0x10
TAG_FALSE = 0x20
TAG_TRUE = 0x21
TAG_NUMBER = 0x30
TAG_STRING = 0x40
TAG_OTHER = 0x50

NULL = bytes([TAG_NULL])
FALSE = bytes([TAG_FALSE])
TRUE = bytes([TAG_TRUE])
OTHER = bytes([TAG_OTHER])
STRING_END = b"\x00\x01"

KIND_BOUNDS: dict[str, tuple[bytes, bytes]] = {
    "null": (NULL, bytes([TAG_NULL + 1])),
    "bool": (FALSE, bytes([TAG_TRUE + 1])),
    "number": (bytes([TAG_NUMBER]), bytes([TAG_NUMBER + 1])),
    "string": (bytes([TAG_STRING]), bytes([TAG_STRING + 1])),
}
"""[first, after-last) of every encoding of a kind: where a range on that kind stops."""

_PACK = struct.Struct(">d").pack
_UNPACK = struct.Struct(">Q").unpack
_SIGN = 1 << 63
_MASK = (1 << 64) - 1
_OVER = 1 << 1024
"""Where ints too large for a float64 are measured from (beyond every finite float)."""


def kind(value: Any) -> str:
    """The kind a value sorts in: null, bool, number, string, or other."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "other"


def encode(value: Any) -> bytes:
    """The sortable encoding of one scalar (a list or object encodes as "other")."""
    if isinstance(value, str):
        raw = value.encode("utf-8")
        if b"\x00" in raw:
            raw = raw.replace(b"\x00", b"\x00\xff")
        return b"\x40" + raw + STRING_END
    if value is None:
        return NULL
    if value is True:
        return TRUE
    if value is False:
        return FALSE
    if isinstance(value, int):
        return _encode_int(value)
    if isinstance(value, float):
        if math.isnan(value):
            return OTHER  # never stored (the agent refuses non-finite numbers)
        return b"\x30" + _float_bits(value + 0.0) + b"\x80"
    return OTHER


def encode_prefix(text: str) -> bytes:
    """The bytes every encoding of a string starting with `text` starts with."""
    return b"\x40" + text.encode("utf-8").replace(b"\x00", b"\x00\xff")


def _float_bits(f: float) -> bytes:
    bits: int
    (bits,) = _UNPACK(_PACK(f))
    bits = bits ^ _SIGN if not bits & _SIGN else bits ^ _MASK
    return bits.to_bytes(8, "big")


def _encode_int(n: int) -> bytes:
    try:
        f = float(n)
        rest = n - int(f)
    except OverflowError:
        f = math.inf if n > 0 else -math.inf
        rest = n - (_OVER if n > 0 else -_OVER)
    return b"\x30" + _float_bits(f) + _encode_rest(rest)


_SHORT = 126
"""Rests of up to this many bytes carry their size in the marker byte (0x80 +- size);
longer ones (ints far beyond a float64's range) have marker 0xFF / 0x00 and 4 bytes of
size."""


def _encode_rest(rest: int) -> bytes:
    """A signed int as an order-preserving, self-delimiting byte string (0 -> 0x80)."""
    if rest == 0:
        return b"\x80"
    size = (abs(rest).bit_length() + 7) // 8
    if rest > 0:
        head = bytes([0x80 + size]) if size <= _SHORT else b"\xff" + size.to_bytes(4, "big")
        return head + rest.to_bytes(size, "big")
    head = (bytes([0x80 - size]) if size <= _SHORT
            else b"\x00" + (0xFFFFFFFF - size).to_bytes(4, "big"))
    return head + ((1 << (8 * size)) - 1 + rest).to_bytes(size, "big")


def _rest_span(buf: bytes, pos: int) -> tuple[int, int, bool]:
    """(start of the rest's bytes, their size, positive) for the marker at `pos`."""
    marker = buf[pos]
    if marker == 0xFF:
        return pos + 5, int.from_bytes(buf[pos + 1:pos + 5], "big"), True
    if marker == 0x00:
        return pos + 5, 0xFFFFFFFF - int.from_bytes(buf[pos + 1:pos + 5], "big"), False
    return pos + 1, abs(marker - 0x80), marker > 0x80


def successor(prefix: bytes) -> bytes:
    """The smallest byte string greater than every string starting with `prefix`.

    `prefix` must contain a byte below 0xFF (every index key starts with its index id,
    and every encoding with a tag below 0xFF)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        raise ValueError("no successor of an all-0xFF prefix")
    return stripped[:-1] + bytes([stripped[-1] + 1])


def skip(buf: bytes, pos: int) -> int:
    """The position just after the encoded value starting at `pos`."""
    tag = buf[pos]
    if tag == TAG_STRING:
        i = pos + 1
        while True:
            i = buf.index(b"\x00", i)
            if buf[i + 1] == 0x01:
                return i + 2
            i += 2
    if tag == TAG_NUMBER:
        start, size, _ = _rest_span(buf, pos + 9)
        return start + size
    return pos + 1


def decode(buf: bytes, pos: int = 0) -> tuple[Any, int]:
    """The value encoded at `pos` and the position after it (numbers come back as int
    when integral and exact in a float64 or carrying a rest, else float; "other" as
    Ellipsis)."""
    tag = buf[pos]
    if tag == TAG_NULL:
        return None, pos + 1
    if tag == TAG_FALSE:
        return False, pos + 1
    if tag == TAG_TRUE:
        return True, pos + 1
    if tag == TAG_STRING:
        end = skip(buf, pos)
        return buf[pos + 1:end - 2].replace(b"\x00\xff", b"\x00").decode("utf-8"), end
    if tag == TAG_NUMBER:
        (bits,) = _UNPACK(buf[pos + 1:pos + 9])
        bits = bits ^ _SIGN if bits & _SIGN else bits ^ _MASK
        f: float = struct.unpack(">d", bits.to_bytes(8, "big"))[0]
        start, size, positive = _rest_span(buf, pos + 9)
        end = start + size
        if size == 0:
            return f, end
        raw = int.from_bytes(buf[start:end], "big")
        rest = raw if positive else raw - ((1 << (8 * size)) - 1)
        if math.isinf(f):
            return (_OVER if f > 0 else -_OVER) + rest, end
        return int(f) + rest, end
    return ..., pos + 1


def members(value: Any) -> Iterable[Any]:
    """The values one field contributes to an index: each member of a set (a list),
    else the value itself."""
    if isinstance(value, list):
        return value
    return (value,)


__all__ = [
    "KIND_BOUNDS",
    "NULL",
    "OTHER",
    "decode",
    "encode",
    "encode_prefix",
    "kind",
    "members",
    "skip",
    "successor",
]
