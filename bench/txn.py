"""Transactions on the device: what writing N records as ONE transaction costs, next to
N single writes and to the raw limit (N puts in one synced LMDB commit).

- raw LMDB: N puts in one write transaction, then the same durable flush the agent does
  (data + meta page): the floor for writing N records durably together;
- one transaction: `with agent.transaction() as tx:` with N puts (one durable commit);
- N single writes: N `Agent.put` calls (N durable commits), which are NOT atomic;
- HTTP: `POST /v1/txn` with the same N puts, over the Unix socket, to an `ApiServer`
  in this process (its own thread).
Absolute figures depend on the host; compare the rows of one run.

    .venv/bin/python -m bench.txn [--rounds 200] [--size 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import orjson

from agent.api import Agent
from agent.http.auth import TokenStore
from agent.http.server import ApiServer
from bench.common import percentile, print_table, write_json
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig


def fields(i: int) -> dict[str, Any]:
    return {"route": "route-42", "status": "out", "notes": f"line {i}", "eta": i}


def timed(fn: Callable[[int], object], rounds: int) -> dict[str, float]:
    samples: list[float] = []
    for r in range(rounds):
        t0 = time.perf_counter()
        fn(r)
        samples.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": percentile(samples, 50), "p99_ms": percentile(samples, 99),
            "per_s": rounds / (sum(samples) / 1000)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--size", type=int, default=10, help="records per transaction")
    args = parser.parse_args(argv)
    size = args.size
    catalog = load_catalog(example_catalog_path())
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ws-bench-txn-") as tmp:
        root = Path(tmp)
        env = lmdb.open(str(root / "raw"), map_size=1 << 30, sync=True, metasync=False,
                        max_dbs=2)
        db = env.open_db(b"x")

        def raw(r: int) -> None:
            with env.begin(write=True, db=db) as txn:
                for i in range(size):
                    txn.put(f"k{r}-{i}".encode(), orjson.dumps(fields(i)))
            env.sync(True)

        rows[f"raw LMDB: {size} puts, one synced commit"] = timed(raw, args.rounds)
        env.close()
        cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": root / "py",
                                          "scopes": ["route-42"]})
        with Agent.open(cfg, catalog) as agent:
            def one_txn(r: int) -> None:
                with agent.transaction() as tx:
                    for i in range(size):
                        tx.put("tasks", f"x-{r}-{i}", fields(i))

            def singles(r: int) -> None:
                for i in range(size):
                    agent.put("tasks", f"s-{r}-{i}", fields(i))

            rows[f"agent.transaction(): {size} puts"] = timed(one_txn, args.rounds)
            rows[f"{size} single Agent.put (not atomic)"] = timed(singles, args.rounds)

        from tests.http.httpkit import Client  # the tests' small socket client

        data = root / "http"
        hcfg = AgentConfig.model_validate({"device_id": "van-2", "data_dir": data,
                                           "scopes": ["route-42"]})
        with Agent.open(hcfg, catalog) as agent:
            token, _ = TokenStore(data).add("bench", ["*"], ["*"])
            server = ApiServer(hcfg, agent)
            server.start()
            try:
                assert server.socket_path is not None
                client = Client(server.socket_path, token)

                def http(r: int) -> None:
                    ops = [{"op": "put", "collection": "tasks", "key": f"h-{r}-{i}",
                            "fields": fields(i)} for i in range(size)]
                    reply = client.call("POST", "/v1/txn", {"ops": ops})
                    assert reply.status == 202, reply.body

                rows[f"POST /v1/txn (socket): {size} puts"] = timed(http, args.rounds)
                client.close()
            finally:
                server.stop()
    raw_p50 = next(iter(rows.values()))["p50_ms"]
    table = [[name, r["p50_ms"], r["p99_ms"], r["per_s"], r["p50_ms"] / raw_p50]
             for name, r in rows.items()]
    print_table(f"{size} records written together ({args.rounds} rounds)",
                ["what", "p50 ms", "p99 ms", "rounds/s", "p50 / raw"], table)
    write_json("txn", {"rounds": args.rounds, "size": size, "rows": rows})


if __name__ == "__main__":
    main()
