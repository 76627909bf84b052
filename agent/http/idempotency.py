"""The `Idempotency-Key` header on the local API's writes (agent.idempotency).

`guard(route handler)` wraps a write route: without the header nothing changes. With
it, the key is checked (1..200 printable ASCII: else 422 `invalid_idempotency_key`),
and the request (method, raw path, sha256 of the body) is looked up under the app's
name and the key:

- recorded for this request: the first answer again (same status and body) with
  ``Idempotent-Replayed: true``; nothing is written, and the request is not checked
  again (it was when it was first made);
- recorded for another request: 422 `idempotency_key_reused`, naming what differs;
- not recorded: the handler runs; its write records the key and its answer in the
  write's own LMDB transaction (`once(request, answer)` gives it to the agent).

Two requests with one key at once: LMDB runs write transactions one after the other,
and the key is checked again inside the write's transaction, so the second waits for
the first's commit and gets its answer replayed (or runs, if the first failed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any

from aiohttp import web

from agent import idempotency
from agent.api import Agent
from agent.http.errors import ApiError, json_response
from agent.http.inputs import app_of
from agent.idempotency import Once, Replayed

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
_CLAIM: web.RequestKey[Once] = web.RequestKey("idempotency_claim", Once)

Answer = Callable[[Any], tuple[int, Any]]


def _unset(result: Any) -> tuple[int, Any]:  # pragma: no cover - replaced by `once`
    raise RuntimeError("an idempotent write was made without its answer")


def key_of(request: web.Request) -> str | None:
    """The request's Idempotency-Key, checked; None without one."""
    values = request.headers.getall(HEADER, [])
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(422, "invalid_idempotency_key",
                       f"send one {HEADER} header (got {len(values)})")
    raw = values[0]
    why = idempotency.check_key(raw)
    if why is not None:
        raise ApiError(422, "invalid_idempotency_key",
                       f"the {HEADER} header is not a valid key: {why}; send 1 to "
                       f"{idempotency.MAX_KEY_CHARS} printable ASCII characters (a UUID)")
    return raw


def once(request: web.Request, answer: Answer) -> Once | None:
    """The write's idempotency claim with the way its answer is made (None: no key)."""
    claim = request.get(_CLAIM)
    return None if claim is None else replace(claim, answer=answer)


def replay(status: int, answer: Any) -> web.Response:
    return json_response(answer, status=status, headers={REPLAYED: "true"})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guard(handler: Handler, agent: Agent,
          blocking: Callable[[Callable[[], Any]], Awaitable[Any]],
          keep_s: float, max_keys: int) -> Handler:
    """`handler` with the Idempotency-Key header honoured (see the module docstring)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        key = key_of(request)
        if key is None:
            return await handler(request)
        raw = await request.read() if request.body_exists else b""
        claim = Once(scope=app_of(request).app, key=key, method=request.method,
                     path=request.raw_path, body=idempotency.body_digest(raw), answer=_unset,
                     keep_ms=int(keep_s * 1000), max_keys=max_keys)
        found = await blocking(partial(agent.idempotent_answer, claim))
        if found is not None:
            return replay(*found)
        request[_CLAIM] = claim
        try:
            return await handler(request)
        except Replayed as again:  # the same key committed meanwhile (a parallel request)
            return replay(again.status, again.answer)

    return handle


__all__ = ["HEADER", "REPLAYED", "guard", "key_of", "once", "replay"]
