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

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware

METHODS = "GET, POST, PATCH, DELETE"
HEADERS = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID"
EXPOSED = "Idempotent-Replayed, Retry-After"
MAX_AGE_S = 600


class Cors:
    """The allowed origins and the two hooks that answer them."""

    def __init__(self, origins: Sequence[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o for o in origins if o != "*")

    def allowed(self, request: web.BaseRequest) -> str | None:
        """The request's Origin if it is allowed (one Origin header only), else None."""
        values = request.headers.getall("Origin", [])
        if len(values) != 1:
            return None
        origin = values[0]
        if origin in self.origins or (self.any and origin != "null" and len(origin) <= 300):
            return origin
        return None

    def middleware(self) -> Middleware:
        @web.middleware
        async def preflight(request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
            if (request.method == "OPTIONS"
                    and "Access-Control-Request-Method" in request.headers
                    and self.allowed(request) is not None):
                # Headers are added by `on_prepare`, like on every answer.
                return web.Response(status=204, headers={
                    "Access-Control-Allow-Methods": METHODS,
                    "Access-Control-Allow-Headers": HEADERS,
                    "Access-Control-Max-Age": str(MAX_AGE_S)})
            return await handler(request)

        return preflight

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer, streamed ones included (their headers go out at prepare)."""
        response.headers.add("Vary", "Origin")
        origin = self.allowed(request)
        if origin is None:
            return
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED


def install(app: web.Application, origins: Sequence[str]) -> None:
    """Answer CORS for `origins` (nothing at all when empty)."""
    if not origins:
        return
    cors = Cors(origins)
    app.middlewares.insert(0, cors.middleware())
    app.on_response_prepare.append(cors.on_prepare)


__all__ = ["EXPOSED", "HEADERS", "MAX_AGE_S", "METHODS", "Cors", "install"]
