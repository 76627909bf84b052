"""Merge-server CPU per change in steady online use: one message per group (issue 11 §1).

    .venv/bin/python -m bench.cpu --only server_online [--profile server_online]

Online, a device sends its changes as they are written: 1-2 per message, and the
server's group holds that one message. So its cost is per message, not per change as in
`server.create` / `server.update` (groups of 10 x 200). This drives the daemon's own
code per message, without network and threads: the network thread's hand-off
(`MergeServer._on_message` -> intake), the worker's take and `_process` (decode,
registry refresh, the publish-window guard, merge, the synced commit, ack encode,
publish to a link that only collects), CPU time of this process, best of the rounds.

- server.lone: a message of one new record (~300-byte task), as a device writing alone;
- server.paced: a message of two changes, one new record and one update of it (what a
  device writing every 10 ms sends: 1-2 changes per message);
- server.lone_update: a message of one update of an existing record.

The device speaks what a current agent speaks (its hello agrees every capability,
zd2-compressed up messages, zd1-compressed acks) and is online (its status), and a
second device is online in another scope (no delta: live_sync's layout). With `--dir`
on a disk the synced commit's CPU (two flushes) counts too.
"""

from __future__ import annotations

import cProfile
import gc
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.device import record
from broker.server.caps import SERVER_CAPS
from broker.server.daemon import MergeServer
from broker.server.registry import add_device
from schemas import codec, zdict_schema
from schemas.collection import Catalog
from waystation.config import ServerConfig

DEV = "van-1"
SCOPE = "route-cpu"
OTHER = "van-2"
OTHER_SCOPE = "route-lat"
INC = "i-bench0000000001"


class _Device:
    """What one online agent sends: hello, status, and change messages."""

    def __init__(self, catalog: Catalog, dev: str) -> None:
        self.dev = dev
        self.zd = zdict_schema.dictionary(catalog)
        zdict_schema.register(catalog)
        self.n = 0
        self.version = catalog.version

    def hello(self) -> bytes:
        return codec.encode_dict({
            "type": "hello", "v": 1, "dev": self.dev, "agent": "bench/1", "sv": self.version,
            "z": True, "inc": INC, "caps": sorted(SERVER_CAPS),
            "zd": zdict_schema.dict_id(self.zd)})

    def status(self) -> bytes:
        return codec.encode_dict({"type": "status", "v": 1, "dev": self.dev, "on": True})

    def changes(self, fields: list[tuple[str, dict[str, Any]]]) -> bytes:
        chs = []
        wall = time.time_ns() // 1_000_000
        for key, f in fields:
            self.n += 1
            chs.append({"n": self.n, "h": f"{wall:012x}{self.n % 0xFFFF:04x}", "c": "tasks",
                        "k": key, "s": SCOPE, "b": 0, "op": "put", "f": f})
        return codec.encode_dict({"type": "changes", "v": 1, "dev": self.dev,
                                  "sv": self.version, "inc": INC, "ch": chs},
                                 compress_over=512, zdict=self.zd)


def _run(server: MergeServer, topic: str, payload: bytes) -> None:
    """One message through the daemon's code: the network thread's hand-off, then the
    worker's take and group (threads and the wait for more left out)."""
    server._on_message(topic, payload)
    group = server.intake.take(0.0, max_items=2000, max_bytes=256 * 1024)
    assert group
    server._process(group)


def online_rounds(directory: Path, catalog: Catalog, rounds: int, count: int = 300,
                  prof: cProfile.Profile | None = None) -> dict[str, float]:
    """µs of CPU per change of server.lone, server.paced, server.lone_update."""
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        cfg = ServerConfig.model_validate({"data_dir": tmp, "mqtt": {"password": "unused"},
                                           "store": {"map_size_mb": 1024}})
        server = MergeServer(cfg, catalog, env={})
        now = time.time_ns() // 1_000_000
        add_device(server.store, DEV, [SCOPE], now)
        add_device(server.store, OTHER, [OTHER_SCOPE], now)
        sent: list[tuple[str, bytes]] = []

        def publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
            sent.append((topic, payload))
            return True

        server.link.publish = publish  # type: ignore[method-assign]
        prefix = server.prefix
        up = f"{prefix}/{DEV}/up"
        device, other = _Device(catalog, DEV), _Device(catalog, OTHER)
        for d in (device, other):
            _run(server, f"{prefix}/{d.dev}/status", d.status())
            _run(server, f"{prefix}/{d.dev}/up", d.hello())
        assert server.engine.presence.is_online(DEV)
        sent.clear()
        out: dict[str, list[float]] = {"lone": [], "paced": [], "lone_update": []}
        i = 0
        for r in range(rounds + 1):  # the first round warms up
            keys = [f"l-{i + j:07d}" for j in range(count)]
            i += count
            work: dict[str, list[bytes]] = {
                "lone": [device.changes([(k, record(SCOPE, j))]) for j, k in enumerate(keys)],
                "lone_update": [device.changes([(k, {"status": "picked", "eta": j})])
                                for j, k in enumerate(keys)],
            }
            pkeys = [f"p-{i + j:07d}" for j in range(count // 2)]
            work["paced"] = [device.changes([(k, record(SCOPE, j)),
                                             (k, {"status": "picked", "eta": j})])
                             for j, k in enumerate(pkeys)]
            for name in ("lone", "lone_update", "paced"):
                msgs = work[name]
                changes = count if name != "paced" else 2 * len(msgs)
                gc.collect()
                if prof and r:
                    prof.enable()
                c0 = time.process_time()
                for payload in msgs:
                    _run(server, up, payload)
                spent = time.process_time() - c0
                if prof and r:
                    prof.disable()
                acks = [codec.decode(p) for _, p in sent]
                sent.clear()
                assert len(acks) == len(msgs) and all(a.type == "ack" for a in acks), acks[:3]
                if r:
                    out[name].append(spent / changes)
        counters = server.engine.counters
        assert counters["applied"] == 3 * (rounds + 1) * count, counters
        server.store.close()
    return {k: min(v) * 1e6 for k, v in out.items()}


def add_results(results: dict[str, float], directory: Path, catalog: Catalog, rounds: int,
                profile: str, print_stats: Callable[[cProfile.Profile], object]) -> None:
    """bench.cpu's hook: server.lone, server.paced, server.lone_update into `results`."""
    prof = cProfile.Profile() if profile == "server_online" else None
    for key, value in online_rounds(directory, catalog, rounds, prof=prof).items():
        results[f"server.{key}"] = value
    if prof:
        print_stats(prof)


__all__ = ["add_results", "online_rounds"]
