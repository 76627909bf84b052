"""The local API's routes: one table (`ROUTES`) that the server mounts and the OpenAPI
document is generated from (`agent.http.openapi`).

Every route answers JSON; writes answer 202 with the change id and "pending" (saved
locally, waiting for the server's ack, which the feed reports as "synced"), or 200 with
"unchanged". Rights: reading a collection needs --read (or --write) on it, writing
needs --write; dead letters and conflicts are filtered to the app's collections.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from agent.api import Agent
from agent.http import feed, fetch_routes, models, query_routes, txn_routes
from agent.http import idempotency as idem
from agent.http.errors import ApiError, json_response
from agent.http.inputs import app_of
from agent.http.inputs import body as _body
from agent.http.inputs import need_read as _need_read
from agent.http.inputs import need_write as _need_write
from agent.http.inputs import path as _path
from agent.idempotency import Once
from agent.models import WriteResult

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


@dataclass
class Context:
    """What the handlers share: the open agent, a way to run blocking store calls off
    the event loop, the feed hub, limits, and the sync loop's state."""

    agent: Agent
    blocking: Callable[[Callable[[], Any]], Awaitable[Any]]
    hub: feed.FeedHub
    max_feed_clients: int
    feed_idle_timeout_s: float
    sync_running: Callable[[], bool]
    client_cert: Callable[[], dict[str, Any] | None] = lambda: None
    """The client certificate's state, as `agent status` gives it (agent.clientcert)."""
    idempotency_keep_s: float = 86400.0
    idempotency_max_keys: int = 10_000


Handler = Callable[[web.Request, Context], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "path" or "query"
    schema: dict[str, Any]
    description: str
    required: bool = False


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    op_id: str
    summary: str
    response: type[BaseModel] | None
    body: type[BaseModel] | None = None
    status: int = 200
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()
    stream: str | None = None  # content type of a streamed answer
    tags: tuple[str, ...] = field(default=("records",))

    @property
    def writes(self) -> bool:
        """A write: takes an Idempotency-Key (agent.http.idempotency). The POSTs that
        only read (queries, fetches) do not, nor sync now (asked twice, it is asked:
        nothing to apply once)."""
        return self.method != "GET" and self.op_id not in _NOT_WRITES


_NOT_WRITES = frozenset({"fetchRecords", "fetchQuery", "queryRecords", "countRecords",
                         "syncNow"})


# ------------------------------------------------------------------ helpers


def write_answer(result: WriteResult) -> tuple[int, dict[str, Any]]:
    """A record write's answer (what an Idempotency-Key replays)."""
    return (202 if result.state == "pending" else 200), result.to_dict()


def _written(ctx: Context, result: WriteResult) -> web.Response:
    status, doc = write_answer(result)
    if result.state == "pending":
        ctx.hub.poke()
    return json_response(doc, status=status)


def _once(request: web.Request) -> Once | None:
    return idem.once(request, write_answer)


# ------------------------------------------------------------------ records


async def get_record(request: web.Request, ctx: Context) -> web.StreamResponse:
    c, k = _path(request, "collection"), _path(request, "key")
    _need_read(request, c)
    record = await ctx.blocking(partial(ctx.agent.get, c, k))
    if record is None:
        raise ApiError(404, "not_found", f"no record {c[:100]}/{k[:200]} on this device")
    return json_response(record.to_dict())


async def list_records(request: web.Request, ctx: Context) -> web.StreamResponse:
    c = _path(request, "collection")
    _need_read(request, c)
    limit = feed.int_param(request, "limit", 100, 1, 1000)
    prefix = request.query.get("prefix") or None
    after = request.query.get("after") or None
    records = await ctx.blocking(partial(ctx.agent.list, c, prefix, limit, after=after))
    return json_response({"records": [r.to_dict() for r in records]})


async def put_record(request: web.Request, ctx: Context) -> web.StreamResponse:
    c, k = _path(request, "collection"), _path(request, "key")
    _need_write(request, c)
    body = await _body(request, models.PutBody)
    result = await ctx.blocking(partial(ctx.agent.put, c, k, body.fields,
                                        priority=body.priority, once=_once(request)))
    return _written(ctx, result)


async def delete_record(request: web.Request, ctx: Context) -> web.StreamResponse:
    c, k = _path(request, "collection"), _path(request, "key")
    _need_write(request, c)
    body = await _body(request, models.DeleteBody, optional=True)
    result = await ctx.blocking(partial(ctx.agent.delete, c, k, priority=body.priority,
                                        once=_once(request)))
    return _written(ctx, result)


async def increment(request: web.Request, ctx: Context) -> web.StreamResponse:
    c, k = _path(request, "collection"), _path(request, "key")
    _need_write(request, c)
    body = await _body(request, models.IncrementBody)
    result = await ctx.blocking(partial(ctx.agent.increment, c, k, body.field, body.amount,
                                        priority=body.priority, once=_once(request)))
    return _written(ctx, result)


async def add_members(request: web.Request, ctx: Context) -> web.StreamResponse:
    c, k = _path(request, "collection"), _path(request, "key")
    _need_write(request, c)
    body = await _body(request, models.MembersBody)
    result = await ctx.blocking(partial(ctx.agent.add, c, k, body.field, body.members,
                                        priority=body.priority, once=_once(request)))
    return _written(ctx, result)


async def remove_members(request: web.Request, ctx: Context) -> web.StreamResponse:
    c, k = _path(request, "collection"), _path(request, "key")
    _need_write(request, c)
    body = await _body(request, models.MembersBody)
    result = await ctx.blocking(partial(ctx.agent.remove, c, k, body.field, body.members,
                                        priority=body.priority, once=_once(request)))
    return _written(ctx, result)


async def resolve(request: web.Request, ctx: Context) -> web.StreamResponse:
    c, k, f = _path(request, "collection"), _path(request, "key"), _path(request, "field")
    _need_write(request, c)
    body = await _body(request, models.ResolveBody)
    result = await ctx.blocking(partial(ctx.agent.resolve_conflict, c, k, f, body.value,
                                        priority=body.priority, once=_once(request)))
    return _written(ctx, result)


# ------------------------------------------------------------- the device


async def status(request: web.Request, ctx: Context) -> web.StreamResponse:
    st = await ctx.blocking(ctx.agent.status)
    cert = await ctx.blocking(ctx.client_cert)
    # The same document as `agent status --json` (which has `sync_running` too).
    return json_response({**st.to_dict(), "sync_running": ctx.sync_running(),
                          "client_cert": cert})


async def sync_now(request: web.Request, ctx: Context) -> web.StreamResponse:
    # Any app that may write something may ask for its writes to go now.
    app = app_of(request)
    if not app.write:
        raise ApiError(403, "forbidden", f"app {app.app!r} has no write rights: only an app "
                                         "that writes may ask to sync now (token --write)")
    req = await ctx.blocking(ctx.agent.sync_now)
    st = await ctx.blocking(ctx.agent.status)
    return json_response({"requested_ms": req["t"], "sync_running": ctx.sync_running(),
                          "pending": st.pending, "deferred": st.deferred}, status=202)


async def conflicts(request: web.Request, ctx: Context) -> web.StreamResponse:
    app = app_of(request)
    found = await ctx.blocking(ctx.agent.conflicts)
    return json_response({"conflicts": [c.to_dict() for c in found
                                        if app.can_read(c.collection)]})


async def dead_letters(request: web.Request, ctx: Context) -> web.StreamResponse:
    app = app_of(request)
    found = await ctx.blocking(ctx.agent.dead_letters)
    return json_response({"dead_letters": [d.to_dict() for d in found
                                           if app.can_read(str(d.change.get("c", "")))]})


async def _dead_letter_collection(request: web.Request, ctx: Context) -> int:
    raw = _path(request, "n")
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise ApiError(422, "invalid", f"a dead letter is named by its change number, got "
                                       f"{raw[:40]!r}")
    n = int(raw)
    found = await ctx.blocking(ctx.agent.dead_letters)
    for d in found:
        if d.n == n:
            _need_write(request, str(d.change.get("c", "")))
            return n
    raise ApiError(404, "not_found", f"no dead letter with change number {n}")


async def retry_dead_letter(request: web.Request, ctx: Context) -> web.StreamResponse:
    n = await _dead_letter_collection(request, ctx)
    result = await ctx.blocking(partial(ctx.agent.retry_dead_letter, n,
                                        once=_once(request)))
    return _written(ctx, result)


async def discard_dead_letter(request: web.Request, ctx: Context) -> web.StreamResponse:
    n = await _dead_letter_collection(request, ctx)
    answer = (200, {"n": n, "discarded": True})
    await ctx.blocking(partial(ctx.agent.discard_dead_letter, n,
                               once=idem.once(request, lambda _: answer)))
    return json_response(answer[1], status=answer[0])


# ------------------------------------------------------------------ the feed


async def feed_sse(request: web.Request, ctx: Context) -> web.StreamResponse:
    return await feed.sse(request, ctx.agent, ctx.hub, ctx.blocking,
                          max_clients=ctx.max_feed_clients,
                          idle_timeout_s=ctx.feed_idle_timeout_s)


async def feed_page(request: web.Request, ctx: Context) -> web.StreamResponse:
    return json_response(await feed.page(request, ctx.agent, ctx.hub, ctx.blocking))


# ------------------------------------------------------------------ the table

_C = Param("collection", "path", {"type": "string", "maxLength": 200}, "Collection name",
           required=True)
# Any UTF-8 key without control characters (PROTOCOL.md §2): a pattern of printable ASCII
# made generated clients refuse the keys the agent takes. maxLength counts characters, the
# rule bytes: a key of 200 characters over 200 bytes is answered 422.
_K = Param("key", "path", {"type": "string", "minLength": 1, "maxLength": 200,
                           "pattern": "^[^\\x00-\\x1f]+$"},
           "Record key: 1 to 200 UTF-8 bytes, no character below U+0020, percent-encoded "
           "in the path", required=True)
_F = Param("field", "path", {"type": "string", "maxLength": 200}, "A manual field",
           required=True)
_N = Param("n", "path", {"type": "integer", "minimum": 1},
           "The dead letter's change number", required=True)
_SINCE = Param("since", "query", {"type": "integer", "minimum": 0},
               "Continue after this feed position (default: now; SSE also reads "
               "Last-Event-ID)")
_COLL_Q = Param("collection", "query", {"type": "string"}, "Only events of this collection "
                "(connectivity events always come)")
_REC = "/v1/collections/{collection}/records/{key}"
_W = (400, 403, 404, 413, 415, 422, 507)

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/status", status, "getStatus", "Sync state of the device",
          models.StatusOut, tags=("device",)),
    Route("POST", "/v1/sync", sync_now, "syncNow",
          "Sync now: lift the sync windows, metered and battery policy for a while",
          models.SyncNowOut, status=202, errors=(403,), tags=("device",)),
    Route("GET", "/v1/collections/{collection}/records", list_records, "listRecords",
          "Records of a collection in key order", models.RecordList,
          params=(_C, Param("prefix", "query", {"type": "string"}, "Keys starting with this"),
                  Param("after", "query", {"type": "string"},
                        "Keys after this one (the last key of the previous page)"),
                  Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000},
                        "At most this many (default 100)")),
          errors=(403, 404, 422)),
    Route("POST", "/v1/collections/{collection}/fetch", fetch_routes.fetch_records,
          "fetchRecords", "Bring records back from the server by key (evicted by "
          "retention, or never held)", fetch_routes.FetchOut, fetch_routes.FetchBody,
          params=(_C,), errors=(400, 403, 404, 413, 415, 422)),
    Route("POST", "/v1/collections/{collection}/fetch-query", fetch_routes.fetch_query,
          "fetchQuery", "Bring records back from the server by query (the local query's "
          "filter, no index needed; bounded, with a cursor)", fetch_routes.FetchQueryOut,
          fetch_routes.FetchQueryBody, params=(_C,), errors=(400, 403, 404, 413, 415, 422)),
    Route("GET", "/v1/fetch-queries/{id}", fetch_routes.get_fetch_query, "getFetchQuery",
          "Where a fetch by query stands (and the records it brought back)",
          fetch_routes.FetchQueryOut,
          params=(Param("id", "path", {"type": "string", "minLength": 1, "maxLength": 64},
                        "The id the fetch query returned", required=True),
                  Param("wait_s", "query", {"type": "number", "minimum": 0, "maximum": 30},
                        "Wait up to this long for the answer (default 0)")),
          errors=(403, 404, 422)),
    Route("GET", _REC, get_record, "getRecord",
          "A record with its per-field sync state", models.RecordOut, params=(_C, _K),
          errors=(403, 404, 422)),
    Route("PATCH", _REC, put_record, "putFields",
          "Set fields of a record (creating it: include its scope field)",
          models.WriteResultOut, models.PutBody, 202, (_C, _K), _W),
    Route("DELETE", _REC, delete_record, "deleteRecord", "Delete a record",
          models.WriteResultOut, models.DeleteBody, 202, (_C, _K), (*_W, 404)),
    Route("POST", _REC + "/increment", increment, "increment", "Add to a counter field",
          models.WriteResultOut, models.IncrementBody, 202, (_C, _K), _W),
    Route("POST", _REC + "/add", add_members, "addMembers", "Add members to a set field",
          models.WriteResultOut, models.MembersBody, 202, (_C, _K), _W),
    Route("POST", _REC + "/remove", remove_members, "removeMembers",
          "Remove members from a set field (add wins over a concurrent remove)",
          models.WriteResultOut, models.MembersBody, 202, (_C, _K), _W),
    Route("POST", _REC + "/fields/{field}/resolve", resolve, "resolveConflict",
          "Settle a manual field's open conflict with a value", models.WriteResultOut,
          models.ResolveBody, 202, (_C, _K, _F), (*_W, 404), tags=("conflicts",)),
    Route("POST", "/v1/txn", txn_routes.post_txn, "transaction",
          "Several writes across records and collections, all or none "
          "(docs/TRANSACTIONS.md)", txn_routes.TxnOut, txn_routes.TxnBody, 202, (),
          (400, 403, 404, 413, 415, 422, 507)),
    Route("GET", "/v1/conflicts", conflicts, "listConflicts",
          "Open manual conflicts, then own writes that lost", models.ConflictList,
          tags=("conflicts",)),
    Route("GET", "/v1/deadletters", dead_letters, "listDeadLetters",
          "Changes the server refused for good", models.DeadLetterList,
          tags=("dead letters",)),
    Route("POST", "/v1/deadletters/{n}/retry", retry_dead_letter, "retryDeadLetter",
          "Send a dead-lettered change again as a new change", models.WriteResultOut,
          None, 202, (_N,), (403, 404, 422, 507), tags=("dead letters",)),
    Route("DELETE", "/v1/deadletters/{n}", discard_dead_letter, "discardDeadLetter",
          "Forget a dead letter (the change stays rolled back)", models.Discarded,
          params=(_N,), errors=(403, 404, 422), tags=("dead letters",)),
    Route("GET", "/v1/feed", feed_sse, "feed",
          "The change feed as Server-Sent Events (id: the feed position)",
          models.FeedEventOut, params=(_SINCE, _COLL_Q), errors=(403, 422, 503),
          stream="text/event-stream", tags=("feed",)),
    Route("GET", "/v1/events", feed_page, "events",
          "The change feed as JSON pages (long poll with wait_s)", models.FeedPage,
          params=(_SINCE, _COLL_Q,
                  Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000},
                        "At most this many events (default 100)"),
                  Param("wait_s", "query", {"type": "number", "minimum": 0, "maximum": 30},
                        "Wait up to this long for a first event (default 0)")),
          errors=(403, 422), tags=("feed",)),
    Route("POST", "/v1/collections/{collection}/query", query_routes.query_records,
          "queryRecords", "Records matching a query, through an index (docs/QUERIES.md)",
          query_routes.QueryPageOut, query_routes.QueryBody, params=(_C,),
          errors=(400, 403, 404, 413, 415, 422), tags=("queries",)),
    Route("POST", "/v1/collections/{collection}/count", query_routes.count_records,
          "countRecords", "How many records match a query", query_routes.CountOut,
          query_routes.CountBody, params=(_C,), errors=(400, 403, 404, 413, 415, 422),
          tags=("queries",)),
    Route("GET", "/v1/collections/{collection}/live", query_routes.live, "liveQuery",
          "A live query as Server-Sent Events: the first page (event: result), then "
          "which records entered, changed or left it (event: update)",
          query_routes.LiveUpdateOut,
          params=(_C, Param("q", "query", {"type": "string"},
                            "The query as JSON (the body of queryRecords)")),
          errors=(400, 403, 404, 413, 422, 503), stream="text/event-stream",
          tags=("queries",)),
)


__all__ = ["ROUTES", "Context", "Param", "Route"]
