"""CPU cost per change of the sync hot paths (a benchmark, not a test).

    .venv/bin/python -m bench.cpu [--rounds N] [--only server,put,batch,ack,...]
        [--profile NAME] [--dir DIR] [--name NAME]

Every number is CPU time of this process (`time.process_time`: user + system, all
threads) divided by the changes handled, the best (lowest) of several rounds: CPU time
does not count the time other processes hold the cores, so the figures stay comparable
on a busy machine. Stores live in `--dir` (default /dev/shm, so an fsync costs no disk
wait; its CPU is counted either way).

Paths measured (~300-byte delivery-task records, as bench/device.py writes them):

- server.create / server.update: `Engine.handle_many` for groups of 10 devices x 200
  lww puts (one group = one LMDB transaction), new records / existing records;
  server.decode: `codec.decode_lenient` of one 200-change batch.
- agent.put: `Agent.put` of a new record (3 fields... the whole ~300-byte record).
- agent.next_batch: `Sync.next_batch(max_changes=500)` with 1,000 pending changes;
  agent.next_batch_inflight: the daemon's call, with 4,500 of 5,000 pending in flight.
- agent.encode: the daemon's batch payload (`codec.encode_dict`, compressed).
- agent.ack / agent.ack_fx: `Sync.apply_ack` of a 500-change ack, without fx and with
  one fx state (counter total) per change; agent.ack_decode(_fx): `codec.decode` of
  that ack's bytes (what the daemon does before `apply_ack`).
- lone.put / lone.daemon (`--only lone`): one change at a time through the daemon's
  engine, driven by hand with a link that only collects what is published: the put,
  then the daemon's turn for the write's wake (scan, encode, publish) plus its turn
  for the ack (decode, apply, commit). No network, no threads: the engine's own CPU
  per lone change. With `--dir` on a disk, the synced commits' CPU counts too.
- server.lone / server.paced / server.lone_update (`--only server_online`): the merge
  server's CPU per change when each group holds one message of 1-2 changes, as online
  (bench/cpu_server.py).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from agent.api import Agent
from bench.common import write_json
from bench.device import record
from broker.server.engine import Engine
from broker.server.registry import add_device
from broker.server.store.lmdb_store import LmdbStore
from schemas import codec, wire
from schemas.collection import example_catalog_path, load_catalog
from tests.server.helpers import T0, config, status
from waystation.config import AgentConfig

CATALOG = load_catalog(example_catalog_path())
DEVICES = [f"van-{i}" for i in range(10)]
PER_BATCH = 200
SCOPE = "route-42"

def cpu(fn: Callable[[], Any]) -> float:
    """CPU seconds of one call."""
    gc.collect()
    start = time.process_time()
    fn()
    return time.process_time() - start


# ------------------------------------------------------------------------ server


def _group(g: int, n0: dict[str, int], keys: Callable[[str, int], str]
           ) -> list[tuple[str, bytes]]:
    group = []
    for d in DEVICES:
        chs = []
        for _ in range(PER_BATCH):
            n0[d] += 1
            i = n0[d]
            f = record(SCOPE, hash((d, i)) & 0xFFFF)
            chs.append({"n": i, "h": f"{T0 + g * 10 + i // 100:012x}{i % 100:04x}",
                        "c": "tasks", "k": keys(d, i), "s": SCOPE, "b": 0, "op": "put",
                        "f": f})
        group.append((d, orjson.dumps({"type": "changes", "v": 1, "dev": d, "sv": 1,
                                       "ch": chs})))
    return group


def server_rounds(directory: Path, groups: int, online: bool,
                  prof: cProfile.Profile | None) -> dict[str, float]:
    """µs per change of handle_many: groups creating records, then groups updating them."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        store = LmdbStore(Path(tmp), map_size_mb=1024)
        now = [T0]
        for d in DEVICES:
            add_device(store, d, [SCOPE], T0)
        engine = Engine(store, CATALOG, config(Path(tmp)), lambda: now[0])
        if online:
            for d in DEVICES:
                engine.handle_status(d, status(d))
        n0 = dict.fromkeys(DEVICES, 0)
        per_dev = groups * PER_BATCH
        create = [_group(g, n0, lambda d, i: f"{d}-{i:06d}") for g in range(groups)]
        update = [_group(groups + g, n0, lambda d, i: f"{d}-{(i - per_dev):06d}")
                  for g in range(groups)]
        out: dict[str, float] = {}
        for name, work in (("create", create), ("update", update)):
            times = []
            for group in work:
                if prof:
                    prof.enable()
                times.append(cpu(lambda group=group: engine.handle_many(group)))
                if prof:
                    prof.disable()
            out[name] = min(times) / (len(DEVICES) * PER_BATCH) * 1e6
        assert engine.counters["applied"] == 2 * groups * len(DEVICES) * PER_BATCH, engine.counters
        store.close()
    return out


def server_decode(reps: int) -> float:
    payload = _group(0, dict.fromkeys(DEVICES, 0), lambda d, i: f"{d}-{i}")[0][1]
    best = min(cpu(lambda: [codec.decode_lenient(payload, allowed=wire.UP_TYPES)
                            for _ in range(reps)]) for _ in range(3))
    return best / reps / PER_BATCH * 1e6


# ------------------------------------------------------------------------- agent


def agent_rounds(directory: Path, rounds: int, prof: dict[str, cProfile.Profile]
                 ) -> dict[str, float]:
    data = Path(tempfile.mkdtemp(dir=directory))
    cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": str(data),
                                      "scopes": [SCOPE]})
    out: dict[str, list[float]] = {k: [] for k in (
        "put", "put_update", "next_batch", "encode", "ack", "ack_fx", "ack_decode",
        "ack_decode_fx")}
    size = 500
    with Agent.open(cfg, CATALOG) as agent:
        sync = agent.sync
        i = 0
        q = 0

        def profiled(name: str, fn: Callable[[], Any]) -> float:
            p = prof.get(name)
            if p:
                p.enable()
            try:
                return cpu(fn)
            finally:
                if p:
                    p.disable()

        for _ in range(rounds):
            recs = [record(SCOPE, i + j) for j in range(size)]
            keys = [f"t-{i + j:06d}" for j in range(size)]
            i += size

            def puts(keys: list[str] = keys, recs: list[dict[str, Any]] = recs) -> None:
                for key, rec in zip(keys, recs, strict=True):
                    agent.put("tasks", key, rec)

            out["put"].append(profiled("put", puts) / size)

            def updates(keys: list[str] = keys) -> None:
                for j, key in enumerate(keys):
                    agent.put("tasks", key, {"status": "delivered", "eta": j})

            out["put_update"].append(profiled("put_update", updates) / size)
            # 1,000 pending now: the batch takes the first 500 of them
            batch = sync.next_batch(max_changes=size, max_bytes=1 << 30)
            out["next_batch"].append(profiled("next_batch", lambda: [
                sync.next_batch(max_changes=size, max_bytes=1 << 30) for _ in range(5)]
                ) / 5 / size)

            def encode(batch: Any = batch) -> None:
                for _ in range(5):
                    codec.encode_dict({"type": "changes", "v": 1, "dev": "van-1",
                                       "sv": batch.sv, "ch": [ch for _, ch in batch]},
                                      compress_over=512)

            out["encode"].append(profiled("encode", encode) / 5 / size)
            for with_fx in (False, True):
                batch = sync.next_batch(max_changes=size, max_bytes=1 << 30)
                ok, fx = [], []
                for n, ch in batch:
                    q += 1
                    ok.append([n, SCOPE, q])
                    if with_fx:
                        fx.append({"c": ch["c"], "k": ch["k"], "s": SCOPE, "q": q,
                                   "part": True, "f": {"attempts": 1}})
                body: dict[str, Any] = {"type": "ack", "v": 1, "ok": ok}
                if fx:
                    body["fx"] = fx
                payload = orjson.dumps(body)
                name = "ack_decode_fx" if with_fx else "ack_decode"
                out[name].append(profiled(name, lambda payload=payload: [
                    codec.decode(payload, allowed=wire.DOWN_TYPES) for _ in range(5)])
                    / 5 / len(batch))
                msg = codec.decode(payload, allowed=wire.DOWN_TYPES)
                assert isinstance(msg, wire.Ack)
                name = "ack_fx" if with_fx else "ack"
                result: list[Any] = []
                out[name].append(profiled(name, lambda msg=msg, result=result: result.append(
                    sync.apply_ack(msg))) / len(batch))
                assert len(result[0].applied) == len(batch)
        assert agent.status().pending == 0
    return {k: min(v) * 1e6 for k, v in out.items()}


def agent_inflight(directory: Path, rounds: int) -> float:
    """next_batch as the daemon calls it: 5,000 pending, 4,500 of them in flight (the
    in-flight numbers passed as the daemon passes them), default byte limit."""
    data = Path(tempfile.mkdtemp(dir=directory))
    cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": str(data),
                                      "scopes": [SCOPE]})
    with Agent.open(cfg, CATALOG) as agent:
        for i in range(5000):
            agent.put("tasks", f"t-{i:06d}", record(SCOPE, i))
        inflight = dict.fromkeys(range(1, 4501), 0.0)
        exclude: Any = inflight.keys()
        try:
            agent.sync.next_batch(exclude)
        except TypeError:  # a version that wants a set
            exclude = set(inflight)
        sizes: list[int] = []

        def batches() -> None:
            for _ in range(5):
                sizes.append(len(agent.sync.next_batch(exclude)))

        best = min(cpu(batches) for _ in range(rounds))
    return best / 5 / sizes[0] * 1e6


def lone_rounds(directory: Path, rounds: int, count: int = 300) -> dict[str, float]:
    """µs of CPU per lone change: the put, and the daemon's two turns (see module)."""
    from agent.daemon import AgentDaemon

    data = Path(tempfile.mkdtemp(dir=directory))
    cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": str(data),
                                      "scopes": [SCOPE],
                                      "mqtt": {"host": "127.0.0.1", "port": 1,
                                               "password": "unused"}})
    sent: list[bytes] = []
    q = 0
    with Agent.open(cfg, CATALOG) as agent:
        daemon = AgentDaemon(cfg, CATALOG, agent=agent)
        def publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
            sent.append(payload)
            return True

        daemon.link.publish = publish  # type: ignore[method-assign]
        daemon._connected = daemon._answered = True
        daemon.sync.server_caps = frozenset(daemon.sync.offered)
        put_s: list[float] = []
        daemon_s: list[float] = []
        i = 0
        for _ in range(rounds + 1):  # the first round warms up
            recs = [record(SCOPE, i + j) for j in range(count)]
            put_t = daemon_t = 0.0
            for j in range(count):
                c0 = time.process_time()
                agent.put("tasks", f"l-{i + j:07d}", recs[j])
                c1 = time.process_time()
                daemon._handle(("wake",))
                daemon._pump(time.monotonic())
                c2 = time.process_time()
                msg = codec.decode(sent.pop())  # the server's part: not counted
                assert isinstance(msg, wire.Changes)
                ok = []
                for ch in msg.ch:
                    q += 1
                    ok.append([ch.n, SCOPE, q])
                ack = codec.encode_dict({"type": "ack", "v": 1, "ok": ok},
                                        zdict=daemon._zdict())
                c3 = time.process_time()
                daemon._handle(("msg", daemon.down_topic, ack))
                daemon._pump(time.monotonic())
                c4 = time.process_time()
                put_t += c1 - c0
                daemon_t += (c2 - c1) + (c4 - c3)
            assert not daemon._inflight and agent.sync.pending_count() == 0
            i += count
            put_s.append(put_t / count)
            daemon_s.append(daemon_t / count)
    return {"put": min(put_s[1:]) * 1e6, "daemon": min(daemon_s[1:]) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--only", default="server,server_online,decode,agent,lone")
    parser.add_argument("--profile", default="", help="a path name (e.g. server, ack_fx) "
                                                      "to profile with cProfile")
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--name", help="also write bench/results/NAME.json")
    args = parser.parse_args()
    only = set(args.only.split(","))
    directory = Path(args.dir)
    results: dict[str, float] = {}
    if "server" in only:
        prof = cProfile.Profile() if args.profile == "server" else None
        runs = [server_rounds(directory, args.groups, False, prof)
                for _ in range(max(1, args.rounds // 2))]
        for key in runs[0]:
            results[f"server.{key}"] = min(r[key] for r in runs)
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(40)
    if "server_online" in only:
        from bench.cpu_server import add_results

        add_results(results, directory, CATALOG, args.rounds, args.profile,
                    lambda p: pstats.Stats(p).sort_stats("tottime").print_stats(40))
    if "decode" in only:
        results["server.decode"] = min(server_decode(20) for _ in range(args.rounds))
    if "lone" in only:
        for key, value in lone_rounds(directory, args.rounds).items():
            results[f"lone.{key}"] = value
    if "agent" in only:
        profs = {args.profile: cProfile.Profile()} if args.profile else {}
        for key, value in agent_rounds(directory, args.rounds, profs).items():
            results[f"agent.{key}"] = value
        results["agent.next_batch_inflight"] = agent_inflight(directory, args.rounds)
        for p in profs.values():
            pstats.Stats(p).sort_stats("tottime").print_stats(40)
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:{width}s} {value:8.2f} µs/change")
    if args.name:
        write_json(args.name, {"us_per_change": results, "dir": args.dir,
                               "rounds": args.rounds, "only": sorted(only)})
    _ = statistics


if __name__ == "__main__":
    main()
