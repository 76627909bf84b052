"""Hostile HTTP clients against the agent's local API and the server's metrics endpoint:
the server process's fds, RSS and threads, and an honest client's latency, under
- thousands of idle connections (TCP and Unix socket) that never send a request;
- slowloris heads (a byte a second);
- 1,000 pipelined requests written at once without reading an answer;
- odd but legal requests (their status line and Content-Type are recorded).
Each server runs in its own process from `--src` (a checkout: compare main with a branch).
Not CI: big numbers, ~1 min.

    .venv/bin/python -m bench.http_hostile [--src /work/main] [--idle 3000] [--out NAME]
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

from bench.common import percentile, write_json

API = """
import sys, signal
from agent.api import Agent
from agent.http.auth import TokenStore
from agent.http.server import ApiServer
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig
cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": sys.argv[1],
                                  "scopes": ["route-42"], "api": {"tcp_port": int(sys.argv[2])}})
agent = Agent.open(cfg, load_catalog(example_catalog_path()))
token, _ = TokenStore(cfg.data_dir).add("bench", ["*"], ["*"])
server = ApiServer(cfg, agent)
server.start()
print("TOKEN", token, flush=True)
signal.sigwait({signal.SIGTERM})
server.stop()
"""

METRICS = """
import sys, signal
from broker.server.metrics import serve_metrics
class S:
    def metrics_snapshot(self): return {"connected": True}
server = serve_metrics(S(), int(sys.argv[1]))
print("ready", flush=True)
signal.sigwait({signal.SIGTERM})
server.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(*what: Any) -> None:
    print(time.strftime("%H:%M:%S"), *what, file=sys.stderr, flush=True)


def _proc_stats(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    vals = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")),
            "rss_kb": int(vals["VmRSS"].split()[0]), "threads": int(vals["Threads"])}


def _connect(addr: Any, family: int = socket.AF_INET) -> socket.socket | None:
    deadline = time.monotonic() + 2
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            sock.connect(addr)
            return sock
        except BlockingIOError:  # a Unix socket's backlog is full: retry until deadline
            sock.close()
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        except OSError:
            sock.close()
            return None


def _honest(addr: Any, request: bytes, n: int = 30,
            family: int = socket.AF_INET) -> dict[str, Any]:
    """n requests, each on a new connection: latency p50/p99 and how many got a 200."""
    lat, ok = [], 0
    for _ in range(n):
        started = time.monotonic()
        sock = _connect(addr, family)
        if sock is None:
            lat.append(2.0)
            continue
        try:
            sock.settimeout(5)
            sock.sendall(request)
            data = sock.recv(65536)
            ok += data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200")
        except OSError:
            pass
        finally:
            sock.close()
        lat.append(time.monotonic() - started)
    return {"ok": ok, "of": n, "p50_ms": round(percentile(lat, 50) * 1000, 1),
            "p99_ms": round(percentile(lat, 99) * 1000, 1)}


def _idle(addr: Any, n: int, family: int = socket.AF_INET) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = _connect(addr, family)
        if sock is not None:
            socks.append(sock)
    return socks


def _still_open(socks: list[socket.socket]) -> int:
    alive = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            alive += sock.recv(1) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


ODD = {
    "http10_no_host": b"GET /v1/status HTTP/1.0\r\nAuthorization: Bearer {t}\r\n\r\n",
    "expect_100": b"PATCH /v1/collections/tasks/records/k HTTP/1.1\r\nHost: x\r\n"
                  b"Authorization: Bearer {t}\r\nContent-Type: application/json\r\n"
                  b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n{{}}",
    "connection_close": b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                        b"Authorization: Bearer {t}\r\n\r\n",
    "chunked_write": b"PATCH /v1/collections/tasks/records/k HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer {t}\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n",
    "cl_and_te": b"POST /v1/sync/now HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                 b"Transfer-Encoding: chunked\r\nAuthorization: Bearer {t}\r\n\r\n0\r\n\r\n",
    "absolute_uri": b"GET http://localhost/v1/status HTTP/1.1\r\nHost: x\r\n"
                    b"Authorization: Bearer {t}\r\n\r\n",
    "options": b"OPTIONS /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n",
    "head": b"HEAD /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n",
    "trace": b"TRACE /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n",
    "long_url_unix": b"GET /v1/collections/tasks/records/" + b"k" * 8000
                     + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n",
    "huge_line": b"GET /v1/status?" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "many_headers": b"GET /v1/status HTTP/1.1\r\n" + b"X-A: 1\r\n" * 1000 + b"\r\n",
}


def _odd(path: str, token: str) -> dict[str, str]:
    out = {}
    for name, raw in ODD.items():
        sock = _connect(path, socket.AF_UNIX)
        assert sock is not None
        try:
            sock.settimeout(5)
            sock.sendall(raw.replace(b"{t}", token.encode()).replace(b"{{}}", b"{}"))
            data = sock.recv(65536)
            head = data.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            ctype = next((h for h in head if h.lower().startswith("content-type")), "")
            out[name] = f"{head[0]} | {ctype}"
        except OSError as exc:
            out[name] = f"{type(exc).__name__}"
        finally:
            sock.close()
    return out


def bench_api(src: Path, idle: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="wsh-") as tmp:
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-c", API, tmp, str(port)], cwd=src,
                                stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        try:
            line = ""
            while not line.startswith("TOKEN "):  # (the server logs to stdout first)
                line = proc.stdout.readline()  # type: ignore[union-attr]
                assert line, "the API process ended"
            token = line.split()[1]
            path = str(Path(tmp) / "api.sock")
            req = f"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}" \
                  "\r\n\r\n"
            _say("baseline")
            res["baseline"] = {**_proc_stats(proc.pid),
                               **_honest(("127.0.0.1", port), req.encode())}
            tcp = _idle(("127.0.0.1", port), idle)
            unix = _idle(path, idle, socket.AF_UNIX)
            time.sleep(1)
            _say("idle_flood")
            res["idle_flood"] = {"opened": len(tcp) + len(unix), **_proc_stats(proc.pid),
                                 **_honest(("127.0.0.1", port), req.encode()),
                                 "still_open": _still_open(tcp) + _still_open(unix)}
            for sock in tcp + unix:
                sock.close()
            slow = _idle(path, 200, socket.AF_UNIX)
            for sock in slow:
                sock.sendall(b"GET /v1/status HTTP/1.1\r\nX-")
            _say("slowloris_200")
            res["slowloris_200"] = {**_proc_stats(proc.pid),
                                    **_honest(path, req.encode(), family=socket.AF_UNIX)}
            for sock in slow:
                sock.close()
            pipe = _connect(path, socket.AF_UNIX)
            assert pipe is not None
            pipe.setblocking(False)
            sent = 0
            data = req.encode() * 1000
            deadline = time.monotonic() + 5
            while sent < len(data) and time.monotonic() < deadline:
                try:
                    sent += pipe.send(data[sent:])
                except BlockingIOError:
                    time.sleep(0.01)
            time.sleep(1)
            _say("pipelined_1000")
            res["pipelined_1000"] = {"bytes_accepted": sent, **_proc_stats(proc.pid),
                                     **_honest(path, req.encode(), family=socket.AF_UNIX)}
            pipe.close()
            _say("odd")
            res["odd"] = _odd(path, token)
        finally:
            proc.terminate()
            proc.wait(15)
    return res


def bench_metrics(src: Path, idle: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", METRICS, str(port)], cwd=src,
                            stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    try:
        while proc.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            pass
        req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        _say("baseline")
        res["baseline"] = {**_proc_stats(proc.pid), **_honest(("127.0.0.1", port), req)}
        socks = _idle(("127.0.0.1", port), idle)
        time.sleep(1)
        _say("idle_flood")
        res["idle_flood"] = {"opened": len(socks), **_proc_stats(proc.pid),
                             **_honest(("127.0.0.1", port), req),
                             "still_open": _still_open(socks)}
        for sock in socks:
            sock.close()
    finally:
        proc.terminate()
        proc.wait(15)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=Path.cwd())
    ap.add_argument("--idle", type=int, default=3000)
    ap.add_argument("--out", default="http_hostile")
    args = ap.parse_args()
    res = {"src": str(args.src), "api": bench_api(args.src, args.idle),
           "metrics": bench_metrics(args.src, args.idle)}
    import json
    print(json.dumps(res, indent=1))
    write_json(args.out, res)


if __name__ == "__main__":
    main()
