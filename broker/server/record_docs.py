"""Server records as an operator reads them: decoded, with the app's field names.

Pure logic, no I/O. The store keeps each record in the merge's compact storage form
(`waystation.merge.to_json`: ``fv``, ``c``, ``k``, ``s``, ``q``, ``f`` with per-field
``["r", q, [v, stamp, n]]`` / ``["c", q, total]`` / ``["s", q, tags, removed]``, ``x``,
``wh``); `record_doc` turns one into the document `waystation server get/list/export`
print:

    {"collection": "inventory", "key": "sku-a", "scope": "depot-7", "version": 12,
     "deleted": false, "updated": "2026-12-05T05:10:11.123Z",
     "fields": {"sku": "sku-a", "stock": 12, "tags": ["cold"]},
     "open_conflicts": ["address"]}

`fields` holds what an app on a device reads (`RecordState.values`): a register's value,
a counter's total, a set's sorted members; a deleted record has no fields. `version` is
the record's sequence number in its scope (the `q` devices hold). `updated` is the wall
clock part of the newest stamp in the record (ISO 8601, UTC), "" when it has none.

With ``detail=True`` (`server get`) the document also has ``field_info``: per field its
merge strategy (from the collection schema; "" when the schema no longer names the
field), and for lww/manual fields who wrote the value (device, change number, stamp,
time), plus an open conflict's concurrent candidates.
"""

from __future__ import annotations

import time
from typing import Any

from broker.errors import BadStoredRecord
from schemas.collection import CollectionSpec
from waystation import merge
from waystation.hlc import Stamp
from waystation.merge.state import Counter, RecordState, Register, SetField


def iso_ms(ms: int) -> str:
    """`ms` since the epoch as ISO 8601 UTC with milliseconds; "" for 0."""
    if ms <= 0:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def decode_state(state: dict[str, Any], c: str, k: str) -> RecordState:
    """The merge's record from the stored form of `c/k`; BadStoredRecord when it is
    not one."""
    try:
        return merge.from_json(state)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise BadStoredRecord(f"stored record {c}/{k} cannot be decoded ({exc}): it was "
                              "written by another version of Waystation") from None


def record_doc(record: RecordState, spec: CollectionSpec | None = None, *,
               detail: bool = False) -> dict[str, Any]:
    """The operator's document of one record (see the module docstring)."""
    newest = merge.latest_stamp(record)
    doc: dict[str, Any] = {
        "collection": record.c, "key": record.k, "scope": record.s, "version": record.q,
        "deleted": record.deleted, "updated": "" if newest is None else iso_ms(newest.wall),
        "fields": record.values(),
        "open_conflicts": sorted(name for name, st in record.fields.items()
                                 if type(st) is Register and st.cf and not record.deleted),
    }
    if record.deleted and record.xh is not None:
        doc["deleted_by"] = {"device": record.xby, "change": record.xn,
                             "stamp": record.xh.encode(), "time": iso_ms(record.xh.wall)}
    if detail:
        doc["field_info"] = {name: _field_info(name, st, spec)
                             for name, st in sorted(record.fields.items())}
    return doc


def _field_info(name: str, st: Any, spec: CollectionSpec | None) -> dict[str, Any]:
    fs = None if spec is None else spec.fields.get(name)
    info: dict[str, Any] = {"merge": "" if fs is None else fs.strategy, "version": st.q}
    if type(st) is Register:
        info.update(_written(st.value.by, st.value.n, st.value.h))
        if st.cf:
            info["conflict"] = [{"value": x.v, **_written(x.by, x.n, x.h)} for x in st.cf]
    elif type(st) is Counter:
        info["total"] = st.total
    elif isinstance(st, SetField):
        info["members"] = sorted(st.tags)
    return info


def _written(by: str, n: int, stamp: Stamp) -> dict[str, Any]:
    return {"by": by, "change": n, "stamp": stamp.encode(), "time": iso_ms(stamp.wall)}


def matches(record: RecordState, *, scope: str | None, deleted: bool) -> bool:
    """Whether a listing shows `record`: in `scope` (None: any), and live unless
    `deleted` asks for deleted records too."""
    if scope is not None and record.s != scope:
        return False
    return deleted or not record.deleted


__all__ = ["decode_state", "iso_ms", "matches", "record_doc"]
