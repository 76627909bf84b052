"""Fetch over the local API: bring records back from the server (`Agent.fetch`).

    POST /v1/collections/{c}/fetch   {"keys": [...], "wait_s": 5}
                                     -> {collection, records, waiting, missing}

Records evicted by retention (or never held) are asked for by key; the request is kept
on the device until the server answers (PROTOCOL.md §7.14). `wait_s` says how long the
call waits for the answer (at most 30 s, and not at all while no sync loop runs); keys
not answered by then are `waiting`.
Reading the collection is the right needed: a fetch only restores the server's data.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from agent.http import inputs
from agent.http.errors import json_response
from agent.http.models import RecordOut
from schemas.wire import MAX_FETCH_KEYS

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


__all__ = ["FetchBody", "FetchOut", "fetch_records"]
