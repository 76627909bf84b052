"""The cost of the schema guard every merge transaction takes (`WriteTxn.guard_schema`):
PostgreSQL transactions with and without it, interleaved so that the machine's noise
hits both alike.

    .venv/bin/python -m bench.schema_lock [--n 2000] [--url postgresql://...]

Each transaction writes one device row (so it commits with a WAL flush, as a merge
does); "guarded" also takes the shared advisory lock and reads the generation first
(one extra round trip). Without --url a private PostgreSQL is started (tests/pgserver.py,
durable settings).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import uuid
from collections.abc import Callable

from broker.server.store.base import DeviceRow, WriteTxn
from broker.server.store.postgres import PostgresStore


def timed(store: PostgresStore, fn: Callable[[WriteTxn], object]) -> float:
    start = time.perf_counter()
    store.transact(fn)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--url")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            from tests.pgserver import PgServer

            server = stack.enter_context(PgServer())
            url = server.create_database(f"bench_{uuid.uuid4().hex[:12]}")
        store = stack.enter_context(PostgresStore(url))
        row = DeviceRow("van-1", ("r1",))

        def plain(txn: WriteTxn) -> None:
            txn.put_device(row)

        def guarded(txn: WriteTxn) -> None:
            txn.guard_schema()
            txn.put_device(row)

        for _ in range(50):  # warm up
            timed(store, plain)
            timed(store, guarded)
        times: dict[str, list[float]] = {"plain": [], "guarded": []}
        for _ in range(args.n):
            times["plain"].append(timed(store, plain))
            times["guarded"].append(timed(store, guarded))
    for name, values in times.items():
        values.sort()
        print(f"{name:8s} p50 {statistics.median(values) * 1000:.3f} ms  "
              f"p90 {values[int(len(values) * 0.9)] * 1000:.3f} ms  "
              f"mean {statistics.fmean(values) * 1000:.3f} ms")
    diff = statistics.median(times["guarded"]) - statistics.median(times["plain"])
    print(f"guard: +{diff * 1000:.3f} ms per transaction (p50)")


if __name__ == "__main__":
    main()
