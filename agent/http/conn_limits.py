"""Bounds on the local API's connections (what a hostile or broken client can hold).

aiohttp bounds a request's size (`client_max_size`, the head's lines and headers) and the
pipelined requests it queues per connection (32), but not how many connections stay open,
nor how long a client may take to send a body. Here:

- at most `api.max_connections` connections are open. A connection over the limit makes
  room by closing the open one that has been idle longest: one that waits for (or is
  still receiving) the head of a request, never one whose request is being answered (a
  feed, a long poll, a write). When every connection is busy the newcomer is answered 503
  `too_many_connections` (JSON, `Retry-After`) and closed; with `api.cors_origins` set,
  once its request's head is read (at most LINGER_S), so that a browser page of a listed
  origin can read that answer (`Cors.refusal`). Idle-connection floods and
  slowloris heads so cost an honest client nothing but the eviction of the flood.
- a connection idle for `api.idle_timeout_s` (no request yet, or a request's head still
  incomplete, or keep-alive after an answer) is closed (aiohttp's keep-alive timer, which
  also runs from the connection's start).
- an answer must be taken by the client within `api.send_timeout_s` (a client that
  never reads holds the answer's bytes), else the connection is closed;
- a request's body must arrive whole within `api.body_timeout_s`
  (`read_body`, called by the errors middleware before any handler), else 408
  `body_timeout` and the connection is closed.
- what aiohttp refuses before a route runs (a request line or header over its limits,
  Content-Length with Transfer-Encoding, a malformed head) is answered as JSON
  ``{status, code, message}`` like every other error, not aiohttp's text/plain page.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiohttp.web_request import BaseRequest

from agent.http.cors import Cors

log = structlog.get_logger("waystation.agent.http")

HEAD_LIMITS = {"max_line_size": 8190, "max_field_size": 8190, "max_headers": 100}
"""A request's head (aiohttp's parser): its line and each header at most 8 KiB, at most
100 headers; over them, 400 bad_request (JSON) and the connection closes."""

_LOG_EVERY_S = 10.0
"""Evictions and refusals are logged at most this often (a flood would fill the log)."""


_QUOTED = re.compile(r"(?:bytearray\(|b['\"]).*", re.S)
LINGER_S = 2.0
"""How long the rest of a request is read and dropped after an answer that closes."""
_MAX_LINGERING = 64
_HEAD_MAX = 16 * 1024
"""A refused request's head is read this far for its Origin (CORS), no further."""


def _json_error(status: int, code: str, message: str) -> bytes:
    return orjson.dumps({"status": status, "code": code, "message": message})


class ConnLimiter:
    """The protocol factory of the API's sites: makes `_Handler`s and keeps them bounded."""

    def __init__(self, *, max_connections: int, handler_kwargs: dict[str, Any],
                 send_timeout_s: float = 60.0, cors: Cors | None = None) -> None:
        self.send_timeout_s = send_timeout_s
        self.cors = cors
        """api.cors_origins: a refusal waits for the request's head to answer its Origin."""
        self._server: web.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.max_connections = max_connections
        self._kwargs = handler_kwargs
        # open connections -> monotonic time of their last activity (accept, end of an
        # answer); busy ones (a request being handled) are in _busy too.
        self._open: dict[_Handler, float] = {}
        self._busy: dict[_Handler, int] = {}
        self._lingering: set[asyncio.BaseTransport] = set()
        self.evicted = 0
        self.refused = 0
        self._logged_at = 0.0

    def bind(self, server: web.Server, loop: asyncio.AbstractEventLoop) -> None:
        """The runner's server (its handlers register there: the runner's cleanup
        closes them) and loop, once the runner is set up."""
        self._server, self._loop = server, loop

    def __call__(self) -> _Handler:
        assert self._server is not None and self._loop is not None, "bind() first"
        return _Handler(self, self._server, loop=self._loop, **self._kwargs)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    # -------------------------------------------------------------- connection events

    def _admit(self, handler: _Handler) -> bool:
        """A connection arrived: True to serve it (after evicting an idle one if full)."""
        if len(self._open) >= self.max_connections:
            idle = [(at, h) for h, at in self._open.items() if h not in self._busy]
            if not idle:
                self.refused += 1
                self._log("api_connection_refused")
                return False
            _, victim = min(idle, key=lambda pair: pair[0])
            self._open.pop(victim, None)
            victim.force_close()
            self.evicted += 1
            self._log("api_connection_evicted")
        self._open[handler] = time.monotonic()
        return True

    def _hold(self, transport: asyncio.BaseTransport) -> bool:
        """A refused connection kept open to read its request's head (CORS) before it
        is answered: False when _MAX_LINGERING are held or lingering already (a refusal
        flood: it is answered at once, without CORS). Closed after LINGER_S at most."""
        assert self._loop is not None
        if len(self._lingering) >= _MAX_LINGERING:
            return False
        self._lingering.add(transport)
        self._loop.call_later(2 * LINGER_S, transport.close)
        return True

    def _linger(self, transport: asyncio.BaseTransport) -> None:
        """A refused connection: its 503 is written; the request it sends meanwhile is
        read and dropped for up to LINGER_S (closing with it unread would reset the
        connection, and the client could lose the 503 before reading it). At most
        _MAX_LINGERING at once: beyond, closed at once (a refusal flood)."""
        assert isinstance(transport, asyncio.WriteTransport) and self._loop is not None
        held = transport in self._lingering
        if (not held and len(self._lingering) >= _MAX_LINGERING) \
                or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if not held:
            self._lingering.add(transport)
            self._loop.call_later(LINGER_S, transport.close)

    def _closed(self, handler: _Handler) -> None:
        self._open.pop(handler, None)
        self._busy.pop(handler, None)

    def _log(self, event: str, **why: str) -> None:
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            fields = {"setting": "api.max_connections",
                      "hint": "idle connections are closed to make room; raise "
                              "api.max_connections if honest apps hold this many", **why}
            log.warning(event, open=len(self._open), limit=self.max_connections,
                        evicted_total=self.evicted, refused_total=self.refused, **fields)

    # ------------------------------------------------------------------- requests

    def middleware(self) -> Middleware:
        """Marks a connection busy while one of its requests is handled (not evictable)."""

        @web.middleware
        async def busy(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
            proto = request.protocol
            if not isinstance(proto, _Handler) or proto not in self._open:
                return await handler(request)
            self._busy[proto] = self._busy.get(proto, 0) + 1
            try:
                return await handler(request)
            finally:
                left = self._busy.get(proto, 1) - 1
                if left > 0:
                    self._busy[proto] = left
                else:
                    self._busy.pop(proto, None)
                if proto in self._open:
                    self._open[proto] = time.monotonic()

        return busy


class _Handler(web.RequestHandler):
    """aiohttp's connection handler, admitted by a `ConnLimiter`, answering JSON errors."""

    def __init__(self, limiter: ConnLimiter, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limiter = limiter
        self._admitted = False
        self._refused: asyncio.BaseTransport | None = None
        self._head: bytearray | None = None
        """Refused with CORS on: the request's head so far, until it is answered."""
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._limiter._admit(self):
            self._refused = transport
            if self._limiter.cors is not None and self._limiter._hold(transport):
                # The answer's CORS headers depend on the request's Origin (a browser
                # sends its head at once); a client that sends none gets the plain 503.
                assert self._limiter._loop is not None
                self._head = bytearray()
                self._head_timer = self._limiter._loop.call_later(LINGER_S, self._refuse)
            else:
                self._refuse()
            return
        self._admitted = True
        super().connection_made(transport)

    def _refuse(self) -> None:
        """Answer a refused connection: 503 too_many_connections (JSON, Retry-After),
        with CORS headers for an allowed Origin; 204 to an allowed preflight."""
        transport = self._refused
        if transport is None or transport.is_closing():
            return
        assert isinstance(transport, asyncio.WriteTransport)
        head, self._head = self._head, None
        if self._head_timer is not None:
            self._head_timer.cancel()
        cors = self._limiter.cors
        allowed = cors.refusal(bytes(head)) if cors is not None and head else None
        extra = allowed.headers if allowed is not None else b""
        if allowed is not None and allowed.preflight:
            transport.write(b"HTTP/1.1 204 No Content\r\n%sConnection: close\r\n"
                            b"Content-Length: 0\r\n\r\n" % extra)
        else:
            body = _json_error(503, "too_many_connections",
                               f"the local API has {self._limiter.max_connections} "
                               "connections busy answering (api.max_connections); "
                               "try again shortly")
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\n"
                            b"Content-Type: application/json\r\nRetry-After: 1\r\n%s"
                            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                            % (extra, len(body), body))
        self._limiter._linger(transport)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            super().data_received(data)
        elif self._head is not None:
            self._head += data
            if b"\r\n\r\n" in self._head or len(self._head) > _HEAD_MAX:
                self._refuse()
        # (refused and answered: the request is read and dropped while the 503 lingers)

    def eof_received(self) -> None:
        if not self._admitted and self._refused is not None:
            if self._head is not None:  # the client is done sending: answer what came
                self._refuse()
            self._refused.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            self._limiter._lingering.discard(self._refused)
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head = None
            return
        self._limiter._closed(self)
        super().connection_lost(exc)

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        """Writing an answer waits for the client to read it (aiohttp drains at 64 KiB):
        a client that never reads would hold the connection, and the answer's bytes,
        for ever. After api.send_timeout_s the connection is closed."""
        try:
            async with asyncio.timeout(self._limiter.send_timeout_s):
                return await super().finish_response(request, resp, start_time)
        except TimeoutError:
            self._limiter._log("api_send_timeout", setting="api.send_timeout_s",
                               hint="a client did not read its answer in time")
            if self.transport is not None:
                self.transport.abort()  # (close() would wait to flush what is unread)
            self.force_close()
            return resp, True  # (as a client gone: the connection ends)

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """Errors aiohttp answers itself (a head it cannot parse or that is over its
        limits): JSON like every other answer of the API, and the connection closes."""
        if request.writer.output_size > 0:  # (as aiohttp: an answer is half sent)
            raise ConnectionError("the answer is sent already: cannot send an error")
        if status >= 500:
            log.error("api_request_failed", method=request.method, exc_info=exc)
            code, text = "internal", ("the agent failed to answer this request; its log "
                                      "has the details")
        else:
            code = "bad_request"
            # (aiohttp's message quotes the bytes it choked on: maybe a token; not echoed)
            said = str(getattr(exc, "message", None) or message or exc or "")
            said = _QUOTED.sub("...", said)[:200]
            text = (f"the request could not be read as HTTP: {said}"
                    f" (a request line or header is at most {HEAD_LIMITS['max_line_size']} "
                    f"bytes, at most {HEAD_LIMITS['max_headers']} headers; Content-Length "
                    "and Transfer-Encoding exclude each other)")
            # A client's bad head is its own problem: not a traceback per request
            # (aiohttp logs each at ERROR), one debug line.
            log.debug("api_bad_request_head", error=type(exc).__name__)
        out = web.Response(status=status, body=_json_error(status, code, text),
                           content_type="application/json")
        out.force_close()
        return out


async def read_body(request: web.Request, timeout_s: float) -> None:
    """Read (and keep: `request.read()` returns it again) a request's body within
    `timeout_s`, so a body announced and never sent ends instead of holding its
    connection and handler forever. Raises TimeoutError."""
    if request.body_exists:
        async with asyncio.timeout(timeout_s):
            await request.read()


__all__ = ["HEAD_LIMITS", "LINGER_S", "ConnLimiter", "read_body"]
