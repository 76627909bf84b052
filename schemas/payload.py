"""Wire payload bytes to JSON text: steps 1-2 of decoding (PROTOCOL.md §3, `schemas.codec`).

The payload must be bytes-like and within `max_payload`; a zlib stream (first byte
0x78) is inflated into a bounded buffer, so a zip bomb never allocates more than
`max_decompressed` bytes. A stream may ask for a preset dictionary: the protocol's
(`zd1`, `schemas.zdict`), a schema version's this process parsed (`zd2`,
`schemas.zdict_schema`), or one the caller found for it (`zd3`, the device's recent
traffic: `inflate(..., dictionary=...)`).
"""

from __future__ import annotations

import zlib
from typing import Any, Final

from schemas import zdict, zdict_schema
from schemas.codes import MALFORMED, TOO_LARGE
from schemas.errors import ProtocolError
from schemas.reasons import clip_reason, too_large_reason

DEFAULT_MAX_PAYLOAD: Final = 256 * 1024
DEFAULT_MAX_DECOMPRESSED: Final = 1024 * 1024
ZLIB_FIRST_BYTE: Final = 0x78


def payload_bytes(payload: Any, max_payload: int) -> bytes:
    """Step 1: `payload` as bytes (`malformed` if it is not bytes-like, `too_large`
    past `max_payload`)."""
    data: bytes
    if isinstance(payload, bytes):
        data = payload
    elif isinstance(payload, bytearray):
        if len(payload) > max_payload:
            raise ProtocolError(TOO_LARGE, too_large_reason("payload", len(payload), max_payload))
        data = bytes(payload)
    else:
        try:
            view = memoryview(payload)
            size = view.nbytes
            if size > max_payload:
                raise ProtocolError(TOO_LARGE, too_large_reason("payload", size, max_payload))
            data = view.tobytes()
        except ProtocolError:
            raise
        except Exception:
            raise ProtocolError(
                MALFORMED, f"payload must be bytes, not {type(payload).__name__[:40]}"
            ) from None
    if len(data) > max_payload:
        raise ProtocolError(TOO_LARGE, too_large_reason("payload", len(data), max_payload))
    return data


def is_zlib(data: bytes) -> bool:
    return bool(data) and data[0] == ZLIB_FIRST_BYTE


def payload_text(payload: Any, max_payload: int, max_decompressed: int) -> bytes:
    """Steps 1-2: the payload's JSON text (a zlib stream inflated)."""
    data = payload_bytes(payload, max_payload)
    return inflate(data, max_decompressed) if is_zlib(data) else data


def inflate(data: bytes, limit: int, *, dictionary: bytes | None = None) -> bytes:
    """The zlib stream `data` inflated, at most `limit` bytes; with the preset dictionary
    its header names (`dictionary`, or one this process knows: else `malformed`)."""
    wanted = zdict.wants_dictionary(data)
    if wanted is None:
        inflater = zlib.decompressobj()
    else:
        known = dictionary if dictionary is not None else zdict_schema.lookup(wanted)
        if known is None:
            raise ProtocolError(MALFORMED, "zlib stream needs a preset dictionary this "
                                           f"receiver does not know (id {wanted})")
        inflater = zlib.decompressobj(zdict=known)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(MALFORMED, clip_reason(f"broken zlib stream: {exc}")) from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ProtocolError(TOO_LARGE, f"decompressed payload exceeds {limit} bytes")
    if not inflater.eof:
        raise ProtocolError(MALFORMED, "broken zlib stream: truncated")
    if inflater.unused_data:
        raise ProtocolError(MALFORMED, "broken zlib stream: trailing bytes after the stream")
    return out


__all__ = ["DEFAULT_MAX_DECOMPRESSED", "DEFAULT_MAX_PAYLOAD", "ZLIB_FIRST_BYTE", "inflate",
           "is_zlib", "payload_bytes", "payload_text"]
