"""Queries and index upkeep on the device (issue 9 §2), beside raw LMDB in the same run.

    .venv/bin/python -m bench.query [--quick] [--records N] [--keep]

Two agent stores in one temporary directory on the agents' disk, filled with the same
N delivery tasks (~300 bytes each) through catch-up pages (`Sync.apply_page`, 1,000
records a page, as a device downloading its scope): "indexed" with the example schema's
indexes (tasks: [route, eta], [status, eta], [labels, eta], [customer]), "plain" with
none. Then:

- Query: ``status = "out"`` ordered by eta, 100 records (a quarter of the records match):
  p50/p99 in-process through `Agent.query`, the next page by cursor, a range query, a
  count; against the same answer by brute force (every record read, filtered, sorted:
  through `Agent.list`, and through a raw cursor over the views with orjson); and the
  raw LMDB floor: 100 gets by key with orjson in one read transaction, one cursor pass
  over every view without decoding.
- Index upkeep per write: `Agent.put` changing status and eta of existing records (so
  every index entry of the record moves), on the indexed store vs the plain one, rounds
  alternated; wall time (each put is a synced commit) and CPU time per put; beside a
  raw synced LMDB put of 300 bytes. And the catch-up fill rate of both stores.

Absolute figures depend on the host (its disk's fsync above all); the ratios are the
point. Results go to bench/results/query.json.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import orjson

from agent.api import Agent
from agent.view import ViewState
from bench.common import median, percentile, print_table, write_json
from bench.fleet import LoadMeter
from bench.raw import AGENT_LMDB_FLAGS
from schemas import wire
from schemas.collection import Catalog, example_catalog_path, parse_catalog
from waystation.config import AgentConfig

SCOPE = "route-42"
STATUSES = ("out", "delivered", "failed", "pending")
WORDS = ("north", "gate", "dock", "rear", "ring", "bell", "van", "crate", "fragile",
         "signed", "left", "porch", "office", "closed", "lunch", "call", "ahead")
QUERY: dict[str, Any] = {"collection": "tasks", "where": {"status": "out"},
                         "order_by": "eta", "limit": 100}


def catalogs() -> dict[str, Catalog]:
    """The example schema as it is ("indexed": 4 indexes on tasks), with only
    [status, eta] on tasks ("one"), and with no index at all ("plain")."""
    data = tomllib.loads(example_catalog_path().read_text())
    out = {"indexed": parse_catalog(data, "example (indexed)")}
    for body in data["collections"].values():
        body.pop("indexes", None)
    out["plain"] = parse_catalog(data, "example (no indexes)")
    data["collections"]["tasks"]["indexes"] = [["status", "eta"]]
    out["one"] = parse_catalog(data, "example (one index)")
    return out


def config(data_dir: Path) -> AgentConfig:
    return AgentConfig.model_validate({"device_id": "van-1", "data_dir": data_dir,
                                       "scopes": [SCOPE, "depot-7", "fleet"],
                                       "storage": {"map_size_mb": 256}})


def task(rng: random.Random, i: int, q: int) -> wire.Rec:
    notes = " ".join(rng.choice(WORDS) for _ in range(rng.randint(22, 34)))
    fields = {"route": SCOPE, "status": rng.choice(STATUSES),
              "eta": 1_750_000_000_000 + rng.randrange(86_400_000),
              "customer": f"{rng.choice(WORDS).title()} {rng.choice(WORDS).title()} {i}",
              "notes": notes}
    stamp = f"{0x0190_0000_0000 + q:012x}0000:van-7"
    return wire.Rec.model_validate({"c": "tasks", "k": f"t-{i:06d}", "s": SCOPE, "q": q,
                                    "f": fields, "h": {name: stamp for name in fields}})


def fill(ag: Agent, records: int, seed: int) -> float:
    """Load `records` tasks through catch-up pages; returns records/s."""
    rng = random.Random(seed)
    start = time.perf_counter()
    req = "fill"
    ag.sync.catchup_request(req)
    for first in range(0, records, 1000):
        recs = [task(rng, i, i + 1) for i in range(first, min(records, first + 1000))]
        ag.sync.apply_page(wire.Page.model_validate({
            "req": req, "s": SCOPE, "from": first, "to": first + len(recs), "reset": False,
            "more": first + len(recs) < records, "recs": recs}))
    return records / (time.perf_counter() - start)


def timed(fn: Callable[[], Any], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def brute_force_api(ag: Agent) -> list[str]:
    rows = [r for r in ag.list("tasks") if r.fields.get("status") == "out"]
    rows.sort(key=lambda r: (r.fields["eta"], r.key))
    return [r.key for r in rows[:100]]


def brute_force_raw(env: lmdb.Environment, db: Any) -> list[str]:
    hits = []
    with env.begin(db=db) as txn:
        for key, raw in txn.cursor():
            doc = orjson.loads(raw)
            if not doc["x"] and doc["f"].get("status") == "out":
                hits.append((doc["f"]["eta"], key))
    hits.sort()
    return [k.split(b"\0", 1)[1].decode() for _, k in hits[:100]]


def raw_gets(env: lmdb.Environment, db: Any, keys: list[bytes]) -> None:
    with env.begin(db=db) as txn:
        for key in keys:
            ViewState.from_doc("tasks", "", orjson.loads(txn.get(key)))


def raw_scan(env: lmdb.Environment, db: Any) -> int:
    with env.begin(db=db) as txn:
        return sum(1 for _ in txn.cursor().iternext(keys=True, values=True))


def raw_synced_puts(directory: Path, count: int) -> list[float]:
    path = directory / "raw.lmdb"
    env = lmdb.open(str(path), map_size=64 << 20, **AGENT_LMDB_FLAGS)  # as the agent writes
    value = os.urandom(150).hex().encode()
    out = []
    try:
        for i in range(count):
            start = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(i.to_bytes(8, "big"), value)
            out.append((time.perf_counter() - start) * 1000)
    finally:
        env.close()
    return out


def update_round(ag: Agent, rng: random.Random, records: int, count: int) -> tuple[
        list[float], float]:
    """`count` puts changing status and eta of random existing tasks: wall ms each, and
    CPU seconds for the round."""
    walls = []
    cpu = time.process_time()
    for _ in range(count):
        key = f"t-{rng.randrange(records):06d}"
        fields = {"status": rng.choice(STATUSES), "eta": 1_750_000_000_000 + rng.randrange(10**8)}
        start = time.perf_counter()
        ag.put("tasks", key, fields)
        walls.append((time.perf_counter() - start) * 1000)
    return walls, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 records, fewer runs")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    args = parser.parse_args(argv)
    records = args.records or (10_000 if args.quick else 100_000)
    runs = 60 if args.quick else 300
    puts = 100 if args.quick else 300
    cats = catalogs()
    root = Path(tempfile.mkdtemp(prefix="bench-query-", dir=Path(__file__).parent))
    results: dict[str, Any] = {"records": records, "query": QUERY}
    try:
        print(f"filling three stores with {records:,} tasks each ...", flush=True)
        agents = {name: Agent.open(config(root / name), cat) for name, cat in cats.items()}
        results["fill_records_per_s"] = {name: fill(ag, records, 1)
                                         for name, ag in agents.items()}
        indexed = agents["indexed"]

        # ------------------------------------------------------------ queries
        expected = brute_force_api(indexed)
        page = indexed.query(QUERY)
        assert [r.key for r in page.records] == expected, "indexed answer != brute force"
        assert page.index == "status,eta"
        # The raw figures read the same environment (LMDB opens one per process).
        env, db = indexed.store._env, indexed.store._dbs["view"]
        assert brute_force_raw(env, db) == expected
        sample = [b"tasks\0" + k.encode() for k in expected]
        eta_lo = 1_750_000_000_000 + 40_000_000
        range_q = {"collection": "tasks", "where": {"route": SCOPE, "eta": {"gte": eta_lo}},
                   "order_by": "eta", "limit": 100}
        meter = LoadMeter()
        timings = {
            "query_indexed": timed(lambda: indexed.query(QUERY), runs),
            "query_next_page": timed(lambda: indexed.query({**QUERY, "after": page.next}), runs),
            "query_range": timed(lambda: indexed.query(range_q), runs),
            "count_indexed": timed(lambda: indexed.count(QUERY), max(5, runs // 20)),
            "brute_force_api": timed(lambda: brute_force_api(indexed), 5),
            "brute_force_raw": timed(lambda: brute_force_raw(env, db), 5),
            "raw_100_gets": timed(lambda: raw_gets(env, db, sample), runs),
            "raw_scan_all": timed(lambda: raw_scan(env, db), 5),
        }
        results["load_queries"] = meter.result()
        results["matching"] = indexed.count(QUERY)
        results["query_ms"] = {name: {"p50": median(v), "p99": percentile(v, 99), "n": len(v)}
                               for name, v in timings.items()}

        # ------------------------------------------------------------- upkeep
        # Same random updates on each store, in short rounds whose order rotates, so
        # that the machine's noise falls on all of them alike.
        rngs = {name: random.Random(5) for name in agents}
        walls: dict[str, list[float]] = {name: [] for name in agents}
        cpu: dict[str, float] = dict.fromkeys(agents, 0.0)
        rounds = 30
        meter = LoadMeter()
        names = list(agents)
        for r in range(rounds):
            for name in names[r % 3:] + names[:r % 3]:
                w, c = update_round(agents[name], rngs[name], records, max(1, puts // rounds))
                walls[name] += w
                cpu[name] += c
        raw = raw_synced_puts(root, len(walls["plain"]))
        results["load_puts"] = meter.result()
        n_puts = len(walls["plain"])
        results["put_ms"] = {name: {"p50": median(v), "p99": percentile(v, 99), "n": len(v)}
                             for name, v in {**walls, "raw_lmdb_synced": raw}.items()}
        results["put_cpu_us"] = {name: cpu[name] / n_puts * 1e6 for name in cpu}
        for ag in agents.values():
            ag.close()
        results["store_mb"] = {name: _size(root / name) for name in agents}
    finally:
        if args.keep:
            print(f"stores kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report(results)
    write_json("query" if not args.quick else "query-quick", {
        **results, "versions": {"lmdb": lmdb.__version__, "orjson": orjson.__version__}})
    return 0


def _size(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / (1 << 20)


def report(r: dict[str, Any]) -> None:
    q = r["query_ms"]
    print_table(f"Query on {r['records']:,} records returning 100 ({r['matching']:,} match), "
                f"in-process, ms (other load {r['load_queries']['other_cores']:.2f} cores)",
                ["what", "p50", "p99", "runs"], [
        ["Agent.query: status = out, order by eta (index status,eta)",
         q["query_indexed"]["p50"], q["query_indexed"]["p99"], q["query_indexed"]["n"]],
        ["  next page (cursor)", q["query_next_page"]["p50"], q["query_next_page"]["p99"],
         q["query_next_page"]["n"]],
        ["  range: route = R, eta >= t, order by eta (index route,eta)",
         q["query_range"]["p50"], q["query_range"]["p99"], q["query_range"]["n"]],
        ["Agent.count: status = out (index entries only)", q["count_indexed"]["p50"],
         q["count_indexed"]["p99"], q["count_indexed"]["n"]],
        ["brute force: Agent.list + filter + sort", q["brute_force_api"]["p50"],
         q["brute_force_api"]["p99"], q["brute_force_api"]["n"]],
        ["brute force: raw cursor + orjson + filter + sort", q["brute_force_raw"]["p50"],
         q["brute_force_raw"]["p99"], q["brute_force_raw"]["n"]],
        ["raw LMDB: 100 gets by key + orjson, one txn", q["raw_100_gets"]["p50"],
         q["raw_100_gets"]["p99"], q["raw_100_gets"]["n"]],
        ["raw LMDB: cursor over every view, no decoding", q["raw_scan_all"]["p50"],
         q["raw_scan_all"]["p99"], q["raw_scan_all"]["n"]],
    ])
    p, cpu = r["put_ms"], r["put_cpu_us"]
    labels = {"plain": "no indexes", "one": "1 index (status,eta): 1 entry moves",
              "indexed": "4 indexes (example schema): 2 entries move"}

    def over(name: str) -> list[str]:
        return [f"{(p[name]['p50'] / p['plain']['p50'] - 1) * 100:+.1f} %",
                f"{(cpu[name] / cpu['plain'] - 1) * 100:+.1f} %"]

    print_table("Index upkeep per write: Agent.put changing status and eta of an existing "
                f"task (other load {r['load_puts']['other_cores']:.2f} cores)",
                ["put", "wall p50 ms", "wall p99 ms", "CPU µs / put", "upkeep (wall p50)",
                 "upkeep (CPU)"], [
        [labels["plain"], p["plain"]["p50"], p["plain"]["p99"], cpu["plain"], "", ""],
        [labels["one"], p["one"]["p50"], p["one"]["p99"], cpu["one"], *over("one")],
        [labels["indexed"], p["indexed"]["p50"], p["indexed"]["p99"], cpu["indexed"],
         *over("indexed")],
        ["raw LMDB synced put, 300 B", p["raw_lmdb_synced"]["p50"],
         p["raw_lmdb_synced"]["p99"], "", "", ""],
    ])
    f = r["fill_records_per_s"]
    print_table("Catch-up fill (apply_page, 1,000 records a page), records/s",
                ["store", "records/s", "store MB"],
                [[labels[name].split(":")[0], f[name], r["store_mb"][name]]
                 for name in ("plain", "one", "indexed")])


if __name__ == "__main__":
    raise SystemExit(main())
