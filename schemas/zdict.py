"""Compact encoding of small messages: zlib with a preset dictionary (PROTOCOL.md §3, §11).

A change or an ack is mostly protocol frame (`{"type":"changes","v":1,"dev":...`) and
small enough that plain zlib has nothing earlier in the message to refer back to. With
a *preset dictionary* (RFC 1950 FDICT: both ends know these bytes beforehand) the frame
costs a few bytes. The dictionary is part of the protocol: `DICTIONARY` never changes
(a new one would get a new id and a new capability); its adler-32, `DICT_ID`, travels
in every stream's header, so a receiver always knows which dictionary a stream needs.

Negotiated: a sender uses it only towards a peer that agreed to capability `CAP`
(`zd1`) in hello / welcome (§11); a v1 receiver without it would refuse the stream
(zlib: "need dictionary"), so devices without the capability get what they always
got. Decoding (`schemas.codec`) accepts such a stream from anyone, with the same
bounded output as any compressed payload.
"""

from __future__ import annotations

import zlib
from typing import Final

CAP: Final = "zd1"
"""The capability: both sides read and write zlib streams with `DICTIONARY`."""

LEVEL: Final = 9
"""For messages up to `SMALL` bytes (the ones the dictionary is for); larger ones use
zlib's level 6, as plain compression does: level 9 costs far more CPU there."""
SMALL: Final = 4096
SMALL_MEM_LEVEL: Final = 7
"""zlib's memLevel for those (its default is 8; this module used 9): the deflate state is
allocated and its hash table cleared for every message, which for a lone change cost far
more than compressing it. CPU to pack a ~350-byte change with the zd1 dictionary on this
host: 88.9 us at memLevel 9, 57.7 at 8, 9.4 at 7; bytes per lone change (bench.wire_bytes'
records, same seed, 9 -> 7): zd1 -1.0, zd2 +2.6, zd3 -0.3. memLevel is not in the stream's
header: the window stays 32 KiB (first byte 0x78, PROTOCOL.md §3); readers see no change."""

# Skeletons of the messages of §7, least frequent first: deflate finds matches closer
# to the end of the dictionary for fewer bits, and changes and acks are the traffic.
_SKELETONS: Final = (
    b'{"type":"status","v":1,"dev":"","on":true,"agent":"waystation-agent/","sv":1,"t":'
    b'{"type":"server","v":1,"grp":"","srv":"","on":false,"t":'
    b'{"type":"command","v":1,"id":"","cmd":"scopes","args":{"scopes":[""]}}'
    b'{"type":"hello","v":1,"dev":"","agent":"waystation-agent/","sv":1,"z":true,'
    b'"done":[],"inc":"","cp":{"":0},"caps":["schema","scopes","sync","txn","zd1"]}'
    b'{"type":"welcome","v":1,"caps":["schema","scopes","sync","txn","zd1"],"srv":"",'
    b'"sv":1,"sv_min":1}'
    b'{"type":"catchup","v":1,"dev":"","req":"c-","cp":{"":0},"snap":[],"lim":1000}'
    b'{"type":"checkpoint","v":1,"req":"c-","cp":{"":0},"denied":[]}'
    b'{"type":"reject","v":1,"rj":[{"n":1,"code":"invalid","reason":"","perm":true,'
    b'"rec":{}}],"err":{"code":"","reason":""}}'
    b'{"type":"page","v":1,"req":"c-","s":"","from":0,"to":0,"reset":false,"more":false,'
    b'"recs":[{"c":"","k":"","s":"","q":1,"f":{},"h":{},"t":{},"cf":{}}]}'
    b'{"type":"delta","v":1,"d":[{"c":"","k":"","s":"","q":1,"part":true,"x":false,'
    b'"f":{"":null},"h":{"":""}}]}'
    b'"i":{"":1},"a":{"":[""]},"r":{"":{"":[""]}},"tx":[1,2]'
    b'{"type":"ack","v":1,"ok":[[1,"",1]],"fx":[{"c":"","k":"","s":"","q":1,"part":true,'
    b'"f":{}}],"rs":[1]}'
    b'{"type":"ack","v":1,"ok":[['
    b'{"type":"changes","v":1,"dev":"","sv":1,"ch":[{"n":1,"h":"01","c":"","k":"",'
    b'"s":"","b":0,"op":"del"}],"inc":""}'
    b'{"type":"changes","v":1,"dev":"","sv":1,"ch":[{"n":'
    b',"h":"01a2","c":"'
    b'","k":"","s":"","b":0,"op":"put","f":{"'
)
DICTIONARY: Final = _SKELETONS
DICT_ID: Final = zlib.adler32(DICTIONARY)
HEADER_FDICT: Final = 0x20
"""The FDICT bit of a zlib header's second byte: a DICTID (4 bytes) follows."""


def pack(data: bytes, dictionary: bytes = DICTIONARY) -> bytes:
    """`data` as a zlib stream with the preset dictionary (by default the zd1 one; a
    schema's, `schemas.zdict_schema`, with zd2), or `data` itself when that is not
    smaller (a tiny or incompressible message)."""
    level, mem = (LEVEL, SMALL_MEM_LEVEL) if len(data) <= SMALL else (6, 8)
    co = zlib.compressobj(level, zlib.DEFLATED, 15, mem, zlib.Z_DEFAULT_STRATEGY, dictionary)
    packed = co.compress(data) + co.flush()
    return packed if len(packed) < len(data) else data


def unpack(data: bytes) -> bytes:
    """A zlib stream this process wrote (with or without a dictionary it knows),
    inflated. Trusted input only: what comes from the wire goes through `schemas.codec`."""
    from schemas import zdict_schema  # it builds on this module

    wanted = wants_dictionary(data)
    known = None if wanted is None else zdict_schema.lookup(wanted)
    do = zlib.decompressobj() if known is None else zlib.decompressobj(zdict=known)
    return do.decompress(data) + do.flush()


def wants_dictionary(data: bytes) -> int | None:
    """The DICTID a zlib stream's header asks for, or None (no dictionary)."""
    if len(data) >= 2 and data[1] & HEADER_FDICT:
        return int.from_bytes(data[2:6], "big") if len(data) >= 6 else -1
    return None


__all__ = ["CAP", "DICTIONARY", "DICT_ID", "LEVEL", "SMALL", "pack", "unpack", "wants_dictionary"]
