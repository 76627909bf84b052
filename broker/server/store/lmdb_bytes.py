"""How the LMDB store spells numbers and names in its keys (shared by its table modules):
big-endian u64 (so keys sort as numbers), UTF-8 text, NUL between key parts."""

from __future__ import annotations

import struct
from typing import Final

SEP: Final = b"\x00"
U64: Final = struct.Struct(">Q")
"""For hot paths: `U64.pack(n)` without a function call."""


def u64(n: int) -> bytes:
    return U64.pack(n)


def from_u64(b: bytes) -> int:
    return int(U64.unpack(b)[0])


def text(value: str) -> bytes:
    return value.encode("utf-8")


__all__ = ["SEP", "U64", "from_u64", "text", "u64"]
