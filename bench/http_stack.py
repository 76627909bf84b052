"""Which HTTP stack for the agent's local API: footprint of the candidates on the device.

Each candidate serves the same two routes on a Unix socket in its own process:
``POST /echo`` (parse a JSON body, answer JSON) and ``GET /ping``. Measured per stack:
- start time: process spawn -> the socket answers ``GET /ping`` (includes imports);
- RSS (total and anonymous) after 2,000 requests;
- latency of ``POST /echo`` with a 200-byte body over one keep-alive connection,
  p50/p99, and requests/s (one client, sequential).
The raw limit beside them: the same client against a bare asyncio server that answers
a fixed HTTP response without parsing anything (what the socket and the client cost).

Candidates: aiohttp (one app, any number of sites: Unix socket and TCP together) and
Starlette on uvicorn (the common ASGI pair). Absolute figures depend on the host.

    .venv/bin/python -m bench.http_stack [--requests 3000]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import percentile, print_table, write_json

SERVERS = {
    "raw-asyncio": """
import asyncio, sys
RESP = (b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\n"
        b"content-length: 11\\r\\n\\r\\n{\\"ok\\":true}")
async def handle(reader, writer):
    while True:
        head = await reader.readuntil(b"\\r\\n\\r\\n")
        n = 0
        for line in head.split(b"\\r\\n"):
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
        if n:
            await reader.readexactly(n)
        writer.write(RESP)
async def main():
    server = await asyncio.start_unix_server(handle, sys.argv[1])
    await server.serve_forever()
asyncio.run(main())
""",
    "aiohttp": """
import asyncio, sys, orjson
from aiohttp import web
async def echo(request):
    doc = orjson.loads(await request.read())
    return web.Response(body=orjson.dumps(doc), content_type="application/json")
async def ping(request):
    return web.Response(body=b'{"ok":true}', content_type="application/json")
app = web.Application()
app.router.add_post("/echo", echo)
app.router.add_get("/ping", ping)
web.run_app(app, path=sys.argv[1], print=None, access_log=None)
""",
    "starlette-uvicorn": """
import sys, orjson, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
async def echo(request):
    doc = orjson.loads(await request.body())
    return Response(orjson.dumps(doc), media_type="application/json")
async def ping(request):
    return Response(b'{"ok":true}', media_type="application/json")
app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/ping", ping)])
uvicorn.run(app, uds=sys.argv[1], log_level="warning", access_log=False,
            lifespan="off")
""",
}


class UnixHttp:
    """A minimal keep-alive HTTP/1.1 client over a Unix socket (same for every stack)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""

    def request(self, method: str, target: str, body: bytes = b"") -> bytes:
        head = (f"{method} {target} HTTP/1.1\r\nhost: local\r\n"
                f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n")
        self.sock.sendall(head.encode() + body)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head_raw, _, rest = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head_raw.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(rest) < length:
            rest += self._recv()
        self.buf = rest[length:]
        return rest[:length]

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()


def mem_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0])
    return out


def measure(name: str, code: str, requests: int, tmp: Path) -> dict[str, Any]:
    path = str(tmp / f"{name}.sock")
    script = tmp / f"server_{name.replace('-', '_')}.py"
    script.write_text(code)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(script), path])
    try:
        client = None
        while client is None:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}")
            try:
                client = UnixHttp(path)
                client.request("GET", "/ping")
            except OSError:
                client = None
                time.sleep(0.005)
        start_s = time.perf_counter() - started
        body = b'{"collection":"tasks","key":"t-1","fields":{"route":"route-42","note":"' + (
            b"x" * 120) + b'"}}'
        for _ in range(500):
            client.request("POST", "/echo", body)
        samples = []
        t0 = time.perf_counter()
        for _ in range(requests):
            s = time.perf_counter()
            client.request("POST", "/echo", body)
            samples.append(time.perf_counter() - s)
        elapsed = time.perf_counter() - t0
        mem = mem_kb(proc.pid)
        client.close()
        return {"stack": name, "start_ms": start_s * 1000, "rss_kb": mem["VmRSS"],
                "rss_anon_kb": mem["RssAnon"], "p50_us": percentile(samples, 50) * 1e6,
                "p99_us": percentile(samples, 99) * 1e6, "req_per_s": requests / elapsed}
    finally:
        proc.terminate()
        proc.wait(10)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("aiohttp", "starlette", "uvicorn", "orjson")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ws-http-") as tmp:
        for name, code in SERVERS.items():
            rows.append(measure(name, code, args.requests, Path(tmp)))
    print_table("HTTP stack footprint (Unix socket, one keep-alive client)",
                ["stack", "start ms", "RSS KiB", "anon KiB", "p50 µs", "p99 µs", "req/s"],
                [[r["stack"], r["start_ms"], r["rss_kb"], r["rss_anon_kb"], r["p50_us"],
                  r["p99_us"], r["req_per_s"]] for r in rows])
    write_json("http_stack", {"rows": rows, "versions": versions(),
                              "requests": args.requests, "pid": os.getpid()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
