"""The metrics endpoint against hostile HTTP clients (broker.server.metrics_http): idle
floods, slowloris heads, huge heads. Threads and connections stay bounded and an honest
scrape keeps being answered."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from contextlib import ExitStack

from broker.server.metrics import serve_metrics
from tests.helpers import free_port, wait_until
from tests.server.test_metrics import _Counts
from tests.slowloris import send_head_slowly

LIMIT = 8


def _scrape(port: int) -> float:
    """An honest scrape: the metrics, within 2 s; returns its latency."""
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert "waystation_server_broker_connected 1.0" in resp.read().decode()
    return time.monotonic() - started


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_idle_flood_holds_bounded_threads_and_scrapes_are_answered() -> None:
    """200 connections that never send a request: the endpoint keeps at most
    metrics_max_connections of them (a thread each; the oldest are closed), and honest
    scrapes in between are answered promptly."""
    port = free_port()
    threads = threading.active_count()
    server = serve_metrics(_Counts(), port, max_connections=LIMIT, timeout_s=30.0)
    try:
        with ExitStack() as stack:
            idle = [stack.enter_context(_connect(port)) for _ in range(200)]
            wait_until(lambda: threading.active_count() <= threads + 1 + LIMIT, 10,
                       message=lambda: f"{threading.active_count() - threads} new threads")
            assert server.open_connections <= LIMIT
            assert idle[0].recv(1) == b""  # the oldest was closed to make room
            latencies = sorted(_scrape(port) for _ in range(10))
            assert latencies[-1] < 2.0, latencies
            wait_until(lambda: threading.active_count() <= threads + 1 + LIMIT, 10)
    finally:
        server.shutdown()


def test_slowloris_head_is_closed_after_the_timeout() -> None:
    """A head sent a byte at a time (each byte well within any per-read timeout) is cut
    off metrics_timeout_s after the connection opened."""
    port = free_port()
    server = serve_metrics(_Counts(), port, max_connections=LIMIT, timeout_s=1.0)
    try:
        with _connect(port) as slow:
            started = time.monotonic()
            closed = send_head_slowly(slow, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: "
                                      + b"a" * 200)
            assert closed, "a head sent a byte at a time kept its connection"
            assert time.monotonic() - started < 4
        _scrape(port)
    finally:
        server.shutdown()


def test_head_over_the_limit_is_431_and_closed() -> None:
    """A 20 KB header (http.server took up to 64 KiB a line, 100 lines): 431, closed."""
    port = free_port()
    server = serve_metrics(_Counts(), port, max_connections=LIMIT, timeout_s=5.0)
    try:
        with _connect(port) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000
                         + b"\r\n\r\n")
            raw = b""
            while chunk := sock.recv(65536):
                raw += chunk
        assert raw.startswith(b"HTTP/1.1 431 "), raw[:200]
        for method, status in (("POST", b"405"), ("TRACE", b"405")):
            with _connect(port) as sock:
                sock.sendall(f"{method} /metrics HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert sock.recv(65536).split(b" ")[1] == status
        _scrape(port)
    finally:
        server.shutdown()
