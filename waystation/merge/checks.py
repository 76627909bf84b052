"""Validating a change against its collection and the stored record (PROTOCOL.md §5 order)."""

from __future__ import annotations

import json
from typing import Any

from schemas.collection import ANY_INT, ANY_JSON, CollectionSpec, FieldSpec
from schemas.wire import MAX_SAFE_INT, Change
from waystation.merge.state import Counter, RecordState, Rejection

# --- validation ------------------------------------------------------------------------

_WRONG_STRATEGY_HINT = {
    "lww": "send its new value in 'f'",
    "manual": "send its new value in 'f'",
    "counter": "send an increment in 'i'",
    "set": "send members to add in 'a' and tags to remove in 'r'",
}


def check_change(record: RecordState | None, change: Change, spec: CollectionSpec
                 ) -> Rejection | None:
    """Why `change` cannot be applied to `record`, as `(code, reason)`, or None.

    Checks, in the order of PROTOCOL.md §10.1: unknown fields, strategies and types,
    the scope, then value ranges and counter bounds (`rule_rejected`).
    """
    fields = spec.field_table
    late: Rejection | None = None
    for name, value in change.f.items():
        entry = fields.get(name)
        if entry is None:
            return _unknown(_at(change), name, spec)
        strategy, fs, limit = entry
        if strategy != "lww" and strategy != "manual":
            return _wrong(_at(change), name, strategy, "a value")
        if limit is not None:  # certainly fits? (see `CollectionSpec.field_table`)
            kind = type(value)
            if kind is str:
                if len(value) <= limit:
                    continue
            elif limit == ANY_JSON or (limit == ANY_INT and kind is int
                                         and -MAX_SAFE_INT <= value <= MAX_SAFE_INT):
                continue
        err = fs.type_error(value)
        if err is not None:
            if not _is_range_error(fs, value, err):
                return ("type_mismatch", f"{_at(change)}: field {name!r}: {err}")
            if late is None:  # out of range: reported after the type and scope checks
                late = ("rule_rejected", f"{_at(change)}: field {name!r}: {err}")
    for name, inc in change.i.items():
        entry = fields.get(name)
        if entry is None:
            return _unknown(_at(change), name, spec)
        strategy, fs, _ = entry
        if strategy != "counter":
            return _wrong(_at(change), name, strategy, "an increment")
        err = fs.increment_error(inc)
        if err is not None:
            return ("type_mismatch", f"{_at(change)}: field {name!r}: {err}")
    for name, members in change.a.items():
        entry = fields.get(name)
        if entry is None:
            return _unknown(_at(change), name, spec)
        strategy, fs, _ = entry
        if strategy != "set":
            return _wrong(_at(change), name, strategy, "set members to add")
        for member in members:
            err = fs.member_error(member)
            if err is not None:
                return ("type_mismatch", f"{_at(change)}: field {name!r}: {err}")
    for name, removes in change.r.items():
        entry = fields.get(name)
        if entry is None:
            return _unknown(_at(change), name, spec)
        strategy, fs, _ = entry
        if strategy != "set":
            return _wrong(_at(change), name, strategy, "set members to remove")
        for member in removes:
            err = fs.member_error(member)
            if err is not None:
                return ("type_mismatch", f"{_at(change)}: field {name!r}: {err}")
    scope_err = _scope_error(record, change, spec)
    if scope_err is not None:
        return scope_err
    if late is not None:
        return late
    if change.i:
        return _bounds_error(record, change, spec)
    return None


def _at(change: Change) -> str:
    """Where a rejection of `change` happened (its record), for the reason."""
    return f"{change.c}/{change.k}"


def _unknown(where: str, name: str, spec: CollectionSpec) -> Rejection:
    return ("unknown_field", f"{where}: collection {spec.name!r} has no field {name!r}")


def _wrong(where: str, name: str, strategy: str, sent: str) -> Rejection:
    return ("wrong_strategy", f"{where}: field {name!r} is a {strategy} field and cannot "
                              f"take {sent}: {_WRONG_STRATEGY_HINT[strategy]}")


def _is_range_error(fs: FieldSpec, value: Any, err: str) -> bool:
    if fs.type != "int" and fs.type != "float":
        return False
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return err == fs._range_error(value)


def _scope_error(record: RecordState | None, change: Change, spec: CollectionSpec
                 ) -> Rejection | None:
    s = change.s
    sf = spec.scope_field
    if record is not None:
        if s != record.s:
            # Never name the record's scope: the device may not be allowed to see it, and
            # the reason goes back to the device (and must not confirm where it lives).
            return ("scope_mismatch", f"{_at(change)}: the record exists in another scope "
                                      f"than {s!r}, and a change cannot move a record")
        if sf is not None and sf in change.f and change.f[sf] != record.s:
            return ("scope_mismatch", f"{_at(change)}: field {sf!r} holds the record's scope "
                                      f"and cannot change (it is {record.s!r}, the change "
                                      f"sets {_shown(change.f[sf])})")
        return None
    if spec.scope is not None:
        if s != spec.scope:
            return ("scope_mismatch", f"{_at(change)}: every {spec.name} record is in scope "
                                      f"{spec.scope!r}, not {s!r}")
        return None
    assert sf is not None
    # Any change may arrive before the put that created its record (a device's changes
    # drain by priority; brokers lose and reorder messages): one that does not name the
    # scope field creates the record in `s`, and the creating put, when it comes, must
    # set the field to that same `s` (checked above, as for any existing record).
    if sf in change.f and change.f[sf] != s:
        return ("scope_mismatch", f"{_at(change)}: the change is in scope {s!r} but sets "
                                  f"{sf!r} to {_shown(change.f[sf])}")
    return None


def _shown(value: Any) -> str:
    """A value in a reason: the reason goes to devices in any language, so JSON (null,
    true) rather than Python (None, True); strings quoted as the other names are."""
    return repr(value) if isinstance(value, str) else json.dumps(value)[:100]


def _bounds_error(record: RecordState | None, change: Change, spec: CollectionSpec
                  ) -> Rejection | None:
    fields = record.fields if record is not None else {}
    for name, inc in change.i.items():
        fs = spec.fields[name]
        lo, hi = fs.min, fs.max
        if lo is None and hi is None:
            continue
        st = fields.get(name)
        total = st.total if type(st) is Counter else 0
        after = total + inc
        # Only a change that moves the total out of range (or further out) is refused.
        if lo is not None and after < lo and inc < 0:
            return ("rule_rejected", f"{_at(change)}: {name} would go below {_num(lo)} "
                                     f"(is {_num(total)}, change {_num(inc)})")
        if hi is not None and after > hi and inc > 0:
            return ("rule_rejected", f"{_at(change)}: {name} would go above {_num(hi)} "
                                     f"(is {_num(total)}, change {_num(inc)})")
    return None


def _num(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
