"""CORS for browser apps (api.cors_origins, agent.http.cors), over loopback TCP with a
raw HTTP client (aiohttp): preflights, allowed, denied and hostile Origin values."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from agent.http.cors import EXPOSED, HEADERS, METHODS
from schemas.collection import Catalog
from tests.http.httpkit import issue, running_api
from tests.ports import free_port
from waystation.config import AgentConfig

GOOD = "https://tablet.example:8443"
T1 = "/v1/collections/tasks/records/t-1"
ACAO = "Access-Control-Allow-Origin"


@contextmanager
def _api(cfg: AgentConfig, catalog: Catalog, origins: list[str]) -> Iterator[tuple[str, str]]:
    cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update={"cors_origins": origins})})
    port = free_port()
    token = issue(Path(cfg.data_dir))
    with running_api(cfg, catalog, tcp_port=port):
        yield f"http://127.0.0.1:{port}", token


def _call(base: str, method: str, path: str, headers: dict[str, str] | list[tuple[str, str]],
          body: Any = None, *, first_line: bool = False) -> tuple[int, Any, bytes]:
    """(status, headers, body, or the first line of a stream)."""
    async def run() -> tuple[int, Any, bytes]:
        async with aiohttp.ClientSession() as session, session.request(
                method, base + path, headers=headers, json=body) as resp:
            data = (await resp.content.readline()) if first_line else await resp.read()
            return resp.status, resp.headers, data

    return asyncio.run(run())


def _preflight(origin: str, method: str = "PATCH") -> list[tuple[str, str]]:
    return [("Origin", origin), ("Access-Control-Request-Method", method),
            ("Access-Control-Request-Headers", "authorization,content-type,idempotency-key")]


def test_without_cors_origins_nothing_changes(cfg: AgentConfig, catalog: Catalog) -> None:
    """The default: no CORS header, a preflight is not answered."""
    with _api(cfg, catalog, []) as (base, token):
        status, headers, _ = _call(base, "GET", "/v1/status",
                                   {"Origin": GOOD, "Authorization": f"Bearer {token}"})
        assert status == 200 and ACAO not in headers and "Vary" not in headers
        status, headers, _ = _call(base, "OPTIONS", T1, _preflight(GOOD))
        assert status == 405 and ACAO not in headers


def test_an_allowed_origin_is_answered(cfg: AgentConfig, catalog: Catalog) -> None:
    """Preflight without a token (204, methods, headers, max-age); real answers, errors
    and the SSE feed carry the origin; the replay marker is exposed."""
    with _api(cfg, catalog, [GOOD, "http://localhost:3000"]) as (base, token):
        status, headers, body = _call(base, "OPTIONS", T1, _preflight(GOOD))
        assert status == 204 and body == b""
        assert headers[ACAO] == GOOD and "Origin" in headers.getall("Vary")
        assert headers["Access-Control-Allow-Methods"] == METHODS
        assert headers["Access-Control-Allow-Headers"] == HEADERS
        assert int(headers["Access-Control-Max-Age"]) > 0
        auth = {"Origin": GOOD, "Authorization": f"Bearer {token}"}
        write = {**auth, "Idempotency-Key": "w-1"}
        for expect in ("202", "replayed"):
            status, headers, _ = _call(base, "PATCH", T1, write, {"fields": {"route": "route-42"}})
            assert status == 202
            assert headers[ACAO] == GOOD and headers["Access-Control-Expose-Headers"] == EXPOSED
            if expect == "replayed":
                assert headers["Idempotent-Replayed"] == "true"
        # An error is readable by the page too (it says what to fix); no token: 401.
        status, headers, _ = _call(base, "GET", "/v1/status", {"Origin": GOOD})
        assert status == 401 and headers[ACAO] == GOOD
        status, headers, line = _call(base, "GET", "/v1/feed?since=0", auth, first_line=True)
        assert status == 200 and headers[ACAO] == GOOD and line
        status, headers, _ = _call(base, "GET", "/v1/status",
                                   {"Origin": "http://localhost:3000",
                                    "Authorization": f"Bearer {token}"})
        assert headers[ACAO] == "http://localhost:3000"


def test_other_and_hostile_origins_get_no_cors(cfg: AgentConfig, catalog: Catalog) -> None:
    """Not listed, a look-alike, "null", two Origin headers, a huge one: no CORS header;
    a preflight is not answered; a real request still needs (and works with) a token."""
    hostile: list[list[tuple[str, str]]] = [
        [("Origin", o)] for o in ("https://evil.example", GOOD + ".evil.example",
                                  "https://tablet.example", GOOD + "/", GOOD.upper(),
                                  "null", "x" * 8000)]
    hostile.append([("Origin", GOOD), ("Origin", "https://evil.example")])
    with _api(cfg, catalog, [GOOD]) as (base, token):
        for origin in hostile:
            status, headers, _ = _call(base, "OPTIONS", T1,
                                       [*origin, ("Access-Control-Request-Method", "PATCH")])
            assert status == 405 and ACAO not in headers, origin
            status, headers, _ = _call(base, "GET", "/v1/status",
                                       [*origin, ("Authorization", f"Bearer {token}")])
            assert status == 200 and ACAO not in headers, origin
            assert "Origin" in headers.getall("Vary")
        status, _, _ = _call(base, "GET", "/v1/status", {"Origin": GOOD})
        assert status == 401


def test_any_origin_only_when_listed(cfg: AgentConfig, catalog: Catalog) -> None:
    """"*" echoes any origin (never "*" itself, never "null")."""
    with _api(cfg, catalog, ["*"]) as (base, _):
        for origin in ("https://a.example", "http://localhost:5173"):
            status, headers, _ = _call(base, "OPTIONS", T1, _preflight(origin, "POST"))
            assert status == 204 and headers[ACAO] == origin
        status, headers, _ = _call(base, "GET", "/v1/status", {"Origin": "null"})
        assert ACAO not in headers


@pytest.mark.parametrize("bad", ["null", "https://a.example/", "tablet.example",
                                 "https://a.example/app", "HTTPS://A.example", ""])
def test_cors_origins_must_be_origins(bad: str) -> None:
    """A path, no scheme, upper case or "null" in api.cors_origins is a config error."""
    with pytest.raises(ValidationError, match="not a web origin"):
        AgentConfig.model_validate({"api": {"cors_origins": [bad]}})
    AgentConfig.model_validate({"api": {"cors_origins": ["*", GOOD, "http://[::1]:8080"]}})
