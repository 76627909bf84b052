"""The indexes a store keeps, and the entries one record's view puts in each.

Pure: no I/O. The store records its indexes in meta ``idx`` (`Registry`); every process
that writes the store maintains exactly the indexes recorded there (not the ones its own
schema file declares), so a process started with an older schema file still keeps every
index in step. Opening the agent reconciles the registry with the schema
(`Registry.reconcile`): a declared index not yet recorded is added in state ``build``,
a recorded index no longer declared goes to ``drop``.

Index entries live in database ``index``:

    key    index id (4 bytes, big-endian) + encoded value of each field (waystation.sortkeys)
           + the record key (UTF-8)
    value  0x01 if the record is deleted else 0x00, + the record key (UTF-8)

A record has one entry per index, or one per member of the index's set field (none
when the set is empty). Deleted records keep their entries (their fields read as null,
`$scope` as their scope), flagged, so that a query can include them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple, Protocol, cast

from schemas.collection import Catalog
from schemas.indexes import SCOPE_FIELD
from waystation.sortkeys import encode

IndexState = Literal["build", "ready", "drop"]
ID_BYTES = 4
DELETED = b"\x01"
LIVE = b"\x00"


@dataclass(frozen=True, slots=True)
class IndexDef:
    """One index of the store."""

    id: int
    collection: str
    fields: tuple[str, ...]
    state: IndexState = "build"
    at: str | None = None
    """While building: the record key the build continues from (None: the start)."""
    done: int = 0
    """While building: records indexed so far (for progress reports)."""

    @property
    def name(self) -> str:
        return ",".join(self.fields)

    @property
    def prefix(self) -> bytes:
        return self.id.to_bytes(ID_BYTES, "big")

    def to_doc(self) -> dict[str, Any]:
        return {"id": self.id, "c": self.collection, "f": list(self.fields), "st": self.state,
                "at": self.at, "n": self.done}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> IndexDef:
        return cls(int(doc["id"]), str(doc["c"]), tuple(doc["f"]), doc["st"], doc.get("at"),
                   int(doc.get("n", 0)))


@dataclass(frozen=True, slots=True)
class Registry:
    """Every index of the store (meta ``idx``), and the next id to give out (never
    reused, so entries of a dropped index can never be mistaken for a new one's)."""

    indexes: tuple[IndexDef, ...] = ()
    next_id: int = 1

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> Registry:
        if not doc:
            return cls()
        return cls(tuple(IndexDef.from_doc(d) for d in doc["ix"]), int(doc["next"]))

    def to_doc(self) -> dict[str, Any]:
        return {"next": self.next_id, "ix": [ix.to_doc() for ix in self.indexes]}

    def maintained(self, collection: str) -> list[IndexDef]:
        """The indexes every change of a view of `collection` must update."""
        return [ix for ix in self.indexes if ix.collection == collection and ix.state != "drop"]

    def of(self, collection: str) -> list[IndexDef]:
        return [ix for ix in self.indexes if ix.collection == collection]

    def pending(self) -> list[IndexDef]:
        """Indexes with work left: being built or being dropped."""
        return [ix for ix in self.indexes if ix.state != "ready"]

    def with_index(self, new: IndexDef) -> Registry:
        """This registry with `new` replacing the index of the same id."""
        return replace(self, indexes=tuple(new if ix.id == new.id else ix
                                           for ix in self.indexes))

    def without(self, index_id: int) -> Registry:
        return replace(self, indexes=tuple(ix for ix in self.indexes if ix.id != index_id))

    def all_ready(self) -> Registry:
        """After every view and index entry was erased: nothing is left to build or drop."""
        return replace(self, indexes=tuple(replace(ix, state="ready", at=None, done=0)
                                           for ix in self.indexes if ix.state != "drop"))

    def reconcile(self, declared: Mapping[str, Sequence[tuple[str, ...]]]) -> Registry:
        """Bring the registry in line with the schema: add (state build) each declared
        index not recorded, mark each recorded one no longer declared for dropping."""
        wanted = {(c, tuple(f)) for c, fs in declared.items() for f in fs}
        kept: list[IndexDef] = []
        have: set[tuple[str, tuple[str, ...]]] = set()
        for ix in self.indexes:
            key = (ix.collection, ix.fields)
            if ix.state != "drop" and key in wanted:
                have.add(key)
                kept.append(ix)
            elif ix.state != "drop":
                kept.append(replace(ix, state="drop", at=None, done=0))
            else:
                kept.append(ix)
        next_id = self.next_id
        for c, fields in sorted(wanted - have):
            kept.append(IndexDef(next_id, c, fields, "build"))
            next_id += 1
        return Registry(tuple(kept), next_id)


def declared_indexes(catalog: Catalog) -> dict[str, list[tuple[str, ...]]]:
    """collection -> the field tuples of the indexes its schema declares."""
    return {name: [ix.fields for ix in spec.indexes]
            for name, spec in catalog.collections.items() if spec.indexes}


class Indexed(Protocol):
    """What index entries are computed from: a `ViewState`, or `StoredView` (a stored
    view document read without building a whole `ViewState`)."""

    @property
    def k(self) -> str: ...
    @property
    def s(self) -> str: ...
    @property
    def x(self) -> bool: ...
    @property
    def f(self) -> Mapping[str, Any]: ...


class StoredView(NamedTuple):
    """The members of a stored view document that index entries depend on."""

    k: str
    s: str
    x: bool
    f: Mapping[str, Any]

    @classmethod
    def from_doc(cls, k: str, doc: Mapping[str, Any]) -> StoredView:
        return cls(k, doc["s"], doc["x"], doc["f"])


def field_value(state: Indexed, name: str) -> Any:
    """The value an index or a query sees in field `name` of a view: its visible value
    (null when missing or the record is deleted); `$scope` is the record's scope."""
    if name == SCOPE_FIELD:
        return state.s
    if state.x:
        return None
    return state.f.get(name)


def unchanged(index: IndexDef, old: Indexed, new: Indexed) -> bool:
    """Whether two views of one record have the same entries in `index` (a quick test
    before computing them)."""
    if old.x != new.x:
        return False
    for name in index.fields:
        a = field_value(old, name)
        b = field_value(new, name)
        if a != b or type(a) is not type(b):
            return False
    return True


def entries(index: IndexDef, state: Indexed | None,
            memo: dict[str, bytes | list[bytes]] | None = None) -> dict[bytes, bytes]:
    """The index entries (key -> value) of one record's view (none without a view).

    `memo` (field name -> encoded value, or encoded members of a set) may be shared by
    the calls for one view's indexes: a field several indexes hold is encoded once."""
    if state is None:
        return {}
    key = state.k.encode()
    value = (DELETED if state.x else LIVE) + key
    parts: list[bytes | list[bytes]] = []
    single = True
    for name in index.fields:
        enc = None if memo is None else memo.get(name)
        if enc is None:
            v = field_value(state, name)
            # A set field gives one entry per member (none while it is empty).
            enc = [encode(m) for m in v] if isinstance(v, list) else encode(v)
            if memo is not None:
                memo[name] = enc
        if isinstance(enc, list):
            single = False
        parts.append(enc)
    prefix = index.prefix
    if single:
        return {prefix + b"".join(cast("list[bytes]", parts)) + key: value}
    out: dict[bytes, bytes] = {}
    for combo in itertools.product(*[p if isinstance(p, list) else (p,) for p in parts]):
        out[prefix + b"".join(combo) + key] = value
    return out


__all__ = [
    "DELETED",
    "ID_BYTES",
    "LIVE",
    "IndexDef",
    "IndexState",
    "Indexed",
    "Registry",
    "StoredView",
    "declared_indexes",
    "entries",
    "field_value",
    "unchanged",
]
