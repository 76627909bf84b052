"""Throughput of Engine.handle_many: 10 devices x 200 simple lww puts per group.

Run: .venv/bin/python -m tests.server.bench_engine [--groups N] [--online] [--profile]
        [--store lmdb|postgres] [--url postgresql://...] [--per-batch N]

`--per-batch 1` (10 changes per transaction) shows the fixed cost of a transaction, such
as the schema lock and generation check every merge takes (`WriteTxn.guard_schema`).

Each group is what the daemon would collect within its batch window: one 200-change
batch from each of 10 devices, applied in one write transaction: LMDB (sync=True, so one
fsync per group) or PostgreSQL (durable settings: one WAL flush per group; without
--url, a private server is started in a temporary directory, see tests/pgserver.py).
Payloads are built beforehand (that is the devices' work).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson

from broker.server.engine import Engine
from broker.server.registry import add_device
from broker.server.store.base import Store
from broker.server.store.lmdb_store import LmdbStore
from tests.server.helpers import CATALOG, T0, config, status

DEVICES = [f"van-{i}" for i in range(10)]


def build_groups(groups: int, per_batch: int = 200,
                 keys: int = 5000) -> list[list[tuple[str, bytes]]]:
    out = []
    n = {d: 0 for d in DEVICES}
    for g in range(groups):
        group = []
        for d in DEVICES:
            chs = []
            for _ in range(per_batch):
                n[d] += 1
                i = n[d]
                chs.append({"n": i, "h": f"{T0 + g * 10 + i // 100:012x}{i % 100:04x}",
                            "c": "tasks", "k": f"{d}-{i % keys}", "s": "r1", "b": 0,
                            "op": "put", "f": {"route": "r1", "status": f"s{i % 7}",
                                               "eta": T0 + i}})
            group.append((d, orjson.dumps({"type": "changes", "v": 1, "dev": d, "sv": 1,
                                           "ch": chs})))
        out.append(group)
    return out


StoreMaker = Callable[[Path], Store]


@contextlib.contextmanager
def store_maker(kind: str, url: str | None) -> Iterator[StoreMaker]:
    """Makes fresh stores of `kind` (PostgreSQL: a new database each)."""
    if kind == "lmdb":
        yield lambda tmp: LmdbStore(tmp, map_size_mb=1024)
        return
    if kind == "lmdb-sealed":  # encryption at rest on (records, conflicts, letters sealed)
        from agent.keyring import KeyEncryptionKey

        kek = KeyEncryptionKey(b"bench-key-0123456789abcdef012345")
        yield lambda tmp: LmdbStore(tmp, map_size_mb=1024, kek=kek)
        return
    from broker.server.store.postgres import PostgresStore
    from tests.pgserver import PgServer

    with contextlib.ExitStack() as stack:
        server = stack.enter_context(PgServer()) if url is None else None

        def make(tmp: Path) -> Store:
            if server is None:
                assert url is not None
                return PostgresStore(url)
            return PostgresStore(server.create_database(f"bench_{uuid.uuid4().hex[:12]}"))

        yield make


def run(groups: int, online: bool, profile: bool, make: StoreMaker | None = None,
        label: str = "lmdb", per_batch: int = 200) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = (make or (lambda t: LmdbStore(t, map_size_mb=1024)))(Path(tmp))
        now = [T0]
        for d in DEVICES:
            add_device(store, d, ["r1"], T0)
        engine = Engine(store, CATALOG, config(Path(tmp)), lambda: now[0])
        if online:
            for d in DEVICES:
                engine.handle_status(d, status(d))
        work = build_groups(groups, per_batch)
        engine.handle_many(work[0])  # warm up
        prof = cProfile.Profile() if profile else None
        start = time.perf_counter()
        cpu0 = time.process_time()
        if prof:
            prof.enable()
        sent = 0
        for group in work[1:]:
            sent += len(engine.handle_many(group))
        if prof:
            prof.disable()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        changes = (groups - 1) * len(DEVICES) * per_batch
        assert engine.counters["applied"] == groups * len(DEVICES) * per_batch
        store.close()
    rate = changes / elapsed
    print(f"{label:8s} {'online (fan-out to 9)' if online else 'offline (acks only)':24s} "
          f"{changes} changes in {elapsed:.2f} s = {rate:,.0f} changes/s "
          f"(CPU {changes / cpu:,.0f}/s; {sent} messages out; "
          f"{elapsed / (groups - 1) * 1000:.3f} ms per group)")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, default=31)
    parser.add_argument("--online", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--store", choices=("lmdb", "lmdb-sealed", "postgres"),
                        default="lmdb")
    parser.add_argument("--url", help="PostgreSQL database to use (its tables are used "
                                      "as they are: give it an empty database)")
    parser.add_argument("--per-batch", type=int, default=200,
                        help="changes per device per group (200)")
    parser.add_argument("--reps", type=int, default=1, help="runs of each kind")
    args = parser.parse_args()
    with store_maker(args.store, args.url) as make:
        for _ in range(args.reps):
            run(args.groups, False, args.profile, make, args.store, args.per_batch)
            if args.online:
                run(args.groups, True, args.profile, make, args.store, args.per_batch)


if __name__ == "__main__":
    main()
