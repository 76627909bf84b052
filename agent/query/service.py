"""Queries on an open agent: plan in the read transaction, run, turn views into records.

`Queries(core)` is what `Agent.query`, `Agent.count` and `Agent.live_query` use. Every
query runs in one LMDB read snapshot: the registry of indexes, the index entries and the
views it reads are of one instant, whatever other processes write meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent import validate
from agent.errors import BadRequest, WriteRefused
from agent.models import Record
from agent.query import executor
from agent.query.cursor import decode_cursor, encode_cursor
from agent.query.errors import IndexRequired
from agent.query.indexes import entries
from agent.query.maintain import indexes_allowed, load_registry
from agent.query.model import Query, QueryPage
from agent.query.planner import BUILT_AT_OPEN, Plan, plan
from agent.schema_store import META_SCHEMA
from agent.view import ViewState
from schemas.collection import CollectionSpec

if TYPE_CHECKING:
    from agent.core import Core, Work


def to_record(state: ViewState) -> Record:
    """The record an app sees for a view (as `Agent.get` returns it)."""
    return Record(collection=state.c, key=state.k, scope=state.s, fields=state.fields,
                  deleted=state.x, pending=state.p, version=state.q, conflicts=dict(state.cf),
                  sync=dict(state.sync_state()))


class Queries:
    def __init__(self, core: Core) -> None:
        self._core = core

    def spec(self, collection: str) -> CollectionSpec:
        try:
            return validate.collection(self._core.catalog, collection)
        except WriteRefused as exc:
            raise BadRequest(exc.code, str(exc)) from None

    def plan(self, work: Work, query: Query, *, for_count: bool = False) -> Plan:
        """The plan of `query` against the indexes the store holds now."""
        spec = self.spec(query.collection)
        try:
            return plan(query, spec, load_registry(work.tx).of(spec.name),
                        for_count=for_count)
        except IndexRequired as exc:
            if indexes_allowed(self._core):
                taken = work.tx.meta(META_SCHEMA)
                if not isinstance(taken, dict):
                    raise
                # The device runs a version it took from the server, not its schema
                # file: an index added to the file only would never be built.
                raise IndexRequired(
                    exc.collection, exc.fields,
                    f"{str(exc).removesuffix(BUILT_AT_OPEN)}, in a new version: this device "
                    f"runs schema version {taken.get('sv')} taken from the server, not its "
                    "schema file, and builds the index when it takes the version "
                    "(waystation schema publish; docs/QUERIES.md)") from None
            raise IndexRequired(
                exc.collection, exc.fields,
                f"this device's store is encrypted, and index keys would hold field values "
                f"in plain text, so it keeps no indexes: set storage.plaintext_indexes = "
                f"true in the agent config to allow them ({exc})") from None

    def page_in(self, work: Work, query: Query) -> QueryPage:
        """One page of `query`, inside an open transaction."""
        p = self.plan(work, query)
        after = None if query.after is None else decode_cursor(query.after, p.fingerprint)
        views, last = executor.page(work.tx, p, query.limit, after)
        cursor = None if last is None else encode_cursor(p.fingerprint, last)
        return QueryPage([to_record(v) for v in views], cursor, p.index_name)

    def page(self, query: Query) -> QueryPage:
        self.spec(query.collection)
        return self._core.read(lambda work: self.page_in(work, query))

    def count(self, query: Query) -> int:
        self.spec(query.collection)

        def run(work: Work) -> int:
            return executor.count(work.tx, self.plan(work, query, for_count=True))

        return self._core.read(run)


def view_matches(p: Plan, state: ViewState | None) -> bool:
    """Whether one record's view belongs to the plan's result (ignoring limit)."""
    if state is None:
        return False
    if p.index is None:
        return p.include_deleted or not state.x
    return any(p.matches(key, value) for key, value in entries(p.index, state).items())


__all__ = ["Queries", "to_record", "view_matches"]
