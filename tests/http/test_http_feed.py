"""The change feed over HTTP: SSE with resume, JSON pages, limits on feed clients."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.api import Agent
from agent.http import feed, models
from agent.http.server import ApiServer
from schemas import wire
from schemas.collection import Catalog
from tests.agent.agentkit import rec
from tests.helpers import wait_until
from tests.http.httpkit import Client, issue, running_api
from waystation.config import AgentConfig

S = "route-42"


class Sse:
    """A raw SSE reader over the Unix socket (what any language's client does)."""

    def __init__(self, path: Path, token: str, target: str = "/v1/feed",
                 last_id: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        extra = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}"
                          f"\r\nAccept: text/event-stream\r\n{extra}\r\n".encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        self.status = int(head.split(b" ")[1])
        self.chunked = b"chunked" in head.lower()
        self.text = b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("feed closed")
        self.buf += data
        if not self.chunked:
            self.text += self.buf
            self.buf = b""
            return
        while True:  # de-chunk what is complete
            size_line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                return
            size = int(size_line, 16)
            if len(rest) < size + 2:
                return
            self.text += rest[:size]
            self.buf = rest[size + 2:]

    def events(self, count: int) -> list[dict[str, Any]]:
        """The next `count` feed events, each checked against the API's model."""
        return self.blocks(count, _feed_event)

    def blocks(self, count: int,
               check: Callable[[dict[bytes, bytes], dict[str, Any]], None]
               ) -> list[dict[str, Any]]:
        """The next `count` SSE events with data, each passed to `check(fields, doc)`."""
        out: list[dict[str, Any]] = []
        while len(out) < count:
            fields, doc = self.next_event()
            check(fields, doc)
            out.append(doc)
        return out

    def next_event(self) -> tuple[dict[bytes, bytes], dict[str, Any]]:
        """The next SSE event with data: its fields and its parsed data (comments skipped);
        ConnectionError once the stream has ended."""
        while True:
            while b"\n\n" not in self.text:
                self._more()
            block, _, self.text = self.text.partition(b"\n\n")
            fields = dict(line.split(b": ", 1) for line in block.split(b"\n")
                          if b": " in line and not line.startswith(b":"))
            if b"data" in fields:
                return fields, orjson.loads(fields[b"data"])

    def close(self) -> None:
        self.sock.close()


def _feed_event(fields: dict[bytes, bytes], doc: dict[str, Any]) -> None:
    assert int(fields[b"id"]) == doc["seq"] and fields[b"event"].decode() == doc["kind"]
    models.FeedEventOut.model_validate(doc)


def _path(server: ApiServer) -> Path:
    assert server.socket_path is not None
    return server.socket_path


def test_feed_streams_local_writes_then_resumes_after_reconnect(
        api: tuple[ApiServer, Agent], client: Client, token: str) -> None:
    """Events arrive as they happen; reconnecting with Last-Event-ID continues with
    nothing missed or repeated, even for writes made while disconnected."""
    server, agent = api
    feed = Sse(_path(server), token, "/v1/feed?since=0")
    assert feed.status == 200
    client.call("PATCH", "/v1/collections/tasks/records/t-1", {"fields": {"route": S}})
    [first] = feed.events(1)
    assert (first["kind"], first["key"], first["data"]) == ("local", "t-1",
                                                             {"change_ids": ["van-1:1"]})
    feed.close()
    client.call("PATCH", "/v1/collections/tasks/records/t-2", {"fields": {"route": S}})
    agent.sync.apply_ack(wire.Ack(ok=[(1, S, 1), (2, S, 2)]))
    again = Sse(_path(server), token, last_id=first["seq"])
    got = again.events(3)
    again.close()
    assert [(e["kind"], e["key"]) for e in got] == [("local", "t-2"), ("synced", "t-1"),
                                                   ("synced", "t-2")]
    assert [e["seq"] for e in got] == [first["seq"] + 1, first["seq"] + 2, first["seq"] + 3]
    assert got[1]["data"] == {"change_ids": ["van-1:1"]}


def test_feed_shows_connectivity_from_the_sync_loop(api: tuple[ApiServer, Agent],
                                                    token: str) -> None:
    """A link change recorded by the sync loop (another writer of the store) reaches a
    waiting feed client through the poller."""
    server, agent = api
    feed = Sse(_path(server), token)
    agent.sync.record_link("retrying", "cannot connect: [Errno 111] Connection refused", 4)
    [event] = feed.events(1)
    feed.close()
    assert event["kind"] == "retrying" and event["collection"] == ""
    assert event["data"]["code"] == "connection_refused" and event["data"]["retry_in_s"] == 4


def test_truncated_and_restarted_positions(api: tuple[ApiServer, Agent], client: Client,
                                           token: str) -> None:
    """Resuming from a pruned position says "truncated"; from a position beyond the
    store's newest (a re-created store) says "truncated"/"restarted" and starts over."""
    server, agent = api
    for i in range(3):
        client.call("PATCH", f"/v1/collections/tasks/records/t-{i}", {"fields": {"route": S}})
    agent.store.write(lambda tx: tx.delete("feed", (2).to_bytes(8, "big")))
    page = client.call("GET", "/v1/events?since=1").body
    assert [e["kind"] for e in page["events"]] == ["truncated", "local"]
    assert page["last"] == 3
    page = client.call("GET", "/v1/events?since=999").body
    assert page["events"][0]["kind"] == "truncated"
    assert page["events"][0]["data"] == {"after": 999, "reason": "restarted"}
    assert [e["seq"] for e in page["events"][1:]] == [1, 3]
    feed = Sse(_path(server), token, last_id=999)
    assert [e["kind"] for e in feed.events(3)] == ["truncated", "local", "local"]
    feed.close()


def test_json_long_poll_waits_for_the_next_event(api: tuple[ApiServer, Agent],
                                                 client: Client, token: str) -> None:
    """/v1/events?wait_s= returns as soon as an event exists after `since`."""
    server, agent = api
    import threading

    result: dict[str, Any] = {}
    poller = Client(_path(server), token)

    def poll() -> None:
        result["page"] = poller.call("GET", "/v1/events?since=0&wait_s=20").body

    thread = threading.Thread(target=poll)
    thread.start()
    agent.put("tasks", "t-9", {"route": S})
    thread.join(30)
    poller.close()
    assert [e["key"] for e in result["page"]["events"]] == ["t-9"]


def test_feed_clients_are_capped(api: tuple[ApiServer, Agent], token: str) -> None:
    """Past api.max_feed_clients, a feed request gets 503 with Retry-After; a closed
    feed frees its place."""
    server, _ = api
    feeds = [Sse(_path(server), token) for _ in range(server.cfg.api.max_feed_clients)]
    try:
        extra = Sse(_path(server), token)
        assert extra.status == 503
        extra.close()
        feeds.pop().close()
        wait_until(lambda: _try_feed(server, token), timeout=30)
    finally:
        for f in feeds:
            f.close()


def _long_poll(server: ApiServer, token: str, wait_s: float = 20) -> socket.socket:
    """A raw long poll, sent and not read (a client holding its request open)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(_path(server)))
    sock.sendall(f"GET /v1/events?wait_s={wait_s} HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {token}\r\n\r\n".encode())
    return sock


def _status(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(65536)
        if not chunk:
            break
        head += chunk
    return int(head.split(b" ")[1])


def test_long_polls_waiting_at_once_are_capped(api: tuple[ApiServer, Agent], token: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each waiting long poll holds a connection and a task: past MAX_WAITING_POLLS one
    more is answered 503 with Retry-After at once; a client that goes away frees its
    place (before: every one waited, as many as a client opened)."""
    server, _ = api
    assert server._hub is not None
    hub = server._hub
    monkeypatch.setattr(feed, "MAX_WAITING_POLLS", 3)
    polls = [_long_poll(server, token) for _ in range(3)]
    try:
        wait_until(lambda: hub.waiting_polls == 3, 10, message="three polls waiting")
        extra = _long_poll(server, token)
        assert _status(extra) == 503
        extra.close()
        polls.pop().close()
        wait_until(lambda: hub.waiting_polls == 2, 10, message="a gone poll's place freed")
        again = _long_poll(server, token, wait_s=0.2)
        assert _status(again) == 200
        again.close()
    finally:
        for sock in polls:
            sock.close()


def _try_feed(server: ApiServer, token: str) -> bool:
    f = Sse(_path(server), token)
    f.close()
    return f.status == 200


def test_a_reader_that_never_reads_is_dropped(cfg: AgentConfig, catalog: Catalog) -> None:
    """A feed client that stops reading holds at most a socket buffer and a bounded
    piece: the server's writes wait (backpressure), then it is dropped after
    feed_idle_timeout_s, freeing its place."""
    quick = cfg.model_copy(update={"api": cfg.api.model_copy(
        update={"feed_idle_timeout_s": 1.0})})
    token = issue(Path(cfg.data_dir))
    with running_api(quick, catalog) as (server, agent):
        stalled = Sse(_path(server), token, "/v1/feed?since=0")
        wait_until(lambda: server.feed_clients == 1, timeout=30)
        for batch in range(8):  # ~8,000 events, ~1 MB of SSE: more than socket buffers
            agent.sync.apply_delta(wire.Delta(d=[
                rec(f"t-{batch}-{i:04}-" + "k" * 60, 1 + batch * 1000 + i, {"route": S})
                for i in range(1000)]))
        wait_until(lambda: server.feed_clients == 0, timeout=60)
        stalled.close()
