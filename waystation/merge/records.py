"""Operator resolution and the wire record states of PROTOCOL.md §6."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from schemas.collection import CollectionSpec
from waystation.hlc import SERVER_NODE, Stamp
from waystation.merge.checks import _is_range_error, _unknown
from waystation.merge.state import (
    Counter,
    Outcome,
    RecordState,
    Register,
    SetField,
    Version,
    latest_stamp,
)
from waystation.merge.storage import _enc

# --- operator resolution ---------------------------------------------------------------


def resolve(record: RecordState, field: str, value: Any, q: int, stamp: Stamp, *,
            spec: CollectionSpec | None = None) -> Outcome:
    """The operator settles the open conflict of manual field `field` with `value`.

    `stamp` must be the server clock's stamp for this write, later than every stamp in
    the record (`clock.observe(latest_stamp(record))` gives one); `q` is the sequence the
    store allocated. The write is by `~server` (n = 0). With `spec`, the field and the
    value are validated like a device's write.
    """
    where = f"{record.c}/{record.k}"
    if spec is not None:
        fs = spec.fields.get(field)
        if fs is None:
            return Outcome(False, record, _unknown(where, field, spec))
        if fs.strategy != "manual":
            return Outcome(False, record, (
                "wrong_strategy", f"{where}: field {field!r} is a {fs.strategy} field; "
                                  "only manual fields have conflicts to resolve"))
        err = fs.type_error(value)
        if err is not None:
            code = "rule_rejected" if _is_range_error(fs, value, err) else "type_mismatch"
            return Outcome(False, record, (code, f"{where}: field {field!r}: {err}"))
    st = record.fields.get(field)
    if type(st) is not Register or not st.cf or record.deleted:
        return Outcome(False, record, (
            "invalid", f"{where}: field {field!r} has no open conflict to resolve"))
    newest = latest_stamp(record)
    if newest is not None and stamp <= newest:
        raise ValueError(f"resolution stamp {stamp.encode()} is not later than the record's "
                         f"newest stamp {newest.encode()}: observe it with the server clock "
                         "first")
    fields = dict(record.fields)
    fields[field] = Register(Version(value, stamp, SERVER_NODE, 0), q)
    rec = RecordState(record.c, record.k, record.s, q, fields, record.xh, record.xq,
                      record.xby, record.xn, stamp)
    return Outcome(True, rec, changed={field}, resolved=[field], stamp=stamp)


# --- record states (PROTOCOL.md §6) ----------------------------------------------------


def to_rec(record: RecordState, fields: Iterable[str] | None = None, part: bool = False
           ) -> dict[str, Any]:
    """The wire record state (§6) of `record`: all fields, or only `fields` (with `part`).

    With `part` true, a listed set field with no members is sent as `[]`; a listed field
    that no longer exists is left out (send the whole record when fields vanish, see
    `Outcome.whole`). Empty and default members are omitted.
    """
    out: dict[str, Any] = {"c": record.c, "k": record.k, "s": record.s, "q": record.q}
    if part:
        out["part"] = True
    if record.deleted:
        assert record.xh is not None
        out["x"] = True
        out["xh"] = _enc(record.xh)
        return out
    stored = record.fields
    f: dict[str, Any] = {}
    h: dict[str, str] = {}
    t: dict[str, dict[str, list[str]]] = {}
    cf: dict[str, list[dict[str, Any]]] = {}
    for name in (stored if fields is None else fields):
        st = stored.get(name)
        if st is None:
            continue
        if type(st) is Register:
            f[name] = st.value.v
            h[name] = _enc(st.value.h)
            if st.cf:
                cf[name] = [{"v": x.v, "by": x.by, "h": _enc(x.h)} for x in st.cf]
        elif type(st) is Counter:
            f[name] = st.total
        elif isinstance(st, SetField):
            if st.tags:
                members = sorted(st.tags)
                f[name] = members
                t[name] = {m: sorted(st.tags[m]) for m in members}
            elif part:
                f[name] = []
    if f:
        out["f"] = f
    if h:
        out["h"] = h
    if t:
        out["t"] = t
    if cf:
        out["cf"] = cf
    return out


def fx_rec(outcome: Outcome) -> dict[str, Any] | None:
    """The ack's `fx` state for an applied change (§7.4), or None when none is needed."""
    rec = outcome.record
    if not outcome.applied or rec is None:
        return None
    if outcome.whole or (outcome.fix_deleted and not rec.deleted):
        return to_rec(rec)
    if outcome.fixups or outcome.fix_deleted:
        return to_rec(rec, sorted(outcome.fixups), part=True)
    return None


def delta_rec(outcome: Outcome) -> dict[str, Any] | None:
    """The state to send other devices for an applied change (§7.6)."""
    rec = outcome.record
    if not outcome.applied or rec is None:
        return None
    if outcome.whole:
        return to_rec(rec)
    return to_rec(rec, sorted(outcome.changed), part=True)
