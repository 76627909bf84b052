"""The change feed over HTTP: Server-Sent Events (`GET /v1/feed`) and a JSON long poll
(`GET /v1/events`), both resuming from a position with nothing missed or repeated.

Every event is read from the store's feed (`agent.feed`), written in the same LMDB
transaction as the data it tells of, so the feed never disagrees with the data. An SSE
event's `id:` is its seq; a client that reconnects with ``Last-Event-ID`` (or
``?since=``) continues after it. A position the store no longer keeps gives a
"truncated" event first; a position beyond the store's newest (the store was
re-created) gives a "truncated" event with ``reason: "restarted"`` and the feed from its
start.

Memory per client is bounded: events are read a page at a time and written in pieces of
at most ~64 KiB (plus one event) with backpressure (the write waits until the socket
drains), and a client that accepts
nothing for `feed_idle_timeout_s` is dropped. At most `max_feed_clients` feeds run at
once; more get 503. One poller per server watches the store's feed position (writes of
other processes: the sync loop, the CLI) and HTTP writes poke it, so waiting clients
wake at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import orjson
from aiohttp import web

from agent.api import Agent
from agent.http.auth import APP, AppToken
from agent.http.errors import ApiError
from agent.models import FeedEvent

T = TypeVar("T")
Blocking = Callable[[Callable[[], T]], Awaitable[T]]

PAGE = 200
FLUSH_BYTES = 64 * 1024
KEEPALIVE_S = 15.0
POLL_S = 0.02
MAX_WAIT_S = 30.0
MAX_WAITING_POLLS = 256
"""Long polls (`/v1/events?wait_s=`) waiting at once; more are answered 503: each holds a
connection and a task, and nothing else bounds how many a client opens."""


class FeedHub:
    """Knows the store's newest feed seq and wakes the readers waiting for more."""

    def __init__(self, agent: Agent, blocking: Blocking[Any], *, poll_s: float = POLL_S) -> None:
        self._agent = agent
        self._blocking = blocking
        self._poll_s = poll_s
        self.position = agent.feed_position()
        self._grown = asyncio.Event()
        self._poke = asyncio.Event()
        self.clients = 0
        self.waiting_polls = 0

    def poke(self) -> None:
        """Something was written here: look at the feed now, not at the next poll."""
        self._poke.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self._poll_s)
            self._poke.clear()
            try:
                pos = await self._blocking(self._agent.feed_position)
            except Exception:  # the store is briefly unavailable: try again next poll
                continue
            if pos != self.position:
                self.position = pos
                grown, self._grown = self._grown, asyncio.Event()
                grown.set()

    def admit(self, max_clients: int) -> None:
        """Refuse a new streaming client (503) when `max_clients` stream already."""
        if self.clients >= max_clients:
            raise ApiError(503, "too_many_feed_clients",
                           f"{max_clients} feed clients are connected already (api."
                           "max_feed_clients): close one or try again later",
                           headers={"Retry-After": "5"})

    async def wait_beyond(self, last: int, timeout: float) -> bool:
        """Wait until the feed has an event after `last` (True) or `timeout` passed."""
        if self.position != last:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._grown.wait(), timeout)
        return self.position != last


async def open_stream(request: web.Request) -> web.StreamResponse:
    """A Server-Sent Events response, headers sent."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    return resp


def visible(event: FeedEvent, app: AppToken, collection: str | None) -> bool:
    if not event.collection:
        return True  # connectivity, truncated, reset, wiped: about the whole store
    if collection is not None and event.collection != collection:
        return False
    return app.can_read(event.collection)


def start_position(request: web.Request, hub: FeedHub) -> int:
    """Where to continue: Last-Event-ID, else ?since=, else now."""
    raw = request.headers.get("Last-Event-ID")
    name = "Last-Event-ID"
    if raw is None:
        raw = request.query.get("since")
        name = "since"
    if raw is None or raw == "":
        return hub.position
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise ApiError(422, "invalid", f"{name} must be a feed position (a whole number "
                                       f"from 0), got {raw[:40]!r}")
    return int(raw)


def _restart_check(since: int, position: int) -> tuple[int, list[FeedEvent]]:
    if since > position:
        return 0, [FeedEvent(0, "", "", "truncated", {"after": since, "reason": "restarted"})]
    return since, []


def _collection_param(request: web.Request) -> str | None:
    value = request.query.get("collection")
    return value or None


async def sse(request: web.Request, agent: Agent, hub: FeedHub, blocking: Blocking[Any],
              *, max_clients: int, idle_timeout_s: float) -> web.StreamResponse:
    app: AppToken = request[APP]
    collection = _collection_param(request)
    if collection is not None and not app.can_read(collection):
        raise ApiError(403, "forbidden", f"app {app.app!r} may not read {collection!r}")
    since = start_position(request, hub)
    hub.admit(max_clients)
    hub.clients += 1
    try:
        resp = await open_stream(request)
        last, first = _restart_check(since, hub.position)
        chunk = b"retry: 2000\n\n" + b"".join(_sse_event(e) for e in first)
        while True:
            batch = await blocking(partial(agent.feed_after, last, PAGE))
            for event in batch:
                last = max(last, event.seq)
                if visible(event, app, collection):
                    chunk += _sse_event(event)
                    if len(chunk) >= FLUSH_BYTES:
                        await asyncio.wait_for(resp.write(chunk), idle_timeout_s)
                        chunk = b""
            if chunk:
                await asyncio.wait_for(resp.write(chunk), idle_timeout_s)
                chunk = b""
            if len(batch) >= PAGE:
                continue
            if not await hub.wait_beyond(last, KEEPALIVE_S):
                chunk = b": keepalive\n\n"
    except (ConnectionError, TimeoutError, asyncio.CancelledError):
        # The client left, or stopped reading: drop it (its position is its own to keep).
        return web.StreamResponse()
    finally:
        hub.clients -= 1


def _sse_event(event: FeedEvent) -> bytes:
    return (b"id: " + str(event.seq).encode() + b"\nevent: " + event.kind.encode()
            + b"\ndata: " + orjson.dumps(event.to_dict()) + b"\n\n")


async def page(request: web.Request, agent: Agent, hub: FeedHub,
               blocking: Blocking[Any]) -> dict[str, Any]:
    """`GET /v1/events?since=N&limit=&wait_s=`: a JSON page of events (long poll)."""
    app: AppToken = request[APP]
    collection = _collection_param(request)
    if collection is not None and not app.can_read(collection):
        raise ApiError(403, "forbidden", f"app {app.app!r} may not read {collection!r}")
    since = start_position(request, hub)
    limit = int_param(request, "limit", 100, 1, 1000)
    wait_s = float_param(request, "wait_s", 0.0, 0.0, MAX_WAIT_S)
    last, out = _restart_check(since, hub.position)
    if wait_s > 0 and not out:
        if hub.waiting_polls >= MAX_WAITING_POLLS:
            raise ApiError(503, "too_many_feed_clients",
                           f"{MAX_WAITING_POLLS} long polls are waiting already: poll "
                           "less often at once, or use one SSE stream (/v1/feed)",
                           headers={"Retry-After": "5"})
        hub.waiting_polls += 1
        try:
            await hub.wait_beyond(last, wait_s)
        finally:
            hub.waiting_polls -= 1
    batch = await blocking(partial(agent.feed_after, last, limit))
    for event in batch:
        last = max(last, event.seq)
        if visible(event, app, collection):
            out.append(event)
    return {"events": [e.to_dict() for e in out], "last": last}


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, "invalid", f"query parameter {name} must be a whole number, "
                                       f"got {raw[:40]!r}") from None
    if not low <= value <= high:
        raise ApiError(422, "invalid", f"query parameter {name} must be from {low} to "
                                       f"{high}, got {value}")
    return value


def float_param(request: web.Request, name: str, default: float, low: float,
                high: float) -> float:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(422, "invalid", f"query parameter {name} must be a number, "
                                       f"got {raw[:40]!r}") from None
    if not low <= value <= high:  # also refuses nan
        raise ApiError(422, "invalid", f"query parameter {name} must be from {low} to "
                                       f"{high}, got {raw[:40]!r}")
    return value


__all__ = ["FeedHub", "float_param", "int_param", "open_stream", "page", "sse",
           "start_position"]
