"""CORS for browser apps (`api.cors_origins`): a web page served from another origin
(a field tablet's local web app) may call the local API.

Empty (the default): no CORS header at all, as before: browsers refuse every
cross-origin call. For an Origin listed exactly (scheme://host[:port], as browsers
send it) or any Origin when ``"*"`` is listed:

- a preflight (OPTIONS with Access-Control-Request-Method) is answered 204 without a
  token: the methods and request headers the API uses, cached `MAX_AGE_S`;
- every real answer (errors and the SSE streams included) carries
  Access-Control-Allow-Origin (the origin itself, never ``*``), ``Vary: Origin`` and
  Access-Control-Expose-Headers (Idempotent-Replayed, Retry-After).

Any other Origin gets no CORS header (the browser blocks the page from reading the
answer); a real request still needs its token either way: CORS only says which pages
a browser lets read the answers, it is not an access control for the API.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple

from aiohttp import web
from aiohttp.typedefs import Middleware

METHODS = "GET, POST, PATCH, DELETE"
HEADERS = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID"
EXPOSED = "Idempotent-Replayed, Retry-After"
MAX_AGE_S = 600
_PRINTABLE = re.compile(r"[\x20-\x7e]+")
_PREFLIGHT = {"Access-Control-Allow-Methods": METHODS, "Access-Control-Allow-Headers": HEADERS,
              "Access-Control-Max-Age": str(MAX_AGE_S)}
"""What an allowed preflight's 204 adds to the headers of every answer (`_allow`)."""


def _allow(origin: str) -> dict[str, str]:
    """The headers of every answer to an allowed Origin."""
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSED}


class Refusal(NamedTuple):
    """`Cors.refusal`: the CORS header lines (each ending CRLF) for a refused request."""

    headers: bytes
    preflight: bool
    """An allowed preflight: answer it 204 with these headers, not 503."""


class Cors:
    """The allowed origins and the two hooks that answer them."""

    def __init__(self, origins: Sequence[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o for o in origins if o != "*")

    def allowed(self, request: web.BaseRequest) -> str | None:
        """The request's Origin if it is allowed (one Origin header only), else None."""
        return self.allowed_of(request.headers.getall("Origin", []))

    def allowed_of(self, values: Sequence[str]) -> str | None:
        """`allowed` for the Origin header values of a request (one only)."""
        if len(values) != 1:
            return None
        origin = values[0]
        if origin in self.origins or (self.any and origin != "null" and len(origin) <= 300):
            return origin
        return None

    def refusal(self, head: bytes) -> Refusal | None:
        """CORS for a request on a connection the limiter refuses (agent.http.
        conn_limits: over api.max_connections), from the request's raw head, when its
        Origin is allowed (None: the plain 503). That answer is written outside the app,
        so the hooks above never see it: without this a browser blocks the page from
        reading the 503, and its preflight, answered 503, fails (a preflight needs a
        2xx), so the page cannot tell a busy agent from one that is down. A preflight is
        answered as always (it costs nothing); the request itself then gets the 503 with
        CORS headers."""
        lines = re.split(rb"\r?\n", head.partition(b"\r\n\r\n")[0])
        method = lines[0].split(b" ", 1)[0]
        origins: list[str] = []
        preflight = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            name = name.strip().lower()
            if name == b"origin":
                origins.append(value.strip().decode("latin-1"))
            elif name == b"access-control-request-method":
                preflight = True
        origin = self.allowed_of(origins)
        # (echoed into a header written by hand: printable ASCII only, no CR/LF)
        if origin is None or not _PRINTABLE.fullmatch(origin):
            return None
        preflight = preflight and method == b"OPTIONS"
        headers = {**_allow(origin), "Vary": "Origin", **(_PREFLIGHT if preflight else {})}
        return Refusal("".join(f"{name}: {value}\r\n" for name, value in headers.items()
                               ).encode(), preflight)

    def middleware(self) -> Middleware:
        @web.middleware
        async def preflight(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
            if (request.method == "OPTIONS"
                    and "Access-Control-Request-Method" in request.headers
                    and self.allowed(request) is not None):
                # Headers are added by `on_prepare`, like on every answer.
                return web.Response(status=204, headers=_PREFLIGHT)
            return await handler(request)

        return preflight

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer, streamed ones included (their headers go out at prepare)."""
        response.headers.add("Vary", "Origin")
        origin = self.allowed(request)
        if origin is None:
            return
        response.headers.update(_allow(origin))


def install(app: web.Application, origins: Sequence[str]) -> None:
    """Answer CORS for `origins` (nothing at all when empty)."""
    if not origins:
        return
    cors = Cors(origins)
    app.middlewares.insert(0, cors.middleware())
    app.on_response_prepare.append(cors.on_prepare)


__all__ = ["EXPOSED", "HEADERS", "MAX_AGE_S", "METHODS", "Cors", "Refusal", "install"]
