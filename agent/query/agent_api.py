"""The query methods of `agent.api.Agent` (a mixin, to keep the API module small).

    page = agent.query("tasks", where={"route": "route-42", "status": "out"},
                       order_by="eta", limit=20)
    page.records          # [Record, ...] with their sync state, like agent.get
    page.next             # cursor: agent.query(..., after=page.next) for the next page
    agent.count("tasks", where={"status": "out"})
    live = agent.live_query("tasks", where={"status": "out"}, order_by="eta")
    sub = agent.subscribe({"collection": "tasks", "where": {"status": "out"}}, on_update)

The first argument is a `Query`, a JSON-like dict, or a collection name; keyword
options (where, order_by, desc, limit, after, include_deleted) set or override fields of
it. See docs/QUERIES.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent.query.live import LiveQuery, Subscription
from agent.query.maintain import BUILD_BATCH, Progress, build_indexes, load_registry
from agent.query.model import LiveUpdate, Query, QueryPage, make_query
from agent.query.service import Queries

if TYPE_CHECKING:
    from agent.core import Core

QueryArg = Query | Mapping[str, Any] | str


class AgentQueries:
    """Query methods for `Agent` (which provides `_core`)."""

    _core: Core

    def _current_core(self) -> Core:
        """The store as it is now (the Agent re-opens one wiped under it)."""
        return self._core

    def query(self, query: QueryArg, **options: Any) -> QueryPage:
        """One page of records matching `query`, in its order, with a cursor for the
        next page. Refuses (IndexRequired) a filter or order no index serves."""
        return Queries(self._core).page(make_query(query, **options))

    def count(self, query: QueryArg, **options: Any) -> int:
        """How many records match `query` (limit and after are ignored)."""
        return Queries(self._core).count(make_query(query, **options))

    def live_query(self, query: QueryArg, **options: Any) -> LiveQuery:
        """A live query: its first page, then every change of it (`LiveQuery.poll`,
        `LiveQuery.updates`)."""
        return LiveQuery(self._current_core, make_query(query, **options))

    def subscribe(self, query: QueryArg, callback: Callable[[LiveUpdate], None], *,
                  poll_s: float = 0.05, **options: Any) -> Subscription:
        """Follow a live query on a thread: `callback(update)` for the first result and
        each change; `stop()` the returned subscription to end it."""
        return Subscription(self.live_query(query, **options), callback, poll_s=poll_s)

    def build_indexes(self, *, batch: int = BUILD_BATCH,
                      progress: Progress | None = None) -> None:
        """Finish building (and dropping) indexes; `Agent.open` does it unless opened
        with build_indexes=False. Safe to run from several processes at once."""
        build_indexes(self._core, batch=batch, progress=progress)

    def indexes(self) -> list[dict[str, Any]]:
        """The store's indexes: collection, fields, state (build / ready / drop)."""
        registry = self._core.read(lambda work: load_registry(work.tx))
        return [{"collection": ix.collection, "fields": list(ix.fields), "state": ix.state,
                 "indexed": ix.done if ix.state == "build" else None}
                for ix in registry.indexes]


__all__ = ["AgentQueries", "QueryArg"]
