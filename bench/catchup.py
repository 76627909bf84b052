"""Catch-up after time away: draining a big outbox, and downloading what others wrote.

(a) drain: a device that was offline with N changes in its outbox (N = 10,000 and
    100,000, written by the agent API while no daemon ran) starts its daemon: time from
    `start()` (connect, hello, catch-up included) until the last change's ack is applied
    (outbox empty). Target for 100,000: < 10 s.
(b) download: a new device of the same scope, whose checkpoint is 0, starts: the server
    pages the scope's N records to it (PROTOCOL.md §9.5); time from `start()` until the
    catch-up's closing `checkpoint` is applied. Afterwards its view is compared with the
    server's record by record (waystation.convergence.compare), outside the timing.

Broker: Mosquitto from deploy/mosquitto/mosquitto.conf (the production broker), or the
embedded one with --broker embedded; the merge server and each device are processes of
their own (bench/fleet.py). The raw limits of the same run: plain LMDB puts (synced,
one per commit and 100 per commit) and plain paho QoS-1 pipelined round trips through
the same broker, to read the drain and download rates against.

    .venv/bin/python -m bench.catchup [--quick] [--broker mosquitto|embedded] [--keep]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench.common import print_table, write_json
from bench.fleet import (
    DeviceProc,
    Fleet,
    LoadMeter,
    copy_tree,
    find_mosquitto,
    machine_text,
    proc_cpu_s,
    workdir,
)
from bench.raw import lmdb_limits, mqtt_limits

TARGET_DRAIN_S = 10.0


def names(size: int) -> tuple[str, str, str]:
    tag = f"{size // 1000}k"
    return f"writer-{tag}", f"reader-{tag}", f"route-{tag}"


def fleet_devices(sizes: list[int]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for size in sizes:
        writer, reader, scope = names(size)
        out[writer] = [scope]
        out[reader] = [scope]
    return out


def prepare(tmp: Path, sizes: list[int]) -> dict[int, dict[str, Any]]:
    """Write every writer's backlog (in parallel, no daemon)."""
    fleet = Fleet("embedded", tmp, fleet_devices(sizes))
    procs = {size: DeviceProc(names(size)[0],
                              fleet.agent_config(names(size)[0], tmp / "backlog" / str(size),
                                                 port=1), tmp)
             for size in sizes}
    try:
        for size, proc in procs.items():
            proc.send("write", count=size)
        return {size: proc.recv() for size, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.close()


def run(kind: str, tmp: Path, sizes: list[int], quick: bool) -> dict[str, Any]:
    from waystation.convergence import compare

    out: dict[str, Any] = {"drain": [], "download": []}
    with Fleet(kind, tmp / kind, fleet_devices(sizes)) as fleet:
        fleet.start_broker()
        print(f"[{kind}] raw MQTT limits ...", flush=True)
        out["raw_mqtt"] = mqtt_limits(fleet, quick=quick, rtt_samples=50, gap_s=0.02)
        fleet.start_server()
        assert fleet.server is not None
        for size in sizes:
            writer, reader, scope = names(size)
            print(f"[{kind}] drain {size:,} ...", flush=True)
            dev = fleet.device(writer, copy_tree(tmp / "backlog" / str(size),
                                                 tmp / kind / "dev" / writer))
            server_cpu = proc_cpu_s(fleet.server.pid)
            load = LoadMeter()
            res = dev.call("start", wait="drained", timeout=1800)
            secs = res["t_drained"] - res["t0"]
            out["drain"].append({
                "changes": size, "secs": secs, "changes_s": size / secs,
                "connect_s": res["t_connected"] - res["t0"],
                "server_cpu_s": proc_cpu_s(fleet.server.pid) - server_cpu,
                "stats": res["stats"], "load": load.result(),
                "verdict": ("PASS" if secs < TARGET_DRAIN_S else "FAIL")
                if size >= 100_000 else "-"})
            fleet.close_device(dev)

            print(f"[{kind}] download {size:,} ...", flush=True)
            data = tmp / kind / "dev" / reader
            dev = fleet.device(reader, data)
            server_cpu = proc_cpu_s(fleet.server.pid)
            load = LoadMeter()
            res = dev.call("start", wait="catchup", timeout=1800)
            secs = res["t_catchup"] - res["t0"]
            row = {"records": size, "secs": secs, "records_s": size / secs,
                   "server_cpu_s": proc_cpu_s(fleet.server.pid) - server_cpu,
                   "load": load.result()}
            stats = dev.call("stats")
            row.update(pages=stats["stats"]["pages"], device_records=stats["records"],
                       bytes_down=stats["wire"]["payload_down"])
            fleet.close_device(dev)
            row["mismatches"] = _mismatches(fleet, reader, data, scope, compare)
            out["download"].append(row)
    return out


def _mismatches(fleet: Fleet, dev: str, data: Path, scope: str, compare: Any) -> int:
    """Records on which the device's view differs from the server's (0 = equal)."""
    from agent.api import Agent
    from schemas.collection import load_catalog
    from waystation.config import AgentConfig

    cfg = AgentConfig.model_validate(fleet.agent_config(dev, data))
    catalog = load_catalog(cfg.schema_path())
    store = fleet.open_server_store()
    try:
        with Agent.open(cfg, catalog, create=False) as agent:
            return len(compare(store, agent, [scope], catalog.collections))
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 and 10,000 changes")
    parser.add_argument("--broker", choices=("mosquitto", "embedded"), default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    kind = args.broker or ("mosquitto" if find_mosquitto() else "embedded")
    sizes = [2_000, 10_000] if args.quick else [10_000, 100_000]
    print(f"machine: {machine_text()}")
    with workdir("ws-bench-catchup-", args.keep) as tmp:
        print("raw LMDB limits ...", flush=True)
        raw_lmdb = lmdb_limits(tmp, quick=args.quick)
        print(f"writing the offline backlogs ({', '.join(f'{s:,}' for s in sizes)}) ...",
              flush=True)
        writes = prepare(tmp, sizes)
        result = run(kind, tmp, sizes, args.quick)
    raw = result["raw_mqtt"]
    print()
    print_table("Raw limits (same run)",
                ["broker", "paho pipelined QoS-1 msg/s", "LMDB synced puts/s (1 per commit)",
                 "LMDB synced puts/s (100 per commit)", "agent put() /s (the backlog writes)"],
                [[kind, raw["pipelined_msg_s"], raw_lmdb["synced_puts_s"],
                  raw_lmdb["synced_100_per_commit_puts_s"],
                  min(w["puts_per_s"] for w in writes.values())]])
    print_table(
        f"(a) Draining an offline outbox through {kind}: start() -> last ack applied "
        f"(target: 100,000 in < {TARGET_DRAIN_S:.0f} s)",
        ["changes", "s", "changes/s", "batches", "resent", "server CPU s", "other load",
         "verdict"],
        [[r["changes"], r["secs"], r["changes_s"], r["stats"]["batches_sent"],
          r["stats"]["resent"], r["server_cpu_s"], f"{r['load']['other_cores']:.2f} cores",
          r["verdict"]] for r in result["drain"]])
    print_table(
        f"(b) A new device downloads the scope's records (paged) through {kind}: "
        "start() -> catch-up complete",
        ["records", "s", "records/s", "pages", "records on device", "payload MB down",
         "server CPU s", "view == server", "other load"],
        [[r["records"], r["secs"], r["records_s"], r["pages"], r["device_records"],
          r["bytes_down"] / 1e6, r["server_cpu_s"],
          "yes" if r["mismatches"] == 0 else f"NO ({r['mismatches']} differ)",
          f"{r['load']['other_cores']:.2f} cores"] for r in result["download"]])
    write_json("catchup", {"quick": args.quick, "broker": kind, "sizes": sizes,
                           "machine_text": machine_text(), "raw_lmdb": raw_lmdb,
                           "backlog_writes": {str(k): v for k, v in writes.items()},
                           **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
