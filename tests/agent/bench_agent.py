"""Micro-benchmarks of the agent's store (not collected by pytest).

    .venv/bin/python tests/agent/bench_agent.py [DIR ...]

For each DIR (default: a temporary directory on the disk holding /tmp, and /dev/shm
to show the pure-Python cost without fsync) it measures:

- µs per local put (each one durable synced LMDB commit),
- a raw LMDB synced commit of a similar size on the same disk (the floor),
- µs per change of applying one 500-change ack (one transaction), with and without
  fx states (counter totals) for every change.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import lmdb

from agent.api import Agent
from schemas import wire
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig

PUTS = 2000
ACK_SIZE = 500
ACK_ROUNDS = 4


def raw_commit_us(directory: Path, n: int = 500) -> float:
    env = lmdb.open(tempfile.mkdtemp(dir=directory), map_size=64 << 20, max_dbs=8, sync=True)
    dbs = [env.open_db(name) for name in (b"a", b"b", b"c", b"d")]
    start = time.perf_counter()
    for i in range(n):
        with env.begin(write=True) as txn:
            for db in dbs:
                txn.put(i.to_bytes(8, "big"), b"x" * 200, db=db)
    elapsed = time.perf_counter() - start
    env.close()
    return elapsed / n * 1e6


def bench(directory: Path) -> dict[str, float]:
    data = Path(tempfile.mkdtemp(dir=directory))
    cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": str(data),
                                      "scopes": ["route-42"]})
    catalog = load_catalog(example_catalog_path())
    out: dict[str, float] = {"raw_commit_us": raw_commit_us(directory)}
    with Agent.open(cfg, catalog) as agent:
        start = time.perf_counter()
        for i in range(PUTS):
            agent.put("tasks", f"t-{i:05d}", {"route": "route-42", "status": "out",
                                              "notes": "left at the door"})
        out["put_us"] = (time.perf_counter() - start) / PUTS * 1e6
        q = 0
        plain: list[float] = []
        with_fx: list[float] = []
        for rnd in range(ACK_ROUNDS):
            batch = agent.sync.next_batch(max_changes=ACK_SIZE, max_bytes=1 << 30)
            ok = []
            fx = []
            for n, ch in batch:
                q += 1
                ok.append((n, "route-42", q))
                if rnd % 2:
                    fx.append(wire.Rec(c=ch["c"], k=ch["k"], s="route-42", q=q, part=True,
                                       f={"attempts": 1}))
            message = wire.Ack(ok=ok, fx=fx)
            start = time.perf_counter()
            result = agent.sync.apply_ack(message)
            per_change = (time.perf_counter() - start) / len(result.applied) * 1e6
            (with_fx if fx else plain).append(per_change)
        out["ack500_us_per_change"] = statistics.mean(plain)
        out["ack500_fx_us_per_change"] = statistics.mean(with_fx)
        out["pending_after"] = agent.status().pending
    return out


def main() -> None:
    dirs = [Path(d) for d in sys.argv[1:]] or [Path(tempfile.gettempdir()), Path("/dev/shm")]
    for directory in dirs:
        if not directory.is_dir():
            continue
        result = bench(directory)
        print(f"{directory}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
