"""`waystation agent salvage`: the pending writes of an old (moved-aside, damaged) store,
queued again in the device's current store.

A damaged store is moved aside and the agent starts on a fresh one (deploy/README.md, "A
damaged device store"); the writes the old store still held in its outbox (saved on the
device, never acknowledged) would be lost for the user. Salvage reads what it can of the
old store (`agent.salvage_read`: read-only, in child processes, past damaged pages),
and queues each readable pending change again as a new local write of the current store:
through the normal write path (view, indexes, feed event, outbox), with a new change id
of the current store's incarnation, in the old order, a transaction's changes again as
one transaction, with their priority and creation time.

What the server does with it (docs/PROTOCOL.md §5): each salvaged change KEEPS its
original stamp (the time part `h`) and base version `b`; only its id is new. So it is
merged as the late write it is, never as a write made now:

- lww: it wins only over values stamped before it; a value another device (or this one,
  on its fresh store) wrote later stays, and the salvaged value goes to the conflict log
  as the loser. If the original change had reached the server before the damage, the
  stored value carries the same stamp: the same event, nothing changes.
- manual: its old base did not see later values, so it opens a conflict (a person
  decides) instead of replacing them.
- delete: its old stamp deletes only what was written before it.
- counter increments and set adds are identified by change ids: if the ORIGINAL change
  had reached the server (its ack lost with the store), the salvaged one adds again.
  Salvage skips a change the current store shows as applied (a field, a tombstone or a
  set tag carrying the old change's stamp or id: "already synced"); for the rest it
  cannot tell, and lists them as "uncertain" (`--skip-uncertain` leaves them out).

Idempotence: every salvaged change is recorded in the current store's meta, in the same
transaction that queues it (``salvaged:<h>:<n>`` -> {"as": new change id, "t"}): the
stamp's time part and the old change number name the change for good, even when the old
store's meta page (its incarnation) is unreadable. Running salvage again skips them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent import evicted, validate
from agent.api import Agent
from agent.changes import change_id
from agent.core import Work
from agent.errors import BadRequest
from agent.models import WriteResult
from agent.salvage_source import Item, Report
from agent.store import n_key, record_key
from agent.transaction import mark

LEDGER = "salvaged:"


# ------------------------------------------------------------- the current store


class _DryRun(Exception):  # a control-flow signal: abort the write transaction
    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


def _ledger_key(ch: Mapping[str, Any]) -> str:
    return f"{LEDGER}{ch['h']}:{ch['n']}"


def _synced(work: Work, dev: str, ch: Mapping[str, Any]) -> bool:
    """The current store's base (what the server sent it) carries this change: a field
    or tombstone with its stamp, or a set member with its add-tag."""
    rk = record_key(ch["c"], ch["k"])
    stamp = f"{ch['h']}:{dev}"
    stamps = work.tx.get("stamps", rk) or {}
    if any(stamps.get(name) == stamp for name in ch.get("f") or {}):
        return True
    base = work.load_base(rk, ch["c"], ch["k"])
    if base is None:
        return False
    if ch["op"] == "del" and base.xh == stamp:
        return True
    tag = change_id(dev, ch["n"])
    return any(tag in base.t.get(name, {}).get(m, []) for name, ms in (ch.get("a") or {}).items()
               for m in ms)


def _groups(items: list[Item]) -> list[list[Item]]:
    """The changes in their old order, a transaction's changes together."""
    out: list[list[Item]] = []
    by_txn: dict[tuple[int, int], list[Item]] = {}
    for item in items:
        x = item.entry.get("x")
        if isinstance(x, list) and len(x) == 2:
            group = by_txn.get((x[0], x[1]))
            if group is not None:
                group.append(item)
                continue
            by_txn[(x[0], x[1])] = group = [item]
            out.append(group)
        else:
            out.append([item])
    return out


def salvage(agent: Agent, report: Report, *, skip_uncertain: bool = False) -> Report:
    """Queue the report's readable changes in `agent`'s store (or, dry run, try each
    group in a write transaction that is then aborted)."""
    dev = agent.device_id
    report.skipped_uncertain = skip_uncertain
    moved: dict[str, str] = {}  # an old change id -> the id it was queued as (set tags)

    def classify(work: Work) -> None:
        for item in report.items:
            done = work.tx.meta(_ledger_key(item.ch))
            if done is not None:
                item.state, item.queued_as = "already_salvaged", done.get("as")
                moved[change_id(dev, item.n)] = str(done.get("as"))
            elif _synced(work, dev, item.ch):
                item.state = "already_synced"
            item.uncertain = bool(item.ch.get("i") or item.ch.get("a"))

    agent._read(classify)
    for group in _groups([i for i in report.items if i.state == "recovered"]):
        if skip_uncertain and any(i.uncertain for i in group):
            for item in group:
                item.state, item.reason = "refused", "uncertain: left out (--skip-uncertain)"
            continue
        _one_group(agent, group, moved, report.dry_run)
    if not report.dry_run and report.of("recovered"):
        agent._poke()
    return report


def _one_group(agent: Agent, group: list[Item], moved: dict[str, str], dry_run: bool) -> None:
    dev = agent.device_id

    def run(work: Work) -> list[WriteResult] | list[Any]:
        # Checked again inside the write transaction: a salvage run at the same time
        # (LMDB serialises write transactions) may have queued the group since.
        done = [work.tx.meta(_ledger_key(item.ch)) for item in group]
        if any(d is not None for d in done):
            return done
        results = [_requeue(agent, work, item, moved) for item in group]
        mark(work, results)
        for item, result in zip(group, results, strict=True):
            work.tx.set_meta(_ledger_key(item.ch),
                             {"as": result.change_id, "t": work.now()})
        if dry_run:
            raise _DryRun(results)
        return results

    try:
        results = agent._commit(run)
    except _DryRun as peek:
        results = peek.value
    except BadRequest as exc:  # WriteRefused: the current schema or scopes refuse it
        for item in group:
            item.state, item.reason = "refused", str(exc)
        return
    if results and not isinstance(results[0], WriteResult):
        for item, doc in zip(group, results, strict=True):
            item.state = "already_salvaged"
            item.queued_as = doc.get("as") if isinstance(doc, dict) else None
        return
    for item, result in zip(group, results, strict=True):
        item.queued_as = None if dry_run else result.change_id
        moved[change_id(dev, item.n)] = result.change_id or ""


def _requeue(agent: Agent, work: Work, item: Item, moved: Mapping[str, str]) -> WriteResult:
    """One old change through the normal write path, keeping its stamp and base."""
    ch, catalog = item.ch, agent.catalog
    spec = validate.collection(catalog, ch["c"])
    key = validate.record_key(spec, ch["k"])
    rk = record_key(spec.name, key)
    view = work.load_view(rk, spec.name, key)
    f = validate.put_fields(spec, ch["f"]) if ch.get("f") else None
    scope = validate.scope_for_write(spec, key, agent._core.scopes,
                                     evicted.held_scope(work.tx, rk, view) or ch["s"], f or {})
    i = {name: validate.increment(spec, name, inc) for name, inc in (ch.get("i") or {}).items()}
    a = {name: validate.members(spec, name, ms) for name, ms in (ch.get("a") or {}).items()}
    r: dict[str, dict[str, list[str]]] = {}
    for name, rm in (ch.get("r") or {}).items():
        validate.members(spec, name, list(rm))
        r[name] = {m: sorted({moved.get(t) or t for t in tags}) for m, tags in rm.items()}
    result: WriteResult = agent._write(work, spec, rk, key, view, scope, ch["op"],
                                       int(item.entry.get("p", 0)), f=f, i=i, a=a, r=r,
                                       keep=(ch["h"], ch["b"]))
    _keep_created(work, result, item.entry.get("t"))
    return result


def _keep_created(work: Work, result: WriteResult, created: Any) -> None:
    """The outbox entry keeps the time the app wrote the change (its pending age)."""
    if result.n is None or not isinstance(created, int):
        return
    entry = work.outbox_entry(result.n)
    if entry is not None:
        entry["t"] = created
        work.tx.put("outbox", n_key(result.n), entry)


__all__ = ["LEDGER", "salvage"]
