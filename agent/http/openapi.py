"""The local API's OpenAPI 3.1 document, generated from the route table and the pydantic
models the server itself validates with (`agent.http.routes`, `agent.http.models`).

    python -m agent.http.openapi            # rewrite docs/agent-api.openapi.json
    python -m agent.http.openapi --check    # exit 1 if the committed file is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from agent.http import models
from agent.http.idempotency import HEADER, REPLAYED
from agent.http.routes import ROUTES
from agent.idempotency import MAX_KEY_CHARS
from waystation import __version__

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "agent-api.openapi.json"
_REF = "#/components/schemas/{model}"
_REASONS = {400: "Malformed JSON", 401: "Missing or invalid app token",
            403: "The app's token has no right on this collection", 404: "Not found",
            405: "Method not allowed", 413: "Body too large", 415: "Body is not JSON",
            422: "Invalid request (the agent's error code says why)",
            503: "Too many feed clients, or the store is unavailable",
            507: "The device's storage is full"}
_WRITE_422 = ("Invalid request (the agent's error code says why; invalid_idempotency_key, "
              "idempotency_key_reused: see Idempotency-Key)")


_IDEMPOTENCY_KEY = {
    "name": HEADER, "in": "header", "required": False,
    "description": "Makes the write safe to send again (draft-ietf-httpapi-idempotency-key-"
                   "header): a new random key (a UUID) per write, the same key when the "
                   "same request is sent again after a lost answer. A repeat within "
                   "api.idempotency_keep_s (24 h) is answered with the first answer and "
                   f"{REPLAYED}: true, and writes nothing; the key with another method, "
                   "path or body is 422 idempotency_key_reused. Keys are the app's own "
                   "(per token name). A refused write keeps no key. docs/agent-api.md",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS,
               "pattern": "^[\\x20-\\x7e]+$"}}
_REPLAYED = {"description": "true: this is the answer to an earlier request with the same "
                            "Idempotency-Key; nothing was written now",
             "schema": {"type": "string", "enum": ["true"]}}


def _schemas() -> dict[str, Any]:
    wanted: list[type[BaseModel]] = [models.Error]
    for route in ROUTES:
        for model in (route.body, route.response):
            if model is not None and model not in wanted:
                wanted.append(model)
    keys = [(m, "validation" if any(r.body is m for r in ROUTES) else "serialization")
            for m in wanted]
    _, top = models_json_schema(keys, ref_template=_REF)  # type: ignore[arg-type]
    defs: dict[str, Any] = top.get("$defs", {})
    return dict(sorted(defs.items()))


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def build() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        op: dict[str, Any] = {"operationId": route.op_id, "summary": route.summary,
                              "tags": list(route.tags)}
        params = [{"name": p.name, "in": p.where, "required": p.required,
                   "description": p.description, "schema": p.schema} for p in route.params]
        if route.writes:
            params.append({"$ref": "#/components/parameters/IdempotencyKey"})
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {"required": route.method != "DELETE",
                                 "content": {"application/json": {"schema": _ref(route.body)}}}
        responses: dict[str, Any] = {}
        assert route.response is not None
        if route.stream is not None:
            responses["200"] = {"description": "A stream of events; each `data:` line is a "
                                               f"{route.response.__name__}",
                                "content": {route.stream: {"schema": {"type": "string"}}}}
        else:
            content = {"application/json": {"schema": _ref(route.response)}}
            replayed = ({"headers": {REPLAYED: {"$ref": "#/components/headers/Replayed"}}}
                        if route.writes else {})
            responses[str(route.status)] = {"description": "Success", "content": content,
                                            **replayed}
            if route.status == 202:
                responses["200"] = {"description": "Nothing to change (state unchanged)",
                                    "content": content, **replayed}
        for status in sorted({401, *route.errors, *((422,) if route.writes else ())}):
            reason = _WRITE_422 if route.writes and status == 422 else _REASONS[status]
            responses[str(status)] = {"description": reason, "content": {
                "application/json": {"schema": _ref(models.Error)}}}
        op["responses"] = dict(sorted(responses.items()))
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Waystation agent local API", "version": __version__,
                 "description": "The device agent's API for apps in any language. Served on "
                 "the Unix socket `api.sock` in the agent's data_dir and, when configured, "
                 "on loopback TCP (`api.tcp_port`). Every request carries an app token "
                 "(`waystation agent token add`). Writes answer 202 \"pending\" (saved "
                 "locally); the feed says when the server acknowledged them (\"synced\")."},
        "servers": [{"url": "http://localhost", "description": "via api.sock or loopback"}],
        "security": [{"appToken": []}],
        "paths": paths,
        "components": {"schemas": _schemas(),
                       "parameters": {"IdempotencyKey": _IDEMPOTENCY_KEY},
                       "headers": {"Replayed": _REPLAYED},
                       "securitySchemes": {"appToken": {"type": "http", "scheme": "bearer"}}},
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC_PATH.exists() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is stale: run python -m agent.http.openapi", file=sys.stderr)
            return 1
        return 0
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
