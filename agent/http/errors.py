"""Errors of the local API: every failure answers JSON ``{status, code, message}``.

    ApiError(status, code, message)     raised by handlers and middleware
    agent errors -> `from_agent_error`:
        NotFound                 404 not_found
        WriteRefused/BadRequest  422 with the agent's code (unknown_field, ...);
                                 404 unknown_collection
        StorageFullError         507 storage_full
        QuotaReached             507 quota_reached
        StoreDamaged             503 storage_damaged
        StorageError             503 storage_unavailable
        DeviceMismatch, other    500 internal
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from agent.errors import (
    AgentError,
    BadRequest,
    NotFound,
    QuotaReached,
    StorageError,
    StorageFullError,
    StoreDamaged,
)

JSON = "application/json"


class ApiError(Exception):
    """An error answer: HTTP status, a stable code, and a message saying what to do."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def response(self) -> web.Response:
        return json_response({"status": self.status, "code": self.code,
                              "message": self.message}, status=self.status,
                             headers=self.headers)


def json_response(doc: Any, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    """One JSON document ending in a newline: `curl` (the README's first steps) prints
    each answer on its own line instead of run together with the next, or the prompt."""
    return web.Response(body=orjson.dumps(doc) + b"\n", status=status, content_type=JSON,
                        headers=headers)


def from_agent_error(exc: AgentError) -> ApiError:
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, BadRequest):
        # A collection named in the URL that the schema lacks is a resource that does
        # not exist; everything else is a request the agent understood and refused.
        return ApiError(404 if exc.code == "unknown_collection" else 422, exc.code, str(exc))
    if isinstance(exc, QuotaReached):
        return ApiError(507, "quota_reached", str(exc))
    if isinstance(exc, StorageFullError):
        return ApiError(507, "storage_full", str(exc))
    if isinstance(exc, StoreDamaged):
        return ApiError(503, "storage_damaged", str(exc))
    if isinstance(exc, StorageError):
        return ApiError(503, "storage_unavailable", str(exc))
    return ApiError(500, "internal", str(exc))


def schema_hint(err: ApiError, schema_version: Callable[[], int]) -> ApiError:
    """An unknown field is most often an app written for another schema version than the
    one the device took from the server since (a rename): say which one it runs."""
    if err.code == "unknown_field":
        hint = (f"; this device runs schema version {schema_version()} (GET /v1/status: "
                "schema_version): use that version's field names (docs/SCHEMA_EVOLUTION.md)")
        # A transaction's refusal ends with what it promises (TRANSACTIONS.md).
        head, sep, tail = err.message.rpartition("; nothing was written")
        err.message = (head + hint + sep + tail if sep and not tail
                       else err.message + hint)
    return err


__all__ = ["JSON", "ApiError", "from_agent_error", "json_response", "schema_hint"]
