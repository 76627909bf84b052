"""The metrics endpoint's HTTP server, bounded against hostile clients.

prometheus_client's `start_http_server` runs a thread per connection with no timeout and
no limit: every connection that never sends its request (or sends it a byte a second)
holds a thread and a file descriptor for as long as it likes, and the endpoint sits on
an operator's network. Here:

- a connection has `metrics_timeout_s` in all to send its request head and take the
  answer (each read and write waits only for what is left of it), then it is closed;
- a request head is at most `MAX_HEAD_BYTES` (more: 431, closed); one request per
  connection (no keep-alive to hold);
- at most `metrics_max_connections` are served at once: one more closes the oldest
  (a scrape takes milliseconds: the oldest is the one stalling), so a flood delays an
  honest scrape by nothing but the flood's own accept rate.

    server = MetricsHttpServer(("127.0.0.1", 9108), registry, max_connections=16,
                               timeout_s=10.0)
    server.start()   ...   server.shutdown()
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import socketserver
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = structlog.get_logger("waystation.server.metrics")

MAX_HEAD_BYTES = 8192
"""A request's line and headers together (a scrape sends a few hundred bytes)."""
_LOG_EVERY_S = 10.0
_PATHS = ("/", "/metrics")


class _HeadTooLarge(Exception):
    pass


class _Conn(socketserver.BaseRequestHandler):
    server: MetricsHttpServer
    request: socket.socket

    def handle(self) -> None:
        deadline = time.monotonic() + self.server.timeout_s
        try:
            head = self._read_head(deadline)
        except _HeadTooLarge:
            self._send(deadline, 431, b"the request head is over 8192 bytes\n")
            return
        if head is None:
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._send(deadline, 400, b"not an HTTP request\n")
            return
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            self._send(deadline, 405, b"only GET and HEAD\n", {"Allow": "GET, HEAD"})
            return
        if urlsplit(target).path not in _PATHS:
            self._send(deadline, 404, b"the metrics are at /metrics\n")
            return
        encoder, ctype = choose_encoder(headers.get("accept", ""))
        body = encoder(self.server.registry)
        extra = {"Content-Type": ctype}
        if "gzip" in headers.get("accept-encoding", ""):
            body, extra["Content-Encoding"] = gzip.compress(body), "gzip"
        self._send(deadline, 200, body, extra, head_only=method == "HEAD")

    def _read_head(self, deadline: float) -> bytes | None:
        """The request's head; None when the client went away or ran out of time (closed
        without an answer). Raises _HeadTooLarge over MAX_HEAD_BYTES."""
        buf = b""
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEAD_BYTES:
                raise _HeadTooLarge
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.request.settimeout(left)
            try:
                chunk = self.request.recv(4096)
            except OSError:  # (a timeout, a reset, or closed by an eviction)
                return None
            if not chunk:
                return None
            buf += chunk
        head = buf.partition(b"\r\n\r\n")[0]
        if len(head) > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        return head

    def _send(self, deadline: float, status: int, body: bytes,
              headers: dict[str, str] | None = None, *, head_only: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found",
                  405: "Method Not Allowed", 431: "Request Header Fields Too Large"}[status]
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(body)}",
                 "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {"Content-Type": "text/plain"}).items()]
        out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        left = deadline - time.monotonic()
        if left <= 0:
            return
        self.request.settimeout(left)
        try:
            self.request.sendall(out if head_only else out + body)
        except OSError:
            return


class MetricsHttpServer(socketserver.ThreadingTCPServer):
    """See the module docstring."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry, *,
                 max_connections: int, timeout_s: float) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Conn)
        self.registry = registry
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._open: dict[socket.socket, float] = {}  # socket -> accepted at (monotonic)
        self.evicted = 0
        self._logged_at = 0.0
        self._thread: threading.Thread | None = None

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="metrics-http",
                                        daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        super().shutdown()
        self.server_close()
        with self._lock:
            for sock in self._open:
                _abort(sock)

    def process_request(self, request: Any, client_address: Any) -> None:
        victim = None
        with self._lock:
            if len(self._open) >= self.max_connections:
                victim = min(self._open, key=self._open.__getitem__)
                del self._open[victim]
                self.evicted += 1
            self._open[request] = time.monotonic()
        if victim is not None:
            _abort(victim)  # its thread's read fails at once; its thread closes it
            self._log_eviction()
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client's misbehaviour is not a traceback on stderr per connection.
        log.debug("metrics_request_failed", client=str(client_address[0]))

    def _log_eviction(self) -> None:
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning("metrics_connection_evicted", limit=self.max_connections,
                        evicted_total=self.evicted, setting="metrics_max_connections",
                        hint="more clients than metrics_max_connections connected at "
                             "once: the oldest was closed; raise it if several "
                             "Prometheus servers scrape")


def _abort(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # (already closed by its client)
        sock.shutdown(socket.SHUT_RDWR)


__all__ = ["MAX_HEAD_BYTES", "MetricsHttpServer"]
