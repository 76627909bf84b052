"""CORS for browser apps (api.cors_origins, agent.http.cors), over loopback TCP with a
raw HTTP client (aiohttp): preflights, allowed, denied and hostile Origin values."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from agent.http.cors import EXPOSED, HEADERS, METHODS, Cors
from schemas.collection import Catalog
from tests.helpers import wait_until
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


def _raw(base: str, request: bytes, *, half_close: bool = False) -> bytes:
    """Send `request` on a new connection; everything the server answers until it closes."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), 10) as sock:
        if request:
            sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def test_refused_connections_answer_cors(cfg: AgentConfig, catalog: Catalog) -> None:
    """Over api.max_connections (every connection busy), the limiter's own answer carries
    CORS for an allowed Origin (a browser page can read the 503 and its Retry-After) and
    passes its preflight (204); another Origin, or no request at all, gets the plain 503."""
    limit = 1 + 256 + 16  # the least api.max_connections with max_feed_clients = 1
    cfg = cfg.model_copy(update={"api": cfg.api.model_validate(
        {**cfg.api.model_dump(), "max_feed_clients": 1, "max_connections": limit})})
    cfg = cfg.model_copy(update={"api": cfg.api.model_copy(update={"cors_origins": [GOOD]})})
    port = free_port()
    base, token = f"http://127.0.0.1:{port}", issue(Path(cfg.data_dir))
    with running_api(cfg, catalog, tcp_port=port) as (server, _), ExitStack() as stack:
        busy = (f"PATCH {T1} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                "Content-Length: 100\r\n\r\n{").encode()
        for _ in range(limit):
            stack.enter_context(socket.create_connection(("127.0.0.1", port), 10)).sendall(busy)
        wait_until(lambda: server.open_connections == limit, 10,
                   message=lambda: f"{server.open_connections} open of {limit}")
        get = b"GET /v1/status HTTP/1.1\r\nHost: x\r\n%s\r\n"
        answer = _raw(base, get % f"Origin: {GOOD}\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert f"\r\nAccess-Control-Allow-Origin: {GOOD}\r\n".encode() in answer
        assert f"\r\nAccess-Control-Expose-Headers: {EXPOSED}\r\n".encode() in answer
        assert b"\r\nRetry-After: 1\r\n" in answer and b'"too_many_connections"' in answer
        answer = _raw(base, (f"OPTIONS {T1} HTTP/1.1\r\nHost: x\r\nOrigin: {GOOD}\r\n"
                             "Access-Control-Request-Method: PATCH\r\n\r\n").encode())
        assert answer.startswith(b"HTTP/1.1 204 "), answer
        assert f"\r\nAccess-Control-Allow-Origin: {GOOD}\r\n".encode() in answer
        assert f"\r\nAccess-Control-Allow-Methods: {METHODS}\r\n".encode() in answer
        assert f"\r\nAccess-Control-Allow-Headers: {HEADERS}\r\n".encode() in answer
        for other in (b"Origin: https://evil.example\r\n",
                      f"Origin: {GOOD}\r\nOrigin: {GOOD}\r\n".encode()):
            answer = _raw(base, get % other)
            assert answer.startswith(b"HTTP/1.1 503 ") and b"Access-Control" not in answer, (
                other, answer)
        # Nothing sent (the client only half-closes): the plain 503 at once.
        answer = _raw(base, b"", half_close=True)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Access-Control" not in answer


def test_a_refusal_echoes_no_header_break() -> None:
    """The refused answer is written by hand: with "*" an Origin holding a CR (or any
    byte outside printable ASCII) is not echoed."""
    cors = Cors(["*"])
    head = b"GET / HTTP/1.1\r\nOrigin: https://a.example%s\r\n\r\n"
    ok = cors.refusal(head % b"")
    assert ok is not None and not ok.preflight
    assert ok.headers.startswith(b"Access-Control-Allow-Origin: https://a.example\r\n")
    for bad in (b"\rX-Injected: 1", b"\x00", "\u00e9".encode("latin-1")):
        assert cors.refusal(head % bad) is None, bad
