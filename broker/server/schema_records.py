"""The server's stored records carried to a newly published (or rolled-back-to) schema
version, inside the `schema publish` / `rollback` transaction (issue 10 §1).

The store keeps records in the names and types of the live version: the engine upcasts
older devices' changes to it before merging, and projects records down for devices on
older versions. So when the live version moves, the records of the collections its
migrations touch are rewritten once, in the same transaction that records the move:
renamed, converted, split or merged registers (each part keeps the writer's stamp);
going back (a rollback) undoes the same steps. Counters and sets are only renamed
(conversions, splits and merges apply to lww / manual fields alone). A value a
conversion cannot carry is dropped with its stamp, as the devices do. Records of a
dropped collection, and fields a version added, are kept: a rollback loses no data.

`rewrite_fields` is pure; `rewrite` is the thin loop over the store.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.server.store.base import Notice, WriteTxn
from schemas.errors import MigrationError
from schemas.evolution import Convert, DropCollection, Merge, Narrow, Remove, Rename, Split
from schemas.migrate import Step, convert_value, join_values, narrow_value, split_value
from waystation import merge
from waystation.merge.state import FieldState, Register, Version

PAGE = 500
"""Records read per page while rewriting."""


def _convert(fields: dict[str, FieldState], name: str, src: str, dst: str) -> None:
    st = fields.get(name)
    if not isinstance(st, Register):
        return
    try:
        value = Version(convert_value(st.value.v, src, dst), st.value.h, st.value.by,
                        st.value.n)
    except MigrationError:
        del fields[name]
        return
    cands = []
    for cand in st.cf:
        try:
            cands.append(Version(convert_value(cand.v, src, dst), cand.h, cand.by, cand.n))
        except MigrationError:
            continue
    fields[name] = Register(value, st.q, tuple(cands), st.cfq if cands else 0)


def _split(fields: dict[str, FieldState], src: str, dst: Sequence[str], sep: str) -> None:
    st = fields.pop(src, None)
    if not isinstance(st, Register):
        return
    for name, part in zip(dst, split_value(st.value.v, sep, len(dst)), strict=True):
        fields[name] = Register(Version(part, st.value.h, st.value.by, st.value.n), st.q)


def _join(fields: dict[str, FieldState], src: Sequence[str], dst: str, sep: str) -> None:
    parts = [fields.get(name) for name in src]
    registers = [p for p in parts if isinstance(p, Register)]
    if not registers:
        return
    newest = max(registers, key=lambda r: r.value.h)
    value = join_values([p.value.v if isinstance(p, Register) else None for p in parts], sep)
    for name in src:
        fields.pop(name, None)
    fields[dst] = Register(Version(value, newest.value.h, newest.value.by, newest.value.n),
                           max(r.q for r in registers))


def rewrite_fields(fields: dict[str, FieldState], collection: str, steps: Sequence[Step],
                   *, up: bool) -> dict[str, FieldState]:
    """A record's field states carried along `steps` (up), or back down them."""
    out = dict(fields)
    for step in (steps if up else list(reversed(steps))):
        m = step.m
        if m.collection != collection:
            continue
        if isinstance(m, DropCollection):
            break
        if isinstance(m, Rename):
            src, dst = (m.src, m.dst) if up else (m.dst, m.src)
            if src in out:
                out[dst] = out.pop(src)
        elif isinstance(m, Convert):
            old, new = step.old[m.field].type, step.new[m.field].type
            _convert(out, m.field, *((old, new) if up else (new, old)))
        elif isinstance(m, Narrow) and up:
            st = out.get(m.field)
            if isinstance(st, Register):
                try:
                    narrowed = narrow_value(st.value.v, step.new[m.field])
                except (MigrationError, TypeError, ValueError):
                    continue
                out[m.field] = Register(Version(narrowed, st.value.h, st.value.by,
                                                st.value.n), st.q, st.cf, st.cfq)
        elif isinstance(m, Remove) and up:
            out.pop(m.field, None)
        elif isinstance(m, Split):
            if up:
                _split(out, m.src, m.dst, m.sep)
            else:
                _join(out, m.dst, m.src, m.sep)
        elif isinstance(m, Merge):
            if up:
                _join(out, m.src, m.dst, m.sep)
            else:
                _split(out, m.dst, m.src, m.sep)
    return out


def rewrite(txn: WriteTxn, steps: Sequence[Step], *, up: bool) -> int:
    """Rewrite every stored record of the collections `steps` touch; returns how many
    changed."""
    changed = 0
    for c in sorted({s.m.collection for s in steps}):
        after: tuple[str, str] | None = None
        while True:
            page = txn.records_after(c, after, PAGE)
            if not page:
                break
            for _, k, doc in page:
                record = merge.from_json(doc)
                fields = rewrite_fields(record.fields, c, steps, up=up)
                if fields != record.fields:
                    record.fields = fields
                    txn.put_record(c, k, merge.to_json(record))
                    changed += 1
            after = (page[-1][0], page[-1][1])
    return changed


MAX_NOTICES = 100_000
"""Pending notices looked at per rewrite (the server drains them every tick)."""


def rewrite_notices(txn: WriteTxn, steps: Sequence[Step]) -> int:
    """Pending notices (record versions an operator tool wrote, not fanned out yet) of
    the collections `steps` touch, carried along with their records: a notice still
    naming the record's newest version is replaced by that version as just rewritten,
    an older one is dropped (a newer version reaches devices by its own delta or by
    catch-up). Without this the running server would fan out the old names under the
    new version. Returns how many were replaced or dropped."""
    touched = {s.m.collection for s in steps}
    done = 0
    for notice in txn.notices(MAX_NOTICES):
        c, k = notice.rec.get("c"), notice.rec.get("k")
        if c not in touched or not isinstance(k, str):
            continue
        txn.delete_notice(notice.id)
        done += 1
        raw = txn.get_record(c, k)
        if raw is None:
            continue
        record = merge.from_json(raw)
        if record.q == notice.q and record.s == notice.scope:
            txn.add_notice(Notice(0, notice.scope, notice.q, merge.to_rec(record)))
    return done


__all__ = ["MAX_NOTICES", "rewrite", "rewrite_fields", "rewrite_notices"]
