"""The local write path beside plain LMDB on the same disk, in the same run.

    .venv/bin/python -m bench.write_path [--count N] [--rounds R] [--dir DIR] [--out NAME]

Issue 11 §1 goals, each as a ratio to the raw limit measured here:

- one writer: `Agent.put` p50 of a new ~300-byte task record (bench.device.record) vs a
  raw synced LMDB put of a 300-byte value opened as the agent opens its store
  (`bench.raw.AGENT_LMDB_FLAGS`: one fsync per commit; goal <= 1.5x), and vs the same
  with LMDB's extra meta-page flush (`synced_metasync`: two flushes, which is what a
  power-loss-durable commit costs);
- concurrent writers: 4 threads in one process, each putting its own records, total
  puts/s vs the raw one-put-per-commit rate (goal >= 3x: writes that arrive together
  share one durable commit).

Raw and agent rounds alternate (R rounds each) so drift in the machine's load hits both
alike; the median of the rounds is reported. The machine is shared: lead with ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import lmdb

from agent.api import Agent
from bench.common import percentile, print_table, write_json
from bench.device import record
from bench.raw import AGENT_LMDB_FLAGS
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig

CATALOG = load_catalog(example_catalog_path())
SCOPE = "route-42"
THREADS = 4


def raw_round(directory: Path, flags: dict[str, bool], count: int) -> dict[str, float]:
    value = b"v" * 300
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        env = lmdb.open(tmp, map_size=1 << 30, **flags)
        times = []
        start = time.perf_counter()
        for i in range(count):
            t = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(i.to_bytes(8, "big"), value)
            times.append(time.perf_counter() - t)
        total = time.perf_counter() - start
        env.close()
    return {"p50_ms": percentile(times, 50) * 1000, "p99_ms": percentile(times, 99) * 1000,
            "puts_s": count / total}


def _agent(directory: Path) -> Agent:
    data = Path(tempfile.mkdtemp(dir=directory))
    cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": str(data),
                                      "scopes": [SCOPE]})
    return Agent.open(cfg, CATALOG)


def agent_round(directory: Path, count: int, base: int) -> dict[str, float]:
    recs = [record(SCOPE, base + i) for i in range(count)]
    with _agent(directory) as agent:
        times = []
        start = time.perf_counter()
        for i, rec in enumerate(recs):
            t = time.perf_counter()
            agent.put("tasks", f"t-{base + i:07d}", rec)
            times.append(time.perf_counter() - t)
        total = time.perf_counter() - start
    return {"p50_ms": percentile(times, 50) * 1000, "p99_ms": percentile(times, 99) * 1000,
            "puts_s": count / total}


def concurrent_round(directory: Path, count: int, base: int) -> dict[str, float]:
    """THREADS threads, `count` puts each, all at once on one Agent."""
    per = [[record(SCOPE, base + t * count + i) for i in range(count)] for t in range(THREADS)]
    with _agent(directory) as agent:
        go = threading.Barrier(THREADS + 1)
        lat: list[float] = []
        lock = threading.Lock()

        def writer(t: int) -> None:
            mine = []
            go.wait()
            for i, rec in enumerate(per[t]):
                s = time.perf_counter()
                agent.put("tasks", f"t-{t}-{base + i:07d}", rec)
                mine.append(time.perf_counter() - s)
            with lock:
                lat.extend(mine)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        go.wait()
        start = time.perf_counter()
        for th in threads:
            th.join()
        total = time.perf_counter() - start
    return {"puts_s": THREADS * count / total, "p50_ms": percentile(lat, 50) * 1000,
            "p99_ms": percentile(lat, 99) * 1000}


def _med(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="puts per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--out", default="write_path")
    args = parser.parse_args(argv)
    rows: dict[str, list[dict[str, float]]] = {"raw_synced": [], "raw_synced_metasync": [],
                                               "agent_put": [], "agent_put_4_threads": []}
    for r in range(args.rounds):
        base = r * args.count * (THREADS + 1)
        rows["raw_synced"].append(raw_round(args.dir, AGENT_LMDB_FLAGS, args.count))
        rows["agent_put"].append(agent_round(args.dir, args.count, base))
        rows["raw_synced_metasync"].append(
            raw_round(args.dir, {"sync": True, "metasync": True}, args.count))
        rows["agent_put_4_threads"].append(concurrent_round(args.dir, args.count, base))
    med = {k: _med(v) for k, v in rows.items()}
    raw = med["raw_synced"]
    table = [[name, f"{m['p50_ms']:.3f}", f"{m['p99_ms']:.3f}", f"{m['puts_s']:.0f}",
              f"{m['p50_ms'] / raw['p50_ms']:.2f}x", f"{m['puts_s'] / raw['puts_s']:.2f}x"]
             for name, m in med.items()]
    print_table("Local writes beside raw synced LMDB (same run, same disk; median of "
                f"{args.rounds} rounds of {args.count})",
                ["path", "p50 ms", "p99 ms", "puts/s", "p50 / raw p50", "puts/s / raw"],
                table)
    out: dict[str, Any] = {"count": args.count, "rounds": args.rounds, "threads": THREADS,
                           "dir": str(args.dir), "rows": rows, "median": med,
                           "ratios": {"put_p50_vs_raw_p50": med["agent_put"]["p50_ms"]
                                      / raw["p50_ms"],
                                      "threads_puts_s_vs_raw": med["agent_put_4_threads"]
                                      ["puts_s"] / raw["puts_s"]}}
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
