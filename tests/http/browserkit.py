"""Real-browser tests of the local API (tests/http/test_http_browser_cors.py): Debian's
headless Chromium driven by Playwright for Python, and the tiny web app the browser
loads from an origin of its own (a local HTTP server on 127.0.0.1).

Playwright's own browser download (`playwright install`) is not used: the tests launch
the distribution's Chromium at `CHROMIUM` (scripts/test.sh installs it under CI). Without
it, or without the `playwright` package, the tests skip with a reason saying how to
install them, and tests/server_skips.py turns that skip into a failure under CI
(WAYSTATION_REQUIRE_BROWSER=1, set by scripts/test.sh): green there means they ran.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

from tests.ports import free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

CHROMIUM = os.environ.get("WAYSTATION_CHROMIUM", "/usr/bin/chromium")
INSTALL_HINT = ("apt-get install chromium (Debian's package; as root: "
                "DEBIAN_FRONTEND=noninteractive apt-get install -y chromium) and "
                "'bash scripts/bootstrap.sh dev' for the playwright package")
# As the machine's notes prescribe for a headless, root, network-less run: without the
# background-networking flags Chromium keeps trying to reach Google's hosts.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# The web app: what a field tablet's page would use to talk to the agent. `call` answers
# what the page can see of an answer (status, the headers CORS lets it read, the body),
# or the error fetch() threw (the browser blocked it). `startFeed` reads the SSE change
# feed with fetch() and a stream reader (docs/agent-api.md: EventSource cannot send
# Authorization) into `window.feedEvents`.
APP_JS = r"""
async function call(url, init) {
  try {
    const r = await fetch(url, init);
    const headers = {};
    r.headers.forEach((v, k) => { headers[k] = v; });
    const text = await r.text();
    let json = null;
    try { json = JSON.parse(text); } catch (e) { /* not JSON */ }
    return {status: r.status, headers, json, text};
  } catch (e) {
    return {error: e.name, message: String(e.message)};
  }
}

function startFeed(url, token, lastEventId) {
  window.feedEvents = [];
  window.feedError = null;
  window.feedStatus = null;
  window.feedAbort = new AbortController();
  const headers = {Authorization: 'Bearer ' + token};
  if (lastEventId !== null) headers['Last-Event-ID'] = lastEventId;
  (async () => {
    try {
      const r = await fetch(url, {headers, signal: window.feedAbort.signal});
      window.feedStatus = r.status;
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += value;
        let end;
        while ((end = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + 2);
          const ev = {};
          for (const line of block.split('\n')) {
            const i = line.indexOf(':');
            if (i <= 0) continue;  // a comment (keep-alive) or a blank line
            ev[line.slice(0, i)] = line.slice(i + 1).trimStart();
          }
          if (ev.data !== undefined) window.feedEvents.push(ev);
        }
      }
    } catch (e) {
      if (e.name !== 'AbortError') window.feedError = e.name + ': ' + e.message;
    }
  })();
}
"""
APP_HTML = ("<!doctype html><html><head><meta charset=utf-8><title>field app</title>"
            f"<script>{APP_JS}</script></head><body>field app</body></html>").encode()


class _AppHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(APP_HTML)))
        self.end_headers()
        self.wfile.write(APP_HTML)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def app_origin() -> Iterator[str]:
    """Serve the web app on 127.0.0.1:<a port of its own>; yields its origin."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _AppHandler)
    thread = threading.Thread(target=server.serve_forever, name="web-app", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def playwright() -> Iterator[Playwright]:
    """Playwright, for Debian's Chromium; skips (CI: fails) when either is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"chromium not found at {CHROMIUM}: {INSTALL_HINT}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip(f"chromium tests need the playwright package: {INSTALL_HINT}")
    with sync_playwright() as pw:
        yield pw


@contextmanager
def chromium(pw: Playwright, *extra_args: str) -> Iterator[Browser]:
    """Debian's Chromium, headless. Playwright gives it a new, empty profile of its own
    (--user-data-dir in a temp dir) and removes it on close."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args])
    try:
        yield browser
    finally:
        browser.close()


__all__ = ["APP_HTML", "CHROMIUM", "CHROMIUM_ARGS", "INSTALL_HINT", "app_origin", "chromium",
           "playwright"]
