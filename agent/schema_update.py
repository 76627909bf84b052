"""Taking a schema version the server sends (capability `schema_push`, PROTOCOL.md §7.13).

`take(core, msg)` checks the version first, without writing: the text must parse as a
schema file whose version is the message's `sv`; a newer version must be a valid step
from the one the device runs (`schemas.evolution.check_step`: every breaking
difference covered by a declared migration); an older one (the server rolled a version
back) must be reachable down through versions this device took and holds the text of.
A refused version changes nothing: the device keeps running what it has, notes the
problem (`agent status`: last problem `schema_refused`) and logs it.

A version it takes is applied in ONE store transaction: every base record of the
collections the migrations touch is rewritten in the new names and types
(`schemas.migrate_local`), pending changes written under the version it ran are
carried along and relabelled, the views are recomputed, and the new version's text
becomes the device's schema (meta `schema`). A crash before the commit leaves the old
version and its data intact; other processes on the store switch at their next
transaction (`Core`). Until the commit the agent keeps working on the old version.

Meta entries (see `agent.core`):

==========  =========================================================================
schema      {"sv", "text", "max"}: the schema version the device runs, taken from the
            server, and the highest it ever ran ("max": a schema file newer than it
            wins at open, one installed by hand)
schemas     {"<version>": text}: the versions this device took (newest 16), to go
            back down when the server rolls one back
==========  =========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.base import BaseRecord
from agent.core import Core, Work
from agent.schema_store import META_SCHEMA, META_SCHEMAS
from agent.store import Tx, split_record_key
from schemas import wire
from schemas.collection import Catalog
from schemas.errors import CollectionSchemaError, MigrationError
from schemas.evolution import Migration, check_step
from schemas.migrate import Step, build_steps, upcast_groups
from schemas.migrate_local import downcast_groups, downcast_record, parse_version, upcast_record

log = structlog.get_logger("waystation.agent")

KEEP_VERSIONS = 16
REFUSED = "schema_refused"


@dataclass(frozen=True, slots=True)
class Taken:
    """What `take` did: `changed` (the device now runs `sv`), or `problem` (refused)."""

    sv: int
    previous: int
    changed: bool
    records: int = 0
    pending: int = 0
    problem: str | None = None


def _refuse(core: Core, msg: wire.SchemaPush, problem: str) -> Taken:
    mine = core.catalog.version

    def note(work: Work) -> None:
        work.tx.set_meta("last_err", {"code": REFUSED, "t": work.now(), "reason": problem})

    core.write(note)
    log.warning("schema_refused", sv=msg.sv, running=mine, problem=problem)
    return Taken(msg.sv, mine, False, problem=problem)


def _held(tx: Tx) -> dict[int, str]:
    doc = tx.meta(META_SCHEMAS, {})
    return {int(v): t for v, t in doc.items() if isinstance(t, str)} if isinstance(doc, dict) \
        else {}


def plan(core: Core, msg: wire.SchemaPush
         ) -> tuple[Catalog, list[Step], bool] | str:
    """(the new catalog, the steps from the lower version up, going up?) or a problem."""
    source = f"schema version {msg.sv} sent by the server"
    mine = core.catalog
    try:
        new, migrations = parse_version(msg.text, source, wire.MAX_SCHEMA_PUSH_TEXT)
    except CollectionSchemaError as exc:
        return str(exc)
    if new.version != msg.sv:
        return f"{source}: the text declares version {new.version}, not {msg.sv}"
    if new.version > mine.version:
        try:
            check_step(mine, new, migrations)
        except CollectionSchemaError as exc:
            return (f"{source} cannot follow version {mine.version} that this device runs: "
                    f"{exc}; install version {msg.sv}'s schema file on the device by hand")
        return new, build_steps(mine, [(new, migrations)]), True
    # Going back: through every version above the target that this device took.
    held = core.read(lambda work: _held(work.tx))
    chain: list[tuple[Catalog, tuple[Migration, ...]]] = []
    for version in sorted(v for v in held if new.version < v <= mine.version):
        try:
            chain.append(parse_version(held[version], f"held version {version}",
                                       wire.MAX_SCHEMA_PUSH_TEXT))
        except CollectionSchemaError as exc:
            return str(exc)
    if not chain or chain[-1][0].version != mine.version:
        return (f"the server went back to schema version {msg.sv}, but this device runs "
                f"version {mine.version} from its schema file and holds no migrations "
                f"to go back; install version {msg.sv}'s schema file and restart the agent")
    try:
        check_step(new, chain[0][0], chain[0][1])
    except CollectionSchemaError as exc:
        return (f"{source}: the versions this device holds do not lead back to it ({exc}); "
                f"install version {msg.sv}'s schema file and restart the agent")
    return new, build_steps(new, chain), False


def take(core: Core, msg: wire.SchemaPush) -> Taken:
    """Check and apply the version in `msg` (see module)."""
    mine = core.catalog.version
    if msg.sv == mine:
        return Taken(mine, mine, False)
    planned = plan(core, msg)
    if isinstance(planned, str):
        return _refuse(core, msg, planned)
    new, steps, up = planned
    old_catalog = core.catalog

    def run(work: Work) -> Taken:
        tx = work.tx
        if tx.meta("sv") != old_catalog.version:
            return Taken(msg.sv, old_catalog.version, False)  # another process moved on
        core.catalog = new
        records = _rewrite_records(work, steps, up, new)
        pending = _rewrite_pending(work, steps, up, old_catalog.version, new)
        for rk in sorted({*records, *pending}):
            c, k = split_record_key(rk)
            work.refresh_view(rk, c, k, work.load_base(rk, c, k))
        held = _held(tx)
        held[new.version] = msg.text
        kept = sorted(held)[-KEEP_VERSIONS:]
        tx.set_meta(META_SCHEMAS, {str(v): held[v] for v in kept})
        prior = tx.meta(META_SCHEMA)
        top = max(new.version, old_catalog.version,
                  prior.get("max", 0) if isinstance(prior, dict) else 0)
        tx.set_meta(META_SCHEMA, {"sv": new.version, "text": msg.text, "max": top})
        tx.set_meta("sv", new.version)
        # Apps reload their field names on this (docs/agent-api.md, the change feed).
        work.feed("", "", "schema", {"from": old_catalog.version, "to": new.version})
        err = tx.meta("last_err")
        if isinstance(err, dict) and err.get("code") in (REFUSED, "schema_version"):
            tx.delete("meta", b"last_err")
        return Taken(new.version, old_catalog.version, True, len(records), len(pending))

    try:
        done = core.write(run)
    except BaseException:
        core.catalog = old_catalog
        raise
    if not done.changed:
        core.catalog = old_catalog
    else:
        log.info("schema_taken", sv=done.sv, previous=done.previous, records=done.records,
                 pending=done.pending)
    return done


def _touched(steps: list[Step]) -> list[str]:
    return sorted({s.m.collection for s in steps})


def _rewrite_records(work: Work, steps: list[Step], up: bool, new: Catalog) -> set[bytes]:
    """Every base record of a collection the steps touch, in `new`'s shape."""
    out: set[bytes] = set()
    tx = work.tx
    for c in _touched(steps):
        prefix = c.encode() + b"\0"
        for rk in list(tx.keys("base", prefix)):
            _, k = split_record_key(rk)
            base = work.load_base(rk, c, k)
            if base is None:
                continue
            maps = {"f": base.f, "fq": base.fq, "h": base.h, "t": base.t, "cf": base.cf}
            spec = new.collection(c)
            if up:
                moved = upcast_record(maps, c, steps)
            elif spec is not None:
                moved = downcast_record(maps, c, steps, spec.fields)
            else:
                moved = None
            if moved is None or (up and spec is None):
                work.save_base(rk, base, None)
            else:
                after = base.copy()
                after.f, after.fq, after.h = moved["f"], moved["fq"], moved["h"]
                after.t, after.cf = moved["t"], moved["cf"]
                work.save_base(rk, base, after)
            out.add(rk)
        out.update(tx.keys("view", prefix))
    return out


def _rewrite_pending(work: Work, steps: list[Step], up: bool, old: int,
                     new: Catalog) -> set[bytes]:
    """Pending changes written under the version the device ran, carried to `new` and
    relabelled; one that cannot be carried keeps its version (the server upcasts or
    judges it as written). Returns the records they touch."""
    out: set[bytes] = set()
    touched = set(_touched(steps))
    tx = work.tx
    for key, entry in list(tx.items("outbox")):
        if entry.get("sv") != old:
            continue
        ch: dict[str, Any] = entry["ch"]
        c = ch.get("c")
        if c in touched and ch.get("op") == "put":
            groups = {g: ch.get(g, {}) for g in ("f", "i", "a", "r")}
            spec = new.collection(c)
            try:
                moved = (upcast_groups(groups, c, steps, _lookup(work, c, ch["k"])) if up
                         else downcast_groups(groups, c, steps, spec.fields)
                         if spec is not None else None)
            except MigrationError:
                continue
            if moved is None:
                continue
            ch = {**{k: v for k, v in ch.items() if k not in groups},
                  **{g: v for g, v in moved.items() if v}}
            out.add(c.encode() + b"\0" + ch["k"].encode())
        tx.put("outbox", key, {**entry, "ch": ch, "sv": new.version})
    return out


def _lookup(work: Work, c: str, k: str) -> Callable[[str], Any]:
    def get(name: str) -> Any:
        base: BaseRecord | None = work.load_base(c.encode() + b"\0" + k.encode(), c, k)
        return None if base is None else base.f.get(name)

    return get


__all__ = ["REFUSED", "Taken", "plan", "take"]
