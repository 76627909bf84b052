"""Fetch over the local API: bring records back from the server (`Agent.fetch`,
`Agent.fetch_query`).

    POST /v1/collections/{c}/fetch   {"keys": [...], "wait_s": 5}
                                     -> {collection, records, waiting, missing}
    POST /v1/collections/{c}/fetch-query
                                     {"where": {...}, "limit": 100, "after": null,
                                      "wait_s": 5}
                                     -> {id, collection, state, records, next, stop,
                                         scanned, error}
    GET  /v1/fetch-queries/{id}?wait_s=5   -> the same, for a query asked before

A fetch by query (PROTOCOL.md §7.14.1) takes the local query's `where` (docs/QUERIES.md)
and needs no index; the server answers at most `limit` records and may stop early at
its scan budget (`stop`, with `next` to pass as `after`). The request is kept on the
device until the server answers; `state` is `waiting` until then.

Records evicted by retention (or never held) are asked for by key; the request is kept
on the device until the server answers (PROTOCOL.md §7.14). `wait_s` says how long the
call waits for the answer (at most 30 s, and not at all while no sync loop runs); keys
not answered by then are `waiting`.
Reading the collection is the right needed: a fetch only restores the server's data.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from agent.http import inputs
from agent.http.errors import ApiError, json_response
from agent.http.models import RecordOut
from schemas.wire import MAX_FETCH_KEYS, MAX_FETCHQ_LIMIT, MAX_KEY_BYTES

MAX_WAIT_S = 30.0


class FetchBody(BaseModel):
    """The keys to bring back (at most 100) and how long to wait for the answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: Annotated[list[Annotated[str, Field(strict=True, min_length=1, max_length=200)]],
                    Field(min_length=1, max_length=MAX_FETCH_KEYS)]
    wait_s: Annotated[float, Field(ge=0, le=MAX_WAIT_S)] = 0.0


class FetchOut(BaseModel):
    """What the fetch found: the records held now, the keys still waiting for the
    server (offline: they stay queued and come later), and the keys the server does
    not hold for this device."""

    model_config = ConfigDict(extra="forbid")

    collection: str
    records: list[RecordOut]
    waiting: list[str]
    missing: list[str]


async def fetch_records(request: web.Request, ctx: Any) -> web.StreamResponse:
    c = inputs.path(request, "collection")
    inputs.need_read(request, c)
    body = await inputs.body(request, FetchBody)
    # Without a sync loop nothing can answer: say at once what waits.
    wait_s = body.wait_s if ctx.sync_running() else 0.0
    result = await ctx.blocking(partial(ctx.agent.fetch, c, body.keys, wait_s=wait_s))
    return json_response(result.to_dict())


class FetchQueryBody(BaseModel):
    """A filter of the collection named in the URL (the local query's `where`), how
    many records at most, where to go on, and how long to wait for the answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    where: dict[str, Any] = Field(default_factory=dict)
    """field (or `$scope`) -> a value (equality) or {eq, in, gt, gte, lt, lte, prefix}."""
    limit: Annotated[int, Field(strict=True, ge=1, le=MAX_FETCHQ_LIMIT)] = 100
    after: Annotated[str, Field(min_length=1, max_length=MAX_KEY_BYTES)] | None = None
    """The `next` of a previous answer: go on after this key."""
    wait_s: Annotated[float, Field(ge=0, le=MAX_WAIT_S)] = 0.0


class FetchQueryOut(BaseModel):
    """Where a query asked of the server stands: `waiting` (no answer yet; offline, it
    stays queued), `done` (the matching records it brought back, held now; `next` and
    `stop` when the server stopped early) or `failed` (`error`: the server could not
    evaluate the filter)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    collection: str
    state: Literal["waiting", "done", "failed"]
    records: list[RecordOut]
    next: str | None
    stop: Literal["limit", "budget"] | None
    scanned: int
    error: dict[str, str] | None


async def fetch_query(request: web.Request, ctx: Any) -> web.StreamResponse:
    c = inputs.path(request, "collection")
    inputs.need_read(request, c)
    body = await inputs.body(request, FetchQueryBody)
    wait_s = body.wait_s if ctx.sync_running() else 0.0
    result = await ctx.blocking(partial(ctx.agent.fetch_query, c, body.where,
                                        limit=body.limit, after=body.after, wait_s=wait_s))
    return json_response(result.to_dict())


async def get_fetch_query(request: web.Request, ctx: Any) -> web.StreamResponse:
    rid = inputs.path(request, "id")
    raw = request.query.get("wait_s", "0")
    try:
        wait_s = float(raw)
    except ValueError:
        raise ApiError(422, "invalid", f"wait_s must be a number of seconds, got {raw[:50]!r}"
                       ) from None
    if not (0 <= wait_s <= MAX_WAIT_S):
        raise ApiError(422, "invalid", f"wait_s must be between 0 and {MAX_WAIT_S:g}")
    # Look first (no wait): the app must be allowed to read the request's collection.
    first = await ctx.blocking(partial(ctx.agent.fetch_query_status, rid))
    inputs.need_read(request, first.collection)
    result = first
    if first.state == "waiting" and wait_s and ctx.sync_running():
        result = await ctx.blocking(partial(ctx.agent.fetch_query_status, rid,
                                            wait_s=wait_s))
    return json_response(result.to_dict())


__all__ = ["FetchBody", "FetchOut", "FetchQueryBody", "FetchQueryOut", "fetch_query",
           "fetch_records", "get_fetch_query"]
