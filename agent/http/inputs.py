"""Reading a request: the app's rights, the JSON body as a pydantic model, path values."""

from __future__ import annotations

from typing import TypeVar
from urllib.parse import unquote_to_bytes

from aiohttp import web
from pydantic import BaseModel, ValidationError

from agent.http.auth import APP, AppToken
from agent.http.errors import JSON, ApiError

M = TypeVar("M", bound=BaseModel)


def app_of(request: web.Request) -> AppToken:
    app: AppToken = request[APP]
    return app


def need_read(request: web.Request, collection: str) -> None:
    app = app_of(request)
    if not app.can_read(collection):
        raise ApiError(403, "forbidden", f"app {app.app!r} may not read collection "
                                         f"{collection[:100]!r} (token --read)")


def need_write(request: web.Request, collection: str) -> None:
    app = app_of(request)
    if not app.can_write(collection):
        raise ApiError(403, "forbidden", f"app {app.app!r} may not write collection "
                                         f"{collection[:100]!r} (token --write)")


async def body(request: web.Request, model: type[M], *, optional: bool = False) -> M:
    if not request.body_exists:  # (can_read_body is False once read: agent.http.idempotency)
        if optional:
            return model()
        raise ApiError(422, "invalid", "this request needs a JSON body")
    ctype = request.content_type
    if ctype != JSON:
        raise ApiError(415, "unsupported_media_type",
                       f"send the body as {JSON} (got {ctype or 'no content type'!r})")
    raw = await request.read()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, "bad_json", f"the body is not valid JSON: "
                                            f"{first.get('ctx', {}).get('error', 'parse error')}"
                           ) from None
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "invalid", f"{where}: {first['msg']}") from None


def check_path(request: web.Request) -> None:
    """Refuse a path whose %XX bytes are not UTF-8 (once per request, before the
    handler: the server's errors middleware). The router leaves such a sequence
    undecoded, so "/records/%FF" would name the key "%FF", the same record as
    "/records/%25FF"."""
    raw = request.raw_path.partition("?")[0]
    if "%" in raw:
        try:
            unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(422, "invalid", "the path's percent-encoded bytes are not UTF-8: "
                                           "encode names (keys, collections, fields) as "
                                           "UTF-8 before percent-encoding them") from None


def path(request: web.Request, name: str) -> str:
    """A path parameter (its encoding was checked: `check_path`)."""
    return request.match_info[name]


__all__ = ["app_of", "body", "check_path", "need_read", "need_write", "path"]
