"""Preset dictionaries derived from a collection schema (capability `zd2`, PROTOCOL.md §3).

The `zd1` dictionary (`schemas.zdict`) knows the protocol's message skeletons but not a
fleet's collections: in a lone change every collection and field name is still spelled
out. Both ends of a link already hold the collection schema, so each can *derive* the
same extra bytes from it: for every collection, a change's skeleton with its collection
name and its field names in the groups (`f`, `i`, `a`) their merge strategy puts them
in. The `zd2` dictionary is the `zd1` dictionary followed by those bytes; its adler-32
(the zlib DICTID) names it on the wire and in `hello.zd`.

Only what a schema version fixes goes in (collection and field names, types, merge
strategies, in file order); descriptions, indexes and retention are local to a device
and may differ between two copies of one version, so they are left out. Two copies that
differ anyway give two ids: the server then does not agree to `zd2` (it has no
dictionary with the device's id) and both sides keep using `zd1`.

Every catalog this process builds (`schemas.collection.Catalog`) registers its
dictionary here, so a receiver can inflate a stream made with the dictionary of any
schema version it holds (`lookup`). The registry is bounded (`MAX_REGISTERED`, oldest
forgotten first) and fed only by local catalogs, never by what a peer sends.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterable, Mapping
from typing import Final, Protocol

from schemas import zdict

CAP: Final = "zd2"
"""The capability: the device may compress up messages with its schema's dictionary."""

MAX_SCHEMA_PART: Final = 24 * 1024
"""The schema's bytes are cut to this length, so the whole dictionary stays inside
deflate's 32 KiB window (bytes beyond it could never be referred to)."""

MAX_REGISTERED: Final = 512
"""Dictionaries one process keeps (one per schema version it has parsed)."""


class _Field(Protocol):
    @property
    def type(self) -> str: ...

    @property
    def strategy(self) -> str: ...


class _Collection(Protocol):
    @property
    def fields(self) -> Mapping[str, _Field]: ...


class CatalogLike(Protocol):
    @property
    def collections(self) -> Mapping[str, _Collection]: ...


def schema_part(catalog: CatalogLike) -> bytes:
    """The bytes a schema adds to the dictionary (deterministic: same schema, same bytes).

    Per collection, in file order, the members of a `put` change as the agent writes
    them: `"c":"NAME","k":"","s":"","b":0,"op":"put","f":{...},"i":{...},"a":{...}`, a
    string field with its opening quote (`"notes":"`), other values without.
    """
    out: list[bytes] = []
    for name, spec in catalog.collections.items():
        plain: list[bytes] = []
        counters: list[bytes] = []
        sets: list[bytes] = []
        for field, fspec in spec.fields.items():
            key = _quoted(field)
            if fspec.strategy == "set":
                sets.append(key + b':["')
            elif fspec.strategy == "counter":
                counters.append(key + b":1")
            elif fspec.type == "string":
                plain.append(key + b':"')
            else:
                plain.append(key + b":")
        body = b'"c":' + _quoted(name) + b',"k":"","s":"","b":0,"op":"put"'
        body += _group(b"f", plain) + _group(b"i", counters) + _group(b"a", sets)
        out.append(body)
    return b"".join(out)[:MAX_SCHEMA_PART]


def _quoted(name: str) -> bytes:
    # Collection and field names match ^[a-z][a-z0-9_]*$ (schemas.wire): no escaping.
    return b'"' + name.encode() + b'"'


def _group(member: bytes, entries: Iterable[bytes]) -> bytes:
    items = list(entries)
    if not items:
        return b""
    return b',"' + member + b'":{' + b",".join(items) + b"}"


def dictionary(catalog: CatalogLike) -> bytes:
    """The `zd2` dictionary of `catalog`: the `zd1` dictionary, then the schema's bytes
    (deflate codes matches near the end of the window in fewer bits; the schema's names
    are what a change spells most)."""
    return zdict.DICTIONARY + schema_part(catalog)


def dict_id(data: bytes) -> int:
    """The zlib DICTID of a dictionary (its adler-32)."""
    return zlib.adler32(data)


_lock = threading.Lock()
_known: dict[int, bytes] = {zdict.DICT_ID: zdict.DICTIONARY}


def register(catalog: CatalogLike) -> int | None:
    """Remember `catalog`'s dictionary; returns its id (None: another dictionary holds
    that id). Idempotent and cheap."""
    data = dictionary(catalog)
    ident = dict_id(data)
    with _lock:
        held = _known.get(ident)
        if held is None:
            while len(_known) >= MAX_REGISTERED + 1:
                oldest = next(k for k in _known if k != zdict.DICT_ID)
                del _known[oldest]
            _known[ident] = data
        elif held != data:
            # Another dictionary with the same adler-32: keep the first, so a stream
            # naming this id keeps meaning what it meant. The second schema's devices
            # fall back to zd1 (the server cannot tell the two apart).
            return None
    return ident


def lookup(ident: int) -> bytes | None:
    """The dictionary with zlib DICTID `ident` that this process knows, or None."""
    with _lock:
        return _known.get(ident)


def known(ident: int | None) -> bool:
    return ident is not None and lookup(ident) is not None


__all__ = ["CAP", "MAX_REGISTERED", "MAX_SCHEMA_PART", "dict_id", "dictionary", "known",
           "lookup", "register", "schema_part"]
