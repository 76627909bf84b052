"""`Agent.fetch_query` (a mixin of `agent.api.Agent`): bring records back from the server
by query (PROTOCOL.md §7.14.1).

    result = agent.fetch_query("tasks", {"status": "delivered",
                                         "eta": {"gte": 1764000000000}},
                               limit=100, wait_s=10)
    result.state      # "waiting" (no answer yet), "done" or "failed" (result.error)
    result.records    # the matching records the answer brought back, held now
    result.next       # not None: the server stopped early (result.stop: limit or
                      # budget); pass it as `after` to go on

The filter is the local query's `where` (docs/QUERIES.md): the same operators, the same
meaning, checked against this device's schema before anything is queued; unlike a local
query it needs no index (the server scans, bounded by its budget). The request is
queued durably (`agent.fetch_queries`) and sent by the sync daemon as soon as it is
connected to a server that speaks `fetch_query`, however long that takes; `wait_s` only
says how long this call waits. `fetch_query_status(id)` reads a request later.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from agent import fetch_queries, validate
from agent.core import Work
from agent.errors import BadRequest, NotFound, WriteRefused
from agent.models import Record
from agent.query.model import make_query
from schemas.wire import MAX_FETCHQ_LIMIT, MAX_SAFE_INT, FetchQuery
from waystation.filters import FilterError, compile_filter

_POLL_S = 0.05
MAX_WAIT_S = 300.0


@dataclass(frozen=True)
class FetchQueryResult:
    """Where one query asked of the server stands (see the module docstring)."""

    id: str
    collection: str
    state: str
    records: list[Record] = field(default_factory=list)
    next: str | None = None
    stop: str | None = None
    scanned: int = 0
    error: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "collection": self.collection, "state": self.state,
                "records": [r.to_dict() for r in self.records], "next": self.next,
                "stop": self.stop, "scanned": self.scanned, "error": self.error}


def _scalars(where: Mapping[str, Mapping[str, Any]]) -> Iterable[Any]:
    for ops in where.values():
        for value in ops.values():
            yield from (value if isinstance(value, list) else (value,))


class AgentFetchQuery:
    """Provides `fetch_query` and `fetch_query_status` to `Agent`."""

    _commit: Callable[[Callable[[Work], Any]], Any]
    _read: Callable[[Callable[[Work], Any]], Any]
    _poke: Callable[..., None]
    get: Callable[..., Record | None]
    catalog: Any

    def fetch_query(self, collection: str, where: Mapping[str, Any] | None = None, *,
                    limit: int = 100, after: str | None = None,
                    wait_s: float = 0.0) -> FetchQueryResult:
        """Ask the server for the records of `collection` matching `where` (at most
        `limit`, after key `after`), and wait up to `wait_s` seconds for the answer."""
        try:
            spec = validate.collection(self.catalog, collection)
        except WriteRefused as exc:
            raise BadRequest(exc.code, str(exc)) from None
        if isinstance(limit, bool) or not isinstance(limit, int) or not (
                1 <= limit <= MAX_FETCHQ_LIMIT):
            raise BadRequest("invalid", f"limit must be 1 to {MAX_FETCHQ_LIMIT}, got {limit!r}")
        if not (0 <= wait_s <= MAX_WAIT_S):
            raise BadRequest("invalid", f"wait_s must be between 0 and {MAX_WAIT_S:g} seconds")
        query = make_query(spec.name, where=dict(where or {}))
        try:
            compile_filter(spec, query.where)
        except FilterError as exc:
            raise BadRequest(exc.code, str(exc)) from None
        ops = {name: flt.ops() for name, flt in query.where.items()}
        if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_SAFE_INT
               for v in _scalars(ops)):
            raise BadRequest("bad_query", "a filter sent to the server holds integers in "
                                          "the 53-bit range only (PROTOCOL.md §3)")
        try:  # exactly what the daemon will send: refuse here what the wire would
            FetchQuery.model_validate({"dev": "check", "req": "check", "c": spec.name,
                                       "w": ops, "lim": limit, "after": after})
        except ValidationError as exc:
            err = exc.errors()[0]
            where_ = ".".join(str(p) for p in err["loc"])
            raise BadRequest("invalid", f"{where_}: {err['msg']}") from None
        name = spec.name

        def ask(work: Work) -> str:
            return fetch_queries.enqueue(work, name, ops, limit, after)

        rid: str = self._commit(ask)
        self._poke()
        return self._await(rid, wait_s)

    def fetch_query_status(self, request_id: str, *, wait_s: float = 0.0) -> FetchQueryResult:
        """Where request `request_id` stands (NotFound when unknown: never asked, or
        dropped to make room for newer requests)."""
        if not (0 <= wait_s <= MAX_WAIT_S):
            raise BadRequest("invalid", f"wait_s must be between 0 and {MAX_WAIT_S:g} seconds")
        return self._await(request_id, wait_s)

    def _await(self, rid: str, wait_s: float) -> FetchQueryResult:
        deadline = time.monotonic() + wait_s
        while True:
            req: fetch_queries.QueryRequest | None = self._read(
                lambda work: fetch_queries.get(work, rid))
            if req is None:
                raise NotFound(f"no fetch query {rid!r} on this device (the newest "
                               f"{fetch_queries.MAX_REQUESTS} are kept)")
            if req.state != fetch_queries.WAITING or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        records = [rec for rec in (self.get(req.collection, k) for k in req.keys)
                   if rec is not None]
        return FetchQueryResult(req.id, req.collection, req.state, records, req.next,
                                req.stop, req.scanned, req.error)


__all__ = ["AgentFetchQuery", "FetchQueryResult"]
