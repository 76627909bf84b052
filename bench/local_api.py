"""The agent's local API: write latency over HTTP vs the Python API vs raw LMDB, write ->
feed event latency, and the API process's memory (idle, and with 100,000 records).

- raw LMDB: one durable put per write (a synced LMDB commit: the floor for any write);
- Python API: `Agent.put` (one durable transaction: view, outbox, feed);
- HTTP over the Unix socket and over loopback TCP: `PATCH /v1/collections/tasks/...`
  from this process to an `ApiServer` in its own process (a keep-alive connection);
- feed: an SSE client is connected; time from sending a write to its "local" event;
- memory: the API process's RSS (anonymous and file-backed) idle on an empty store, and
  after 100,000 records were written into the store (by deltas) and listed through it;
- query: `POST /v1/collections/tasks/query` over the socket returning 100 of the
  100,000 records through the (status, eta) index.
Absolute figures depend on the host; compare the rows of one run.

    .venv/bin/python -m bench.local_api [--writes 2000]
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

import lmdb
import orjson

from agent.api import Agent
from agent.http.auth import TokenStore
from bench.common import percentile, print_table, write_json
from bench.http_stack import mem_kb
from schemas import wire
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig

SERVER = """
import sys, time, signal
from agent.api import Agent
from agent.http.server import ApiServer
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig
cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": sys.argv[1],
                                  "scopes": ["route-42"], "api": {"tcp_port": int(sys.argv[2])}})
agent = Agent.open(cfg, load_catalog(example_catalog_path()))
server = ApiServer(cfg, agent)
server.start()
print("ready", flush=True)
signal.sigwait({signal.SIGTERM})
server.stop()
"""


class Http:
    """Keep-alive HTTP/1.1 over a Unix or TCP socket; returns (status, body)."""

    def __init__(self, sock: socket.socket, token: str) -> None:
        self.sock = sock
        self.token = token
        self.buf = b""

    def call(self, method: str, target: str, body: Any = None) -> tuple[int, bytes]:
        data = b"" if body is None else orjson.dumps(body)
        self.sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                          f"{self.token}\r\nContent-Type: application/json\r\nContent-Length: "
                          f"{len(data)}\r\n\r\n".encode() + data)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.buf = rest[length:]
        return int(head.split(b" ")[1]), rest[:length]


def unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


def tcp(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def stats(samples: list[float], elapsed: float) -> dict[str, float]:
    return {"p50_ms": percentile(samples, 50) * 1000, "p99_ms": percentile(samples, 99) * 1000,
            "writes_per_s": len(samples) / elapsed}


def timed(fn: Any, count: int) -> dict[str, float]:
    samples = []
    t0 = time.perf_counter()
    for i in range(count):
        s = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - s)
    return stats(samples, time.perf_counter() - t0)


STATUSES = ("out", "pending", "delivered", "failed")


def fields(i: int) -> dict[str, Any]:
    return {"route": "route-42", "status": STATUSES[i % 4], "eta": 1_750_000_000_000 + i,
            "notes": f"note {i} " + "x" * 100}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args(argv)
    catalog = load_catalog(example_catalog_path())
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ws-bench-") as tmp:
        root = Path(tmp)
        env = lmdb.open(str(root / "raw"), map_size=1 << 30, sync=True, metasync=False,
                        max_dbs=2)
        db = env.open_db(b"x")

        def raw_put(i: int) -> None:
            with env.begin(write=True, db=db) as txn:
                txn.put(f"k{i}".encode(), orjson.dumps(fields(i)))
            env.sync(True)

        rows["raw LMDB put (synced)"] = timed(raw_put, args.writes)
        cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": root / "py",
                                          "scopes": ["route-42"]})
        with Agent.open(cfg, catalog) as agent:
            rows["Python API put"] = timed(
                lambda i: agent.put("tasks", f"t-{i}", fields(i)), args.writes)
        data = root / "http"
        token, _ = TokenStore(data).add("bench", ["*"], ["*"])
        port = _free_port()
        proc = subprocess.Popen([sys.executable, "-c", SERVER, str(data), str(port)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            while (line := proc.stdout.readline()) and line.strip() != "ready":
                pass
            if not line:
                raise RuntimeError("the API server process did not start")
            idle = mem_kb(proc.pid)
            sock_client = Http(unix(data / "api.sock"), token)
            tcp_client = Http(tcp(port), token)
            sock_client.call("GET", "/v1/status")  # verifies the token once
            rows["HTTP put, Unix socket"] = timed(
                lambda i: _ok(sock_client.call("PATCH", f"/v1/collections/tasks/records/s-{i}",
                                               {"fields": fields(i)})), args.writes)
            rows["HTTP put, loopback TCP"] = timed(
                lambda i: _ok(tcp_client.call("PATCH", f"/v1/collections/tasks/records/p-{i}",
                                              {"fields": fields(i)})), args.writes)
            feed = _feed_latency(data / "api.sock", token, sock_client, args.writes // 4)
            _fill(AgentConfig.model_validate({"device_id": "van-1", "data_dir": data,
                                              "scopes": ["route-42"]}), catalog, args.records)
            after = ""
            listed = 0
            while True:
                _, body = sock_client.call(
                    "GET", f"/v1/collections/tasks/records?limit=1000&after={after}")
                recs = orjson.loads(body)["records"]
                if not recs:
                    break
                listed += len(recs)
                after = recs[-1]["key"]
            full = mem_kb(proc.pid)
            query = _query_latency(sock_client, args.writes // 4)
        finally:
            proc.terminate()
            proc.wait(20)
    py = rows["Python API put"]["p50_ms"]
    table = [[name, r["p50_ms"], r["p99_ms"], r["writes_per_s"], r["p50_ms"] / py]
             for name, r in rows.items()]
    print_table("Local write: HTTP vs Python API vs raw LMDB (durable, one at a time)",
                ["path", "p50 ms", "p99 ms", "writes/s", "p50 vs Python API"], table)
    print_table("Local write -> its event on the SSE feed",
                ["samples", "p50 ms", "p99 ms"], [[feed["n"], feed["p50_ms"], feed["p99_ms"]]])
    print_table(f"Query over the Unix socket: 100 of {listed:,} records through an index",
                ["samples", "p50 ms", "p99 ms", "matching records"],
                [[query["n"], query["p50_ms"], query["p99_ms"], query["matching"]]])
    print_table("API process memory (KiB)", ["state", "RSS", "anonymous", "file-backed"],
                [["idle, empty store", idle["VmRSS"], idle["RssAnon"], idle["RssFile"]],
                 [f"{listed:,} records listed", full["VmRSS"], full["RssAnon"],
                  full["RssFile"]]])
    write_json("local_api", {"writes": args.writes, "records": args.records, "rows": rows,
                             "feed": feed, "query": query,
                             "memory_kb": {"idle": idle, "records": full},
                             "listed": listed})
    return 0


def _ok(reply: tuple[int, bytes]) -> None:
    if reply[0] != 202:
        raise RuntimeError(f"write failed: {reply}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _feed_latency(path: Path, token: str, client: Http, count: int) -> dict[str, float]:
    feed = unix(path)
    feed.sendall(f"GET /v1/feed HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
                 .encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += feed.recv(65536)
    buf = buf.partition(b"\r\n\r\n")[2]
    samples = []
    for i in range(count):
        start = time.perf_counter()
        _ok(client.call("PATCH", f"/v1/collections/tasks/records/f-{i}",
                        {"fields": fields(i)}))
        needle = f'"key":"f-{i}"'.encode()
        while needle not in buf:
            buf += feed.recv(65536)
        samples.append(time.perf_counter() - start)
        buf = buf[buf.index(needle) + len(needle):]
    feed.close()
    return {"n": count, "p50_ms": percentile(samples, 50) * 1000,
            "p99_ms": percentile(samples, 99) * 1000}


def _query_latency(client: Http, count: int) -> dict[str, Any]:
    """POST .../query for 100 records of one status in eta order, through the
    (status, eta) index, starting at a different eta each time (no cached page)."""
    samples = []
    for i in range(count):
        start = time.perf_counter()
        status, body = client.call("POST", "/v1/collections/tasks/query", {
            "where": {"status": STATUSES[i % 4], "eta": {"gte": 1_750_000_000_000 + i * 37}},
            "order_by": "eta", "limit": 100})
        samples.append(time.perf_counter() - start)
        if status != 200 or len(orjson.loads(body)["records"]) != 100:
            raise RuntimeError(f"query failed: {status} {body[:200]!r}")
    _, body = client.call("POST", "/v1/collections/tasks/count",
                          {"where": {"status": STATUSES[0]}})
    return {"n": count, "p50_ms": percentile(samples, 50) * 1000,
            "p99_ms": percentile(samples, 99) * 1000,
            "matching": orjson.loads(body)["count"]}


def _fill(cfg: AgentConfig, catalog: Any, records: int) -> None:
    with Agent.open(cfg, catalog) as agent:
        for start in range(0, records, 1000):
            agent.sync.apply_delta(wire.Delta.model_validate({"d": [
                {"c": "tasks", "k": f"r-{i:06}", "s": "route-42", "q": i + 1, "part": False,
                 "f": fields(i), "h": {name: f"{0x0190_0000_0000 + i:012x}0000:van-7"
                                       for name in ("route", "status", "notes")}}
                for i in range(start, min(records, start + 1000))]}))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
