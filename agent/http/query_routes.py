"""Queries over the local API (`agent.query`): a page, a count, a live query as SSE.

    POST /v1/collections/{c}/query   {"where": ..., "order_by", "desc", "limit", "after",
                                      "include_deleted"}   -> {records, next, index}
    POST /v1/collections/{c}/count   {"where": ...}         -> {count}
    GET  /v1/collections/{c}/live?q=<the same JSON>          -> Server-Sent Events

The body is the query of `agent.query.model.Query`; the URL names the collection (the
body may repeat it, as the query object QUERIES.md shows, but not name another). A live
query's first event (`event: result`) is the whole first page; each later
one says which records entered, changed or left it (`LiveUpdate`), when the store's feed
shows a change that matters to it (local writes, acks, rollbacks, others' changes, a
wipe). A query the store can no longer answer (a schema version taken since renamed or
removed a field it names) ends the stream with `event: error` (status, code, message).
Live queries count against the feed's client limit and idle timeout.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from agent.errors import AgentError
from agent.http import feed, inputs
from agent.http.errors import ApiError, from_agent_error, json_response, schema_hint
from agent.query.live import LiveQuery
from agent.query.model import DEFAULT_LIMIT, MAX_CURSOR_CHARS, MAX_LIMIT, Query, make_query

MAX_Q_CHARS = 4096
"""A live query's `q` parameter, at most (a query fits easily)."""


class QueryBody(BaseModel):
    """A query of the collection named in the URL (docs/QUERIES.md)."""

    model_config = ConfigDict(extra="forbid")

    collection: str | None = Field(default=None, max_length=200)
    """Optional: the URL names the collection; a query object copied whole (QUERIES.md
    shows it with its collection) may keep it, but it must be the URL's."""
    where: dict[str, Any] = Field(default_factory=dict)
    """field (or `$scope`) -> a value (equality) or {eq, in, gt, gte, lt, lte, prefix}."""
    order_by: str | None = None
    desc: StrictBool = False
    limit: StrictInt = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    after: str | None = Field(default=None, max_length=MAX_CURSOR_CHARS)
    """The `next` cursor of the previous page."""
    include_deleted: StrictBool = False


class CountBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    collection: str | None = Field(default=None, max_length=200)
    """Optional, as in QueryBody: must be the URL's collection."""
    where: dict[str, Any] = Field(default_factory=dict)
    include_deleted: StrictBool = False


class QueryPageOut(BaseModel):
    records: list[dict[str, Any]]
    next: str | None
    """Cursor for the next page (send it as `after`); null on the last page."""
    index: str | None
    """The index that served the query."""


class CountOut(BaseModel):
    count: int


class LiveUpdateOut(BaseModel):
    """One event of a live query (`data:` of its SSE events)."""

    seq: int
    """The feed position the result reflects (the SSE `id:`)."""
    initial: bool
    """True for the first result (`event: result`)."""
    keys: list[str]
    """The whole result now, in order."""
    entered: list[dict[str, Any]]
    changed: list[dict[str, Any]]
    left: list[str]


def _query(collection: str, body: dict[str, Any]) -> Query:
    named = body.pop("collection", None)
    if named is not None and named != collection:
        raise ApiError(422, "invalid", f"collection: the body names {named[:100]!r} but the "
                                       f"URL {collection[:100]!r}: send the query to "
                                       f"/v1/collections/{named[:100]}/..., or leave "
                                       "collection out of the body")
    return make_query({**body, "collection": collection})


async def query_records(request: web.Request, ctx: Any) -> web.StreamResponse:
    c = inputs.path(request, "collection")
    inputs.need_read(request, c)
    body = await inputs.body(request, QueryBody)
    query = _query(c, body.model_dump())
    page = await ctx.blocking(partial(ctx.agent.query, query))
    return json_response(page.to_dict())


async def count_records(request: web.Request, ctx: Any) -> web.StreamResponse:
    c = inputs.path(request, "collection")
    inputs.need_read(request, c)
    body = await inputs.body(request, CountBody, optional=True)
    query = _query(c, body.model_dump())
    count = await ctx.blocking(partial(ctx.agent.count, query))
    return json_response({"count": count})


async def live(request: web.Request, ctx: Any) -> web.StreamResponse:
    c = inputs.path(request, "collection")
    inputs.need_read(request, c)
    raw = request.query.get("q", "{}")
    if len(raw) > MAX_Q_CHARS:
        raise ApiError(413, "query_too_large", f"q is over {MAX_Q_CHARS} characters")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"q is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(422, "invalid", "q must be a JSON object (the query)")
    try:
        body = QueryBody.model_validate(doc)
    except ValueError as exc:
        raise ApiError(422, "invalid", f"q: {exc}".splitlines()[0]) from None
    query = _query(c, body.model_dump())
    hub = ctx.hub
    hub.admit(ctx.max_feed_clients)
    # Counted before the first await: requests arriving meanwhile see this one (opening
    # the query on the store pool takes a while; counting after it let a burst through).
    hub.clients += 1
    lq: LiveQuery | None = None
    try:
        lq = await ctx.blocking(partial(ctx.agent.live_query, query))
        resp = await feed.open_stream(request)
        await asyncio.wait_for(resp.write(b"retry: 2000\n\n"), ctx.feed_idle_timeout_s)
        while True:
            try:
                update = await ctx.blocking(lq.poll)
            except AgentError as exc:
                # The query no longer fits the store: most often the device took a schema
                # version that renamed or removed a field it filters on. The answer has
                # started, so the error is the stream's last event (then it ends) rather
                # than a silent close the app cannot tell from a lost link.
                err = schema_hint(from_agent_error(exc), lambda: ctx.agent.catalog.version)
                doc = {"status": err.status, "code": err.code, "message": err.message}
                await asyncio.wait_for(resp.write(b"event: error\ndata: " + orjson.dumps(doc)
                                                  + b"\n\n"), ctx.feed_idle_timeout_s)
                resp.force_close()  # the connection ends with the stream (no keep-alive)
                await resp.write_eof()
                return resp
            if update is not None:
                kind = b"result" if update.initial else b"update"
                event = (b"id: " + str(update.seq).encode() + b"\nevent: " + kind
                         + b"\ndata: " + orjson.dumps(update.to_dict()) + b"\n\n")
                await asyncio.wait_for(resp.write(event), ctx.feed_idle_timeout_s)
                continue
            if not await hub.wait_beyond(lq.position, feed.KEEPALIVE_S):
                await asyncio.wait_for(resp.write(b": keepalive\n\n"),
                                       ctx.feed_idle_timeout_s)
    except (ConnectionError, TimeoutError, asyncio.CancelledError):
        return web.StreamResponse()
    finally:
        hub.clients -= 1
        if lq is not None:
            lq.close()


__all__ = ["CountBody", "CountOut", "LiveUpdateOut", "QueryBody", "QueryPageOut",
           "count_records", "live", "query_records"]
