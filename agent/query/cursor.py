"""Opaque page cursors: where the previous page of one query ended.

Pure: no I/O. A cursor is URL-safe base64 (no padding) of: a format byte, the plan's
fingerprint (8 bytes: the query without limit/after, and the index id) and the merge
key of the last entry returned. A cursor from another query, or from an index that was
since dropped and rebuilt, is refused (`CursorInvalid`) rather than silently misread.
"""

from __future__ import annotations

import base64
import binascii

from agent.query.errors import CursorInvalid

FORMAT = 1
_FP_BYTES = 8


def encode_cursor(fingerprint: bytes, position: bytes) -> str:
    raw = bytes([FORMAT]) + fingerprint + position
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(text: str, fingerprint: bytes) -> bytes:
    """The position a cursor names, if it was made for the query with `fingerprint`."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise CursorInvalid("the after cursor is not one this agent made (not base64); "
                            "pass the `next` value of the previous page as it is") from None
    if len(raw) <= 1 + _FP_BYTES or raw[0] != FORMAT:
        raise CursorInvalid("the after cursor is not one this agent made; pass the `next` "
                            "value of the previous page as it is")
    if raw[1:1 + _FP_BYTES] != fingerprint:
        raise CursorInvalid("the after cursor belongs to another query (or its index was "
                            "rebuilt since): repeat the same query, or start again without "
                            "a cursor")
    return raw[1 + _FP_BYTES:]


__all__ = ["decode_cursor", "encode_cursor"]
