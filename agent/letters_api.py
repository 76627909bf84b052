"""Dead letters and conflicts for `Agent` (a mixin of `agent.api.Agent`).

    agent.dead_letters()                      changes the server refused for good
    agent.retry_dead_letter(n)                send one again as a new change
    agent.discard_dead_letter(n)              forget it (the change stays rolled back)
    agent.conflicts()                         open manual conflicts, then lost own writes
    agent.resolve_conflict(c, k, field, v)    settle a manual field's open conflict
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent import evicted, validate
from agent.changes import base_version, change_id, remove_tags
from agent.core import Core, Work, open_conflict_key
from agent.errors import NotFound, WriteRefused
from agent.idempotency import Once
from agent.models import Conflict, DeadLetter, WriteResult
from agent.store import n_key, record_key


class AgentLetters:
    """Provides the dead-letter and conflict methods to `Agent` (which provides the rest)."""

    _core: Core
    _commit: Callable[[Callable[[Work], Any], Once | None], Any]
    _read: Callable[[Callable[[Work], Any]], Any]
    _written: Callable[[WriteResult], WriteResult]
    _write: Callable[..., WriteResult]

    def retry_dead_letter(self, n: int, *, once: Once | None = None) -> WriteResult:
        """Send a dead-lettered change again as a new change (new n, new stamp).

        The change is checked against the current schema and scopes first; set removes
        name the tags known now. The dead letter is removed in the same transaction.
        """

        def run(work: Work) -> WriteResult:
            dl = work.tx.get("deadletters", n_key(n))
            if dl is None:
                raise NotFound(f"no dead letter with change number {n}")
            ch = dl["entry"]["ch"]
            spec = validate.collection(self._core.catalog, ch["c"])
            key = validate.record_key(spec, ch["k"])
            rk = record_key(spec.name, key)
            view = work.load_view(rk, spec.name, key)
            work.tx.delete("deadletters", n_key(n))
            if ch["op"] == "del":
                if view is None:
                    raise WriteRefused("invalid", f"no record {spec.name}/{key} to delete")
                return self._write(work, spec, rk, key, view, view.s, "del", dl["entry"]["p"])
            f = validate.put_fields(spec, ch["f"]) if ch.get("f") else None
            i = {name: validate.increment(spec, name, inc)
                 for name, inc in (ch.get("i") or {}).items()}
            a = {name: validate.members(spec, name, ms) for name, ms in (ch.get("a") or {}).items()}
            r: dict[str, dict[str, list[str]]] = {}
            for name, rm in (ch.get("r") or {}).items():
                validate.members(spec, name, list(rm))
                tags = remove_tags(view.t.get(name, {}), list(rm)) if view else {}
                if tags:
                    r[name] = tags
            scope = validate.scope_for_write(spec, key, self._core.scopes,
                                             evicted.held_scope(work.tx, rk, view), f or {})
            if not (f or i or a or r):
                return WriteResult(spec.name, key, scope, "unchanged")
            return self._write(work, spec, rk, key, view, scope, "put", dl["entry"]["p"],
                               f=f, i=i, a=a, r=r)

        return self._written(self._commit(run, once))

    def discard_dead_letter(self, n: int, *, once: Once | None = None) -> None:
        """Forget a dead letter for good (the change stays rolled back)."""

        def run(work: Work) -> None:
            if work.tx.get("deadletters", n_key(n)) is None:
                raise NotFound(f"no dead letter with change number {n}")
            work.tx.delete("deadletters", n_key(n))

        self._commit(run, once)

    def resolve_conflict(self, collection: str, key: str, field: str, value: Any, *,
                         priority: int = 0, once: Once | None = None) -> WriteResult:
        """Settle the open conflict of manual `field` with `value` (PROTOCOL.md §5
        manual): a put of the field whose base includes the open conflict, so the server
        takes it as a person's decision and closes the conflict for every device.

        Refused (`not_caught_up`) while this device has not yet seen the conflict's
        latest version: the write would become one more candidate instead."""
        spec = validate.collection(self._core.catalog, collection)
        key = validate.record_key(spec, key)
        fspec = spec.fields.get(field)
        if fspec is None or fspec.strategy != "manual":
            raise WriteRefused("wrong_strategy", f"{spec.name}.{field} is not a manual field: "
                                                 "only manual fields have conflicts to settle")
        values = validate.put_fields(spec, {field: value})
        prio = validate.priority(priority)

        def run(work: Work) -> WriteResult:
            rk = record_key(spec.name, key)
            doc = work.tx.get("conflicts", open_conflict_key(rk, field))
            view = work.load_view(rk, spec.name, key)
            if doc is None or view is None:
                raise NotFound(f"no open conflict on {spec.name}/{key}.{field} on this device")
            b = base_version(work.checkpoint(view.s).cp, view.wq)
            if b < int(doc["q"]):
                raise WriteRefused("not_caught_up",
                                   f"this device has not yet received every change up to the "
                                   f"conflict on {spec.name}/{key}.{field} (version "
                                   f"{doc['q']}, seen {b}): sync first, then settle it")
            return self._write(work, spec, rk, key, view, view.s, "put", prio, f=values)

        return self._written(self._commit(run, once))

    def dead_letters(self) -> list[DeadLetter]:
        """Changes the server refused for good, oldest first."""
        dev = self._core.dev

        def run(work: Work) -> list[DeadLetter]:
            return [DeadLetter(n=doc["n"], change_id=change_id(dev, doc["n"]), code=doc["code"],
                               reason=doc["reason"], rejected_ms=doc["t"],
                               created_ms=doc["entry"]["t"], change=doc["entry"]["ch"],
                               transaction=(change_id(dev, doc["entry"]["x"][0])
                                            if doc["entry"].get("x") else None))
                    for _, doc in work.tx.items("deadletters")]

        letters: list[DeadLetter] = self._read(run)
        return letters

    def conflicts(self) -> list[Conflict]:
        """Open manual conflicts on held records, then own writes that lost (oldest first)."""

        def run(work: Work) -> list[Conflict]:
            out: list[Conflict] = []
            for prefix in (b"O", b"L"):
                for _, doc in work.tx.items("conflicts", prefix):
                    out.append(Conflict(kind=doc["kind"], collection=doc["c"], key=doc["k"],
                                        scope=doc["s"], field=doc["field"], value=doc["value"],
                                        stamp=doc["h"], candidates=doc["candidates"],
                                        seen_ms=doc["t"], change_id=doc.get("id")))
            return out

        found: list[Conflict] = self._read(run)
        return found


__all__ = ["AgentLetters"]
