"""The stored JSON form of a record state (`to_json` / `from_json`)."""

from __future__ import annotations

from typing import Any

from waystation.hlc import Stamp
from waystation.merge.state import (
    FORMAT_VERSION,
    Counter,
    FieldState,
    RecordState,
    Register,
    SetField,
    Version,
)

# --- storage format --------------------------------------------------------------------


def to_json(record: RecordState) -> dict[str, Any]:
    """A compact orjson-friendly form of `record` for storage; `from_json` inverts it.

    `{"fv": 1, "c", "k", "s", "q", "f": {field: state}, "x": [xh, xq, xby, xn], "wh"}`
    with field states `["r", q, version, cfq, [versions]]` (register; the last two only
    with an open conflict), `["c", q, total]` (counter), `["s", q, {member: {tag: stamp}},
    {member: [removed tags]}]` (set; a tag's stamp is just its time part when its node is
    the tag's device), and versions `[v, stamp, n]` (or `[v, stamp, n, by]`
    when the writer is not the stamp's node). Stamps are in their full string form.
    """
    f: dict[str, Any] = {}
    encoded = _ENCODED
    for name, st in record.fields.items():
        if type(st) is Register:
            v = st.value  # _vj(st.value), inlined: most fields are registers
            h = v.h
            text = encoded.get(h) or _enc(h)
            vj = [v.v, text, v.n] if v.by == h.node else [v.v, text, v.n, v.by]
            if st.cf:
                f[name] = ["r", st.q, vj, st.cfq, [_vj(x) for x in st.cf]]
            else:
                f[name] = ["r", st.q, vj]
        elif type(st) is Counter:
            f[name] = ["c", st.q, st.total]
        elif isinstance(st, SetField):
            f[name] = ["s", st.q,
                       {m: {t: _tag_stamp_json(t, s) for t, s in tg.items()}
                        for m, tg in st.tags.items()},
                       {m: sorted(ts) for m, ts in st.removed.items()}]
    out: dict[str, Any] = {"fv": FORMAT_VERSION, "c": record.c, "k": record.k, "s": record.s,
                           "q": record.q, "f": f}
    if record.xh is not None:
        out["x"] = [_enc(record.xh), record.xq, record.xby, record.xn]
    if record.wh is not None:
        out["wh"] = _enc(record.wh)
    return out


def from_json(data: dict[str, Any]) -> RecordState:
    """Inverse of `to_json`; ValueError on an unknown format version or a broken state."""
    fv = data.get("fv") if isinstance(data, dict) else None
    if fv != FORMAT_VERSION:
        raise ValueError(f"stored record has format version {fv!r}; this server reads "
                         f"version {FORMAT_VERSION}")
    try:
        fields: dict[str, FieldState] = {}
        parsed = _PARSED
        for name, st in data["f"].items():
            tag = st[0]
            if tag == "r":
                v = st[2]  # _jv(st[2]), inlined: most fields are registers
                h = parsed.get(v[1]) or _stamp(v[1])
                value = Version(v[0], h, v[3] if len(v) > 3 else h.node, v[2])
                if len(st) > 3:
                    fields[name] = Register(value, st[1], tuple(_jv(x) for x in st[4]), st[3])
                else:
                    fields[name] = Register(value, st[1])
            elif tag == "c":
                fields[name] = Counter(st[2], st[1])
            elif tag == "s":
                fields[name] = SetField(
                    {m: {t: _tag_stamp(t, s) for t, s in tg.items()} for m, tg in st[2].items()},
                    {m: set(ts) for m, ts in st[3].items()}, st[1])
            else:
                raise ValueError(f"unknown field state {tag!r}")
        rec = RecordState(data["c"], data["k"], data["s"], data["q"], fields)
        x = data.get("x")
        if x is not None:
            rec.xh, rec.xq, rec.xby, rec.xn = _stamp(x[0]), x[1], x[2], x[3]
        wh = data.get("wh")
        if wh is not None:
            rec.wh = _stamp(wh)
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"stored record is damaged: {type(exc).__name__}: {exc}") from None
    return rec


def live_values(data: dict[str, Any]) -> dict[str, Any] | None:
    """`from_json(data).values()` of a stored state that was never deleted, read without
    building the record (a scan that filters many records parses only the matches);
    None when the state holds a delete (then `from_json` decides whether it is visible)."""
    if "x" in data or data.get("fv") != FORMAT_VERSION:
        return None
    out: dict[str, Any] = {}
    try:
        for name, st in data["f"].items():
            tag = st[0]
            if tag == "r":
                out[name] = st[2][0]
            elif tag == "c":
                out[name] = st[2]
            elif tag == "s":
                if st[2]:
                    out[name] = sorted(st[2])
            else:
                return None
    except (KeyError, IndexError, TypeError, AttributeError):
        return None  # from_json says what is damaged
    return out


# Stamps in both directions, remembered: the fields of a record written by one change
# share its stamp, and a record read, merged and written back re-encodes the stamps it
# was read with. Bounded (cleared when full); entries are immutable, so sharing is safe.
_STAMP_CACHE_MAX = 8192
_PARSED: dict[str, Stamp] = {}
_ENCODED: dict[Stamp, str] = {}


def _stamp(text: str) -> Stamp:
    # Stored stamps were written by to_json: skip the regex validation of Stamp.parse.
    stamp = _PARSED.get(text)
    if stamp is None:
        stamp = Stamp(int(text[:12], 16), int(text[12:16], 16), text[17:])
        if len(_PARSED) >= _STAMP_CACHE_MAX:
            _PARSED.clear()
        _PARSED[text] = stamp
        if len(_ENCODED) >= _STAMP_CACHE_MAX:
            _ENCODED.clear()
        _ENCODED[stamp] = text
    return stamp


def _enc(stamp: Stamp) -> str:
    """`stamp.encode()`, remembered (see `_stamp`)."""
    text = _ENCODED.get(stamp)
    if text is None:
        text = stamp.encode()
        if len(_ENCODED) >= _STAMP_CACHE_MAX:
            _ENCODED.clear()
        _ENCODED[stamp] = text
    return text


def _tag_stamp_json(tag: str, stamp: Stamp) -> str:
    # An add-tag's stamp is nearly always its writer's: store only the time part then.
    if stamp.node == tag.rpartition(":")[0]:
        return stamp.time_part()
    return stamp.encode()


def _tag_stamp(tag: str, text: str) -> Stamp:
    if len(text) == 16:
        return Stamp(int(text[:12], 16), int(text[12:], 16), tag.rpartition(":")[0])
    return _stamp(text)


def _vj(v: Version) -> list[Any]:
    h = v.h
    if v.by == h.node:
        return [v.v, _enc(h), v.n]
    return [v.v, _enc(h), v.n, v.by]


def _jv(data: list[Any]) -> Version:
    h = _stamp(data[1])
    return Version(data[0], h, data[3] if len(data) > 3 else h.node, data[2])
