"""Cost of schema evolution on the server: changes written under version 1 upcast to
version 4 (a rename and a type conversion on the way), and deltas projected down for a
device on version 1, against the same work for devices on version 4 (the raw limit of
the same run).

Run: .venv/bin/python -m bench.schema_upcast [--groups N]

Each group is 10 devices x 200 lww puts to `tasks` applied in one LMDB write
transaction (Engine.handle_many), with one online device on version 4 or version 1
receiving the deltas. Absolute numbers depend on the machine; compare the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import orjson

from broker.server import schema_history
from broker.server.engine import Engine
from broker.server.registry import add_device
from broker.server.store.lmdb_store import LmdbStore
from schemas.collection import parse_catalog
from waystation.config import ServerConfig

DEVICES = 10
PER_BATCH = 200


def _versions() -> list[str]:
    from tests.schema_versions import V1, V2, V3, V4

    return [V1, V2, V3, V4]


def run(groups: int, writer_sv: int, reader_sv: int) -> float:
    """Changes per second applied (and fanned out) for writers on `writer_sv` and one
    online reader on `reader_sv`."""
    import tomllib

    texts = _versions()
    with tempfile.TemporaryDirectory() as tmp:
        store = LmdbStore(Path(tmp))
        for n, text in enumerate(texts, start=1):
            schema_history.publish(store, text, f"v{n}", n)
        clock = [1_764_000_000_000]

        def now() -> int:
            clock[0] += 1
            return clock[0]

        for d in range(DEVICES):
            add_device(store, f"van-{d}", ["r1"], now())
        add_device(store, "reader", ["r1"], now())
        catalog = parse_catalog(tomllib.loads(texts[-1]), "v4")
        cfg = ServerConfig.model_validate({"data_dir": tmp})
        engine = Engine(store, catalog, cfg, now)
        engine.handle_status("reader", orjson.dumps({"type": "status", "v": 1,
                                                     "dev": "reader", "on": True}))
        engine.handle_up("reader", orjson.dumps({"type": "hello", "v": 1, "dev": "reader",
                                                 "agent": "bench/1", "sv": reader_sv}))
        notes = "notes" if writer_sv < 3 else "note"
        eta: object = 1764000000001 if writer_sv < 4 else "1764000000001"
        payloads = []
        for g in range(groups):
            group = []
            for d in range(DEVICES):
                ch = [{"n": g * PER_BATCH + i + 1,
                       "h": f"{1_764_000_000_000 + g * 1000 + i:012x}0000",
                       "c": "tasks", "k": f"t-{d}-{i}", "s": "r1", "b": 0, "op": "put",
                       "f": {"route": "r1", notes: f"n{g}", "eta": eta}}
                      for i in range(PER_BATCH)]
                group.append((f"van-{d}", orjson.dumps(
                    {"type": "changes", "v": 1, "dev": f"van-{d}", "sv": writer_sv,
                     "ch": ch})))
            payloads.append(group)
        start = time.perf_counter()
        sent = 0
        for group in payloads:
            out = engine.handle_many(group)
            sent += sum(1 for dev, _ in out if dev == "reader")
        elapsed = time.perf_counter() - start
        assert sent > 0 and engine.counters["applied"] == groups * DEVICES * PER_BATCH, \
            engine.counters
        store.close()
    return groups * DEVICES * PER_BATCH / elapsed


def micro(count: int) -> tuple[float, float, float]:
    """Pure CPU, no store: (changes decoded per s, of which upcast v1 -> v4 per s,
    delta messages of 200 records projected v4 -> v1 per s)."""
    import tomllib

    from broker.server.downcast import Downcaster
    from broker.server.messages import delta_messages
    from broker.server.upcast import SchemaChain
    from schemas.wire import Change

    texts = _versions()
    with tempfile.TemporaryDirectory() as tmp:
        store = LmdbStore(Path(tmp))
        for n, text in enumerate(texts, start=1):
            schema_history.publish(store, text, f"v{n}", n)
        catalog = parse_catalog(tomllib.loads(texts[-1]), "v4")
        chain = SchemaChain.load(store, catalog)
        store.close()
    raw = [{"n": i + 1, "h": "019ad5a9e8010000", "c": "tasks", "k": f"t-{i}", "s": "r1",
            "b": 0, "op": "put", "f": {"route": "r1", "notes": "n", "eta": 1764000000001}}
           for i in range(count)]
    start = time.perf_counter()
    changes = [Change.model_validate(r) for r in raw]
    decode = count / (time.perf_counter() - start)
    start = time.perf_counter()
    for ch in changes:
        chain.upcast(ch, 1, None)
    upcast = count / (time.perf_counter() - start)
    recs = [orjson.dumps({"c": "tasks", "k": f"t-{i}", "s": "r1", "q": i + 1,
                          "f": {"route": "r1", "note": "n", "eta": "17"},
                          "h": {"route": "019ad5a9e8010000", "note": "019ad5a9e8010000",
                                "eta": "019ad5a9e8010000"}}) for i in range(200)]
    (msg,) = delta_messages(recs)
    down = Downcaster(chain, 4)
    rounds = max(1, count // 200)
    start = time.perf_counter()
    for _ in range(rounds):
        down.project(msg, 1, None)
    project = rounds / (time.perf_counter() - start)
    return decode, upcast, project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--groups", type=int, default=10)
    args = parser.parse_args()
    raw = run(args.groups, 4, 4)
    up = run(args.groups, 1, 4)
    down = run(args.groups, 4, 1)
    both = run(args.groups, 1, 1)
    print(f"writers v4, reader v4 (raw limit): {raw:9.0f} changes/s")
    print(f"writers v1, reader v4 (upcast):    {up:9.0f} changes/s  {up / raw:.2f} x raw")
    print(f"writers v4, reader v1 (downcast):  {down:9.0f} changes/s  {down / raw:.2f} x raw")
    print(f"writers v1, reader v1 (both):      {both:9.0f} changes/s  {both / raw:.2f} x raw")
    decode, upcast, project = micro(50_000)
    print(f"CPU: decode (validate) a change:   {decode:9.0f} /s (the raw limit)")
    print(f"CPU: upcast a change v1 -> v4:     {upcast:9.0f} /s  {upcast / decode:.2f} x decode")
    print(f"CPU: project a 200-record delta:   {project * 200:9.0f} records/s  "
          f"{project * 200 / decode:.2f} x decode")


if __name__ == "__main__":
    main()
