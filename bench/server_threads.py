"""Merge-server CPU per synced change in online use, split by thread (issue 11 §1).

    .venv/bin/python -m bench.server_threads [--rounds 3] [--count 600] [--name NAME]

A Mosquitto broker and one device process (bench.device, as bench.live_sync starts
them) and the merge server in this process (`MergeServer`, the code `waystation server
run` runs, without the metrics endpoint), so each of its threads is known by its
native id: the worker (`MergeServer._work`: decode, merge, the synced commit, acks) and
the network thread (paho: reading the up messages and their PUBACKs, writing the acks);
the server's other threads are reported as well, and this process's main thread (the
bench driving the device: not the server's) apart. Per round the device
writes `--count` changes as `paced` (one every 10 ms: 1-2 per message) and as
`online_write` (one after another while its daemon runs); CPU µs per synced change from
/proc (user + system, clock-tick resolution), median over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from bench.common import write_json
from bench.fleet import REPO, Fleet, LoadMeter, machine_text
from bench.live_sync import cpu_phase, thread_cpu_s
from broker.server.daemon import MergeServer
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import ServerConfig

DEV = "cpu-1"
PACED_GAP_S = 0.01


def _rounds(tmp: Path, rounds: int, count: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"paced": [], "stream": []}
    with Fleet("mosquitto", tmp / "ws", {DEV: ["route-cpu"]}) as fleet:
        fleet.start_broker()
        fleet.register_devices()
        cfg = ServerConfig.model_validate(fleet.server_config())
        server = MergeServer(cfg, load_catalog(example_catalog_path()), env={})
        server.start()
        try:
            deadline = time.monotonic() + 30
            while not server.link.connected and time.monotonic() < deadline:
                time.sleep(0.05)
            worker = server._thread
            network = getattr(server.link, "_thread", None)
            assert worker is not None and network is not None
            ids = {"worker": worker.native_id, "network": network.native_id}
            dev = fleet.device(DEV, tmp / "dev")
            dev.call("start", wait="catchup")
            cpu_phase(dev, os.getpid(), "online_write", 100, 9_000_000)  # warm-up
            for n in range(rounds):
                for mode, cmd, args in (("paced", "paced", {"gap_s": PACED_GAP_S}),
                                        ("stream", "online_write", {})):
                    start = 1_000_000 + n * 10_000 + (5_000 if mode == "paced" else 0)
                    before = thread_cpu_s(os.getpid())
                    load = LoadMeter()
                    res = cpu_phase(dev, os.getpid(), cmd, count, start, **args)
                    after = thread_cpu_s(os.getpid())
                    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
                    row = {"worker_us": spent.pop(ids["worker"], 0.0) * 1e6 / count,
                           "network_us": spent.pop(ids["network"], 0.0) * 1e6 / count}
                    row["harness_us"] = spent.pop(os.getpid(), 0.0) * 1e6 / count
                    row["other_us"] = sum(spent.values()) * 1e6 / count
                    row["server_us"] = row["worker_us"] + row["network_us"] + row["other_us"]
                    row["changes_per_message"] = count / max(1, res["batches"])
                    row["changes_s"] = res["changes_s"]
                    row["other_cores"] = load.result()["other_cores"]
                    out[mode].append(row)
                    print(f"round {n + 1}/{rounds} {mode}: " + ", ".join(
                        f"{k} {v:.1f}" for k, v in row.items()), flush=True)
        finally:
            server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=600, help="changes per phase")
    parser.add_argument("--name", default="server_threads")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    print(machine_text())
    with tempfile.TemporaryDirectory(dir=REPO, prefix=".bench-threads-") as tmp:
        rounds = _rounds(Path(tmp), args.rounds, args.count)
    summary = {mode: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
               for mode, rows in rounds.items()}
    print("\n| mode | server µs/change | worker | network thread | other | changes/message |")
    print("|---|---|---|---|---|---|")
    for mode, s in summary.items():
        print(f"| {mode} | {s['server_us']:.0f} | {s['worker_us']:.0f} | {s['network_us']:.0f}"
              f" | {s['other_us']:.0f} | {s['changes_per_message']:.2f} |")
    write_json(args.name, {"args": vars(args), "rounds": rounds, "summary": summary,
                           "load_avg": os.getloadavg()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
