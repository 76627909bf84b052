"""CORS for browser apps (api.cors_origins) in a real browser: Debian's headless Chromium
(tests/http/browserkit.py) loads a web app from its own origin (127.0.0.1:<port A>) and
calls the agent's API on loopback TCP (127.0.0.1:<port B>) with fetch(), as a field
tablet's local web app would. tests/http/test_http_cors.py checks the headers with a raw
client; here the browser decides what the page may send and read."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web

from agent.api import Agent
from agent.http.cors import Cors
from agent.http.server import ApiServer
from schemas.collection import Catalog
from tests.helpers import wait_until
from tests.http.browserkit import app_origin, chromium, playwright
from tests.http.httpkit import issue, running_api
from tests.ports import free_port
from waystation.config import AgentConfig

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

T1 = "/v1/collections/tasks/records/t-1"


@dataclass
class Site:
    pw: Playwright
    browser: Browser
    origin: str
    """The web app's origin, listed in api.cors_origins."""
    other: str
    """Another origin (another port of the same host), not listed."""


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    """One browser and the two app origins for the whole module (a start costs ~1 s)."""
    with playwright() as pw, chromium(pw) as browser, app_origin() as origin, \
            app_origin() as other:
        yield Site(pw, browser, origin, other)


@dataclass
class Api:
    base: str
    token: str
    agent: Agent
    server: ApiServer


@contextmanager
def _api(cfg: AgentConfig, catalog: Catalog, origins: list[str],
         **api: Any) -> Iterator[Api]:
    cfg = cfg.model_copy(update={"api": cfg.api.model_copy(
        update={"cors_origins": origins, **api})})
    port = free_port()
    token = issue(Path(cfg.data_dir))
    with running_api(cfg, catalog, tcp_port=port) as (server, agent):
        yield Api(f"http://127.0.0.1:{port}", token, agent, server)


@contextmanager
def _page(site: Site, origin: str, browser: Browser | None = None,
          permissions: tuple[str, ...] = ()) -> Iterator[Page]:
    """A page of the web app at `origin`, in a context of its own (no preflight cache,
    no connections shared with other tests)."""
    context = (browser or site.browser).new_context()
    if permissions:
        context.grant_permissions(list(permissions), origin=origin)
    try:
        page = context.new_page()
        page.goto(origin + "/")
        yield page
    finally:
        context.close()


def _call(page: Page, url: str, init: dict[str, Any]) -> dict[str, Any]:
    """fetch(url, init) in the page: what the page can read of the answer, or
    {error, message} when fetch() threw."""
    result: dict[str, Any] = page.evaluate("([u, i]) => call(u, i)", [url, init])
    return result


def _write_init(token: str, fields: dict[str, Any], **headers: str) -> dict[str, Any]:
    return {"method": "PATCH", "body": json.dumps({"fields": fields}),
            "headers": {"Authorization": f"Bearer {token}",
                        "Content-Type": "application/json", **headers}}


def _record(agent: Agent, key: str) -> dict[str, Any] | None:
    rec = agent.get("tasks", key)
    return None if rec is None else rec.fields


def test_a_preflighted_write_and_a_read(site: Site, cfg: AgentConfig, catalog: Catalog,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """PATCH with Authorization and a JSON body (the browser preflights it): the write
    is in the store; GET reads it back; the page saw the real answers."""
    answered = _answered(monkeypatch)
    with _api(cfg, catalog, [site.origin]) as api, _page(site, site.origin) as page:
        got = _call(page, api.base + T1, _write_init(api.token, {"route": "route-42"}))
        assert got.get("status") == 202, got
        assert got["json"]["state"] == "pending"
        assert _record(api.agent, "t-1") == {"route": "route-42"}
        assert answered == [("OPTIONS", T1, 204), ("PATCH", T1, 202)], answered
        got = _call(page, api.base + T1, {"headers": {"Authorization": f"Bearer {api.token}"}})
        assert got.get("status") == 200, got
        assert got["json"]["fields"]["route"] == "route-42"


def _answered(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    """(method, path, status) of every answer of the agent's API started from now on:
    what reached the agent, in order (the CORS hook sees every answer the app sends)."""
    seen: list[tuple[str, str, int]] = []
    hook = Cors.on_prepare

    async def on_prepare(self: Cors, request: web.Request,
                         response: web.StreamResponse) -> None:
        seen.append((request.method, request.path_qs, response.status))
        await hook(self, request, response)

    monkeypatch.setattr(Cors, "on_prepare", on_prepare)
    return seen


def test_a_replayed_write_says_so_to_the_page(site: Site, cfg: AgentConfig,
                                              catalog: Catalog) -> None:
    """The same write sent twice with one Idempotency-Key (a retry after a lost answer):
    the second answer is the first one again, and the page can read the exposed
    Idempotent-Replayed header (the browser hides headers not exposed)."""
    with _api(cfg, catalog, [site.origin]) as api, _page(site, site.origin) as page:
        init = _write_init(api.token, {"route": "route-42", "notes": "n-7"},
                           **{"Idempotency-Key": "tab-1:w-1"})
        first = _call(page, api.base + T1, init)
        again = _call(page, api.base + T1, init)
        assert first.get("status") == 202 and again.get("status") == 202, (first, again)
        assert "idempotent-replayed" not in first["headers"], first
        assert again["headers"].get("idempotent-replayed") == "true", again
        # (the browser does hide what is not exposed: aiohttp's Server header)
        assert "server" not in again["headers"] and "date" not in again["headers"], again
        assert again["json"]["change_id"] == first["json"]["change_id"]
        assert api.agent.get("tasks", "t-1").pending == 1  # type: ignore[union-attr]


def test_errors_are_readable_json(site: Site, cfg: AgentConfig, catalog: Catalog) -> None:
    """What to fix reaches the page: 401 (wrong token), 422 (unknown field), 400 (bad
    JSON), 413 (a body over api.max_body_bytes) are answers the page reads as JSON, not
    a TypeError."""
    with _api(cfg, catalog, [site.origin], max_body_bytes=4096) as api, \
            _page(site, site.origin) as page:
        url = api.base + T1
        got = _call(page, url, _write_init("not-a-token", {"route": "r"}))
        assert got.get("status") == 401 and got["json"]["code"] == "unauthorized", got
        got = _call(page, url, _write_init(api.token, {"no_such_field": 1}))
        assert got.get("status") == 422 and got["json"]["code"] == "unknown_field", got
        got = _call(page, url, {**_write_init(api.token, {}), "body": "{not json"})
        assert got.get("status") == 400 and got["json"]["code"] == "bad_json", got
        got = _call(page, url, _write_init(api.token, {"route": "r" * 10_000}))
        assert got.get("status") == 413 and got["json"]["code"] == "body_too_large", got
        assert _record(api.agent, "t-1") is None


def test_a_page_of_another_origin_is_blocked(site: Site, cfg: AgentConfig,
                                            catalog: Catalog,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A page from an origin not listed (another port of the same host): its
    preflighted PATCH never leaves the browser (the preflight is refused), fetch()
    throws TypeError, nothing is written. A simple request (no preflight) does reach
    the agent, but without the token's header it is refused (401) and the page cannot
    read even that."""
    answered = _answered(monkeypatch)
    with _api(cfg, catalog, [site.origin]) as api, _page(site, site.other) as page:
        got = _call(page, api.base + T1,
                    _write_init(api.token, {"route": "route-42", "notes": "evil"}))
        assert got.get("error") == "TypeError", got
        assert answered == [("OPTIONS", T1, 405)], answered
        got = _call(page, api.base + T1 + "/increment",
                    {"method": "POST", "body": '{"field": "attempts", "amount": 1}',
                     "headers": {"Content-Type": "text/plain"}})
        assert got.get("error") == "TypeError", got
        assert answered[1:] == [("POST", T1 + "/increment", 401)], answered
        got = _call(page, api.base + "/v1/status",
                    {"headers": {"Authorization": f"Bearer {api.token}"}})
        assert got.get("error") == "TypeError", got
        assert answered[2:] == [("OPTIONS", "/v1/status", 405)], answered
        assert _record(api.agent, "t-1") is None


def test_the_feed_read_with_fetch_streaming(site: Site, cfg: AgentConfig,
                                            catalog: Catalog) -> None:
    """docs/agent-api.md: EventSource cannot send Authorization, so the page reads the
    SSE feed with fetch() and a stream reader: events arrive live, and a new stream
    with Last-Event-ID resumes after the last one seen."""
    with _api(cfg, catalog, [site.origin]) as api, _page(site, site.origin) as page:
        got = _call(page, api.base + T1, _write_init(api.token, {"route": "route-42"}))
        assert got.get("status") == 202, got
        page.evaluate("([u, t]) => startFeed(u, t, null)",
                      [api.base + "/v1/feed?since=0", api.token])
        page.wait_for_function("window.feedEvents.length >= 1 || window.feedError",
                               timeout=10_000)
        # A write while the stream is open arrives on it (live, not only the backlog).
        api.agent.put("tasks", "t-2", {"route": "route-42"})
        page.wait_for_function("window.feedEvents.length >= 2 || window.feedError",
                               timeout=10_000)
        events = page.evaluate("window.feedEvents")
        assert page.evaluate("[window.feedStatus, window.feedError]") == [200, None]
        assert [(e["event"], _data(e)["key"]) for e in events[:2]] == [
            ("local", "t-1"), ("local", "t-2")], events
        page.evaluate("window.feedAbort.abort()")
        page.evaluate("([u, t, id]) => startFeed(u, t, id)",
                      [api.base + "/v1/feed?since=0", api.token, events[0]["id"]])
        page.wait_for_function("window.feedEvents.length >= 1 || window.feedError",
                               timeout=10_000)
        resumed = page.evaluate("window.feedEvents")
        assert [_data(e)["key"] for e in resumed] == ["t-2"], resumed
        page.evaluate("window.feedAbort.abort()")


def test_the_feed_by_long_poll(site: Site, cfg: AgentConfig, catalog: Catalog) -> None:
    """The docs' other way: long-poll /v1/events (a plain fetch() per page)."""
    with _api(cfg, catalog, [site.origin]) as api, _page(site, site.origin) as page:
        auth = {"headers": {"Authorization": f"Bearer {api.token}"}}
        api.agent.put("tasks", "t-1", {"route": "route-42"})
        got = _call(page, api.base + "/v1/events?since=0&wait_s=5", auth)
        assert got.get("status") == 200, got
        assert [e["key"] for e in got["json"]["events"]] == ["t-1"], got


def test_too_many_feeds_is_readable_with_retry_after(site: Site, cfg: AgentConfig,
                                                     catalog: Catalog) -> None:
    """Over api.max_feed_clients the page reads the 503 and its exposed Retry-After (how
    long to wait before it opens the feed again)."""
    with _api(cfg, catalog, [site.origin], max_feed_clients=1) as api, \
            _page(site, site.origin) as page:
        page.evaluate("([u, t]) => startFeed(u, t, null)", [api.base + "/v1/feed", api.token])
        page.wait_for_function("window.feedStatus === 200 || window.feedError", timeout=10_000)
        wait_until(lambda: api.server.feed_clients == 1, message="the first feed is open")
        got = _call(page, api.base + "/v1/feed", {"headers": {"Authorization":
                                                               f"Bearer {api.token}"}})
        assert got.get("status") == 503, got
        assert got["json"]["code"] == "too_many_feed_clients"
        assert got["headers"].get("retry-after") == "5", got
        page.evaluate("window.feedAbort.abort()")


def _data(event: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(event["data"])
    return data


def test_too_many_connections_is_readable(site: Site, cfg: AgentConfig,
                                          catalog: Catalog) -> None:
    """Every one of api.max_connections is busy (requests whose bodies are still
    coming): a page's request is refused 503 too_many_connections, and the page reads
    that answer and its Retry-After (the refusal is written by the connection limiter,
    outside the app, so it needs CORS headers of its own, and the browser's preflight on
    a refused connection must pass); once the busy ones end, the page is served."""
    limit = 1 + 256 + 16  # the least api.max_connections with max_feed_clients = 1
    with _api(cfg, catalog, [site.origin], max_feed_clients=1,
              max_connections=limit) as api, _page(site, site.origin) as page, \
            ExitStack() as stack:
        host, port = api.base.removeprefix("http://").split(":")
        head = (f"PATCH {T1} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api.token}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{").encode()
        for _ in range(limit):
            sock = stack.enter_context(socket.create_connection((host, int(port)), 10))
            sock.sendall(head)
        wait_until(lambda: api.server.open_connections == limit, 10,
                   message=lambda: f"{api.server.open_connections} open of {limit}")
        auth = {"headers": {"Authorization": f"Bearer {api.token}"}}
        got = _call(page, api.base + "/v1/status", auth)
        assert got.get("status") == 503, got
        assert got["json"]["code"] == "too_many_connections", got
        assert got["headers"].get("retry-after") == "1", got
        stack.close()
        wait_until(lambda: api.server.open_connections <= 1, 10)
        got = _call(page, api.base + "/v1/status", auth)
        assert got.get("status") == 200, got


def test_a_page_from_another_host_needs_local_network_access(
        site: Site, cfg: AgentConfig, catalog: Catalog,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The web app served from another machine (here: the app's origin counted as a
    public address, --ip-address-space-overrides) calls the agent on the device's
    loopback: Chromium asks the user for "local network access" first (Local Network
    Access, Chrome 142+). Refused (headless: no one to ask), fetch() fails before
    anything reaches the agent; granted, the listed origin works as from loopback
    (docs/agent-api.md, "Browser apps (CORS)")."""
    answered = _answered(monkeypatch)
    public = f"--ip-address-space-overrides={site.origin.removeprefix('http://')}=public"
    with _api(cfg, catalog, [site.origin]) as api, chromium(site.pw, public) as browser:
        with _page(site, site.origin, browser) as page:
            got = _call(page, api.base + T1, _write_init(api.token, {"route": "route-42"}))
            assert got.get("error") == "TypeError", got
            assert answered == [] and _record(api.agent, "t-1") is None, answered
        with _page(site, site.origin, browser, ("local-network-access",)) as page:
            got = _call(page, api.base + T1, _write_init(api.token, {"route": "route-42"}))
            assert got.get("status") == 202, got
            assert answered == [("OPTIONS", T1, 204), ("PATCH", T1, 202)], answered
