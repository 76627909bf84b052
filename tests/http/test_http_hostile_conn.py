"""Hostile HTTP connections to the local API (agent.http.conn_limits): idle floods,
slowloris heads and bodies, heads over the parser's limits. Each is bounded, answered
as JSON where an answer is possible, and an honest client keeps being served."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.http.server import ApiServer
from schemas.collection import Catalog
from tests.helpers import free_port, wait_until
from tests.http.httpkit import Client, issue, running_api
from tests.slowloris import send_head_slowly
from waystation.config import AgentConfig

LIMIT = 1 + 256 + 16  # the least api.max_connections with max_feed_clients = 1


def _capped(cfg: AgentConfig, **api: Any) -> AgentConfig:
    return cfg.model_copy(update={"api": cfg.api.model_validate(
        {**cfg.api.model_dump(), "max_feed_clients": 1, "max_connections": LIMIT, **api})})


@contextmanager
def _serving(cfg: AgentConfig, catalog: Catalog, **api: Any) -> Iterator[tuple[ApiServer, str]]:
    with running_api(_capped(cfg, **api), catalog) as pair:
        yield pair[0], issue(Path(cfg.data_dir))


@pytest.fixture
def served(cfg: AgentConfig, catalog: Catalog) -> Iterator[tuple[ApiServer, str]]:
    with _serving(cfg, catalog) as pair:
        yield pair


def _unix(server: ApiServer, timeout: float = 10.0) -> socket.socket:
    assert server.socket_path is not None
    path = str(server.socket_path)

    def connect() -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BlockingIOError:  # the listen backlog is full: the server has to accept
            sock.close()
            return None
        return sock

    return wait_until(connect, timeout, message="connecting to the API socket")


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (fails the test if it never does)."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _json_answer(raw: bytes) -> tuple[int, dict[str, Any], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), raw[:500]
    return status, orjson.loads(body), head


def _status_ok(server: ApiServer, token: str) -> float:
    """An honest request on a new connection: 200; returns its latency."""
    started = time.monotonic()
    honest = Client(server.socket_path, token)  # type: ignore[arg-type]
    try:
        assert honest.call("GET", "/v1/status").status == 200
    finally:
        honest.close()
    return time.monotonic() - started


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_idle_connection_flood_is_bounded_and_honest_clients_are_served(
        served: tuple[ApiServer, str]) -> None:
    """Twice api.max_connections connections that never send a byte: the server holds at
    most max_connections of them (the longest idle are closed to make room, their clients
    see EOF), its fds stay bounded, and a new honest client is answered quickly."""
    server, token = served
    before = _fds()
    with ExitStack() as stack:
        idle = [stack.enter_context(_unix(server)) for _ in range(2 * LIMIT)]
        # The server's side: at most LIMIT sockets besides our 2*LIMIT clients' ends.
        wait_until(lambda: _fds() - before <= 2 * LIMIT + LIMIT + 8, 10,
                   message=lambda: f"{_fds() - before} new fds, {2 * LIMIT} of them ours")
        wait_until(lambda: server.open_connections == LIMIT, 10,
                   message=lambda: f"{server.open_connections} open, limit {LIMIT}")
        # The first ones were the longest idle: the server closed them.
        idle[0].settimeout(5)
        assert idle[0].recv(1) == b""
        latencies = sorted(_status_ok(server, token) for _ in range(20))
        assert latencies[-1] < 2.0, latencies
        assert server.open_connections <= LIMIT


def test_all_busy_connections_answer_newcomers_503_json(served: tuple[ApiServer, str],
                                                        ) -> None:
    """When every open connection is busy (requests whose bodies are still coming), a
    new connection is answered 503 too_many_connections as JSON with Retry-After and
    closed; once they end, honest clients are served again."""
    server, token = served
    head = (f"PATCH /v1/collections/tasks/records/t-1 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100\r\n\r\n{{").encode()
    with ExitStack() as stack:
        busy = [stack.enter_context(_unix(server)) for _ in range(LIMIT)]
        for sock in busy:
            sock.sendall(head)
        wait_until(lambda: server.open_connections == LIMIT, 10)
        late = stack.enter_context(_unix(server))
        late.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body, head_out = _json_answer(_read_all(late))
        assert status == 503 and body["code"] == "too_many_connections", body
        assert "api.max_connections" in body["message"]
        assert b"retry-after: 1" in head_out.lower()
        for sock in busy:
            sock.close()
    wait_until(lambda: server.open_connections == 0, 10)
    _status_ok(server, token)


def test_silent_and_slowloris_connections_are_closed_after_idle_timeout(
        cfg: AgentConfig, catalog: Catalog) -> None:
    """A connection that sends nothing, and one that sends its head a byte at a time
    (never completing it), are both closed about api.idle_timeout_s after they opened."""
    with (_serving(cfg, catalog, idle_timeout_s=1.0) as (server, token),
          _unix(server) as silent, _unix(server) as slow):
        started = time.monotonic()
        closed = send_head_slowly(slow, b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Pad: "
                                  + b"a" * 200)
        assert closed, "a head sent one byte at a time kept its connection open"
        assert time.monotonic() - started < 5
        assert silent.recv(1) == b""
        _status_ok(server, token)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_body_that_never_ends_is_408_json(cfg: AgentConfig, catalog: Catalog, framing: str,
                                          ) -> None:
    """A body announced by Content-Length and never sent, and a chunked body whose chunks
    keep coming slowly without its end: 408 body_timeout (JSON) after api.body_timeout_s,
    and the connection is closed; nothing is written."""
    with _serving(cfg, catalog, body_timeout_s=1.0) as (server, token):
        _never_ending_body(server, token, framing)


def _never_ending_body(server: ApiServer, token: str, framing: str) -> None:
    frame = ("Content-Length: 1000\r\n" if framing == "length"
             else "Transfer-Encoding: chunked\r\n")
    with _unix(server) as sock:
        sock.sendall((f"PATCH /v1/collections/tasks/records/t-1 HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                      f"{frame}\r\n").encode())
        started = time.monotonic()
        sock.settimeout(0.25)
        raw = b""
        while time.monotonic() - started < 10:
            if framing == "chunked":
                with_chunk = b"1\r\n \r\n"
                try:
                    sock.sendall(with_chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            raw += chunk
        status, body, _ = _json_answer(raw)
        assert status == 408 and body["code"] == "body_timeout", body
        assert "api.body_timeout_s" in body["message"]
        assert time.monotonic() - started < 6
    r = Client(server.socket_path, token)  # type: ignore[arg-type]
    try:
        assert r.call("GET", "/v1/collections/tasks/records/t-1").status == 404
    finally:
        r.close()


@pytest.mark.parametrize("head", [
    b"GET /v1/status?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: 1\r\n" % i for i in range(150)) + b"\r\n",
    # request smuggling: both framings at once
    b"POST /v1/sync/now HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /v1/status HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
], ids=["long-line", "long-header", "many-headers", "cl-and-te", "malformed"])
def test_heads_the_parser_refuses_get_json_400_and_close(served: tuple[ApiServer, str],
                                                         head: bytes) -> None:
    """Heads over aiohttp's limits or that smuggle are answered 400 as the API's JSON
    {status, code, message} (not aiohttp's text/plain page) and the connection closes."""
    server, token = served
    with _unix(server) as sock:
        sock.sendall(head)
        status, body, _ = _json_answer(_read_all(sock))
    assert status == 400 and body["status"] == 400 and body["code"] == "bad_request", body
    assert body["message"]
    _status_ok(server, token)


def test_answer_never_read_is_cut_after_send_timeout(cfg: AgentConfig,
                                                     catalog: Catalog) -> None:
    """A client that asks for a big answer (2 MB of records) and never reads it: the
    connection (and the answer's bytes held for it) is closed after api.send_timeout_s,
    so the client, reading at last, gets less than the announced Content-Length."""
    with running_api(_capped(cfg, send_timeout_s=1.0), catalog) as (server, agent):
        token = issue(Path(cfg.data_dir))
        for i in range(40):
            agent.put("tasks", f"t-{i:03}", {"route": "route-42", "proof": "p" * 50_000})
        with _unix(server) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            wait_until(lambda: server.open_connections == 1, 10)  # (accepted)
            sock.sendall(f"GET /v1/collections/tasks/records?limit=1000 HTTP/1.1\r\n"
                         f"Host: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
            wait_until(lambda: server.open_connections == 0, 10,
                       message="the connection of a client that never reads to close")
            raw = _read_all(sock)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        assert length > 2_000_000 and len(body) < length
        _status_ok(server, token)


def test_tcp_and_unix_connections_share_the_limit(cfg: AgentConfig, catalog: Catalog,
                                                  ) -> None:
    """Idle connections over loopback TCP count with the Unix socket's against
    api.max_connections: a TCP flood makes room (over TCP too) for honest clients on
    either."""
    port = free_port()
    with (running_api(_capped(cfg), catalog, tcp_port=port) as (server, _),
          ExitStack() as stack):
        token = issue(Path(cfg.data_dir))
        idle = [stack.enter_context(socket.create_connection(("127.0.0.1", port), 10))
                for _ in range(LIMIT + 20)]
        wait_until(lambda: server.open_connections == LIMIT, 10,
                   message=lambda: f"{server.open_connections} open, limit {LIMIT}")
        assert idle[0].recv(1) == b""  # the longest idle closed to make room
        _status_ok(server, token)
        with socket.create_connection(("127.0.0.1", port), 10) as honest:
            honest.sendall(f"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                           f"Authorization: Bearer {token}\r\n\r\n".encode())
            assert _read_all(honest).startswith(b"HTTP/1.1 200 ")
        assert server.open_connections <= LIMIT
