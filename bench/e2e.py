"""End-to-end sync throughput and latency, next to the raw limits measured in the same run.

A change's trip: local put (one synced LMDB commit on the device) -> agent daemon ->
broker -> merge server (validate, merge, one synced commit for the group) -> ack ->
broker -> agent daemon applies the ack (one synced commit; the outbox entry is gone).
Measured through the embedded broker and through Mosquitto (production config), with
the merge server and every device in processes of their own (see bench/fleet.py).

Throughput (changes/s until the last change's ack is applied at its device):
  backlog  N changes written while the daemon is not running, then the daemon starts:
           time from `start()` (connect, hello, catch-up included) to the last ack
  online   N changes written one after another while the daemon runs: time from the
           first put to the last ack (bounded by the device's synced commits per put)
for 1 device and for 10 devices at once (each in its own scope).

Latency: one change at a time on an idle link (a pause between samples): put() call
start -> its ack applied, p50/p99.

Raw limits in the same run: plain paho QoS-1 round trips through the same broker
(pipelined msg/s; one at a time p50/p99) and plain LMDB puts (bench/raw.py).

Targets (the "sync loop" issue):
  throughput  end-to-end changes/s through Mosquitto >= 2 x raw pipelined round trips/s
  latency     single-change p50 <= raw round trip p50 + 2 synced LMDB commits + 0.5 ms

    .venv/bin/python -m bench.e2e [--quick] [--broker embedded|mosquitto] [--keep]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bench.common import percentile, print_table, write_json
from bench.fleet import (
    DeviceProc,
    Fleet,
    LoadMeter,
    call_all,
    copy_tree,
    find_mosquitto,
    machine_text,
    proc_cpu_s,
    system_cpu_s,
    workdir,
)
from bench.raw import lmdb_limits, mqtt_limits

SOLOS = ["solo-1", "solo-2", "solo-3"]
"""The 1-device runs are repeated with three devices (each its own backlog); the
median is reported."""
MANY = [f"fleet-{i:02d}" for i in range(1, 11)]
LAT = "lat-1"
GAP_S = 0.02


def devices() -> dict[str, list[str]]:
    out = {LAT: ["route-lat"]}
    out.update({dev: [f"route-{dev}"] for dev in SOLOS})
    out.update({dev: [f"route-{dev}"] for dev in MANY})
    return out


def prepare_backlogs(base: Path, names: list[str], count: int) -> tuple[dict[str, Path], float]:
    """Write `count` changes into a fresh outbox per device (no daemon), in parallel;
    returns the data dirs (copied for each broker) and the local puts/s seen."""
    fleet = Fleet("embedded", base, devices())  # only for agent configs; nothing started
    procs = [DeviceProc(name, fleet.agent_config(name, base / "backlog" / name, port=1), base)
             for name in names]
    try:
        results = call_all(procs, "write", count=count)
    finally:
        for proc in procs:
            proc.close()
    rate = sum(r["puts_per_s"] for r in results)
    return {name: base / "backlog" / name for name in names}, rate


class CpuMeter:
    """CPU seconds used by the broker, the server and the devices during a phase."""

    def __init__(self, fleet: Fleet, devs: list[DeviceProc]) -> None:
        assert fleet.broker is not None and fleet.server is not None
        self.pids = {"broker": [fleet.broker.pid], "server": [fleet.server.pid],
                     "agents": [d.pid for d in devs]}
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        out = {k: sum(proc_cpu_s(p) for p in pids) for k, pids in self.pids.items()}
        out["machine"], out["idle"] = system_cpu_s()
        return out

    def used(self) -> dict[str, float]:
        end = self._read()
        return {k: end[k] - self.start[k] for k in end}


def throughput(fleet: Fleet, names: list[str], backlogs: dict[str, Path], count: int,
               tmp: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    devs = [fleet.device(n, copy_tree(backlogs[n], tmp / fleet.kind / "dev" / n))
            for n in names]
    try:
        os.sync()  # the copied stores' dirty pages: not written back during the run
        cpu, load = CpuMeter(fleet, devs), LoadMeter()
        res = call_all(devs, "start", wait="drained")
        t0 = min(r["t0"] for r in res)
        t1 = max(r["t_drained"] for r in res)
        total = count * len(devs)
        rows.append(_row(fleet, "backlog", len(devs), total, t1 - t0, cpu.used(), res,
                         load.result()))
        cpu, load = CpuMeter(fleet, devs), LoadMeter()
        res = call_all(devs, "online_write", count=count, start=count)
        t0 = min(r["t0"] for r in res)
        t1 = max(r["t_drained"] for r in res)
        row = _row(fleet, "online", len(devs), total, t1 - t0, cpu.used(), res,
                   load.result())
        row["writes_done_s"] = max(r["t_written"] for r in res) - t0
        rows.append(row)
    finally:
        for dev in devs:
            fleet.close_device(dev)
    return rows


def _row(fleet: Fleet, mode: str, ndev: int, total: int, secs: float, cpu: dict[str, float],
         res: list[dict[str, Any]], load: dict[str, float]) -> dict[str, Any]:
    stats = [r.get("stats", {}) for r in res]
    return {"broker": fleet.kind, "mode": mode, "devices": ndev, "changes": total,
            "secs": secs, "changes_s": total / secs, "load": load,
            "cpu_ms_per_1000": {k: v * 1e6 / total for k, v in cpu.items()},
            "batches": sum(s.get("batches_sent", 0) for s in stats),
            "resent": sum(s.get("resent", 0) for s in stats)}


def latency(fleet: Fleet, samples: int, tmp: Path) -> dict[str, Any]:
    dev = fleet.device(LAT, tmp / fleet.kind / "dev" / LAT)
    try:
        dev.call("start", wait="catchup")
        dev.call("latency", samples=20, gap_s=GAP_S)  # warm-up
        res = dev.call("latency", samples=samples, gap_s=GAP_S, start=1000)
    finally:
        fleet.close_device(dev)
    ms, put_ms = res["ms"], res["put_ms"]
    return {"broker": fleet.kind, "samples": len(ms), "gap_s": GAP_S,
            "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "put_p50_ms": percentile(put_ms, 50), "put_p99_ms": percentile(put_ms, 99),
            "parts_p50_ms": {k: percentile(v, 50) for k, v in res["parts_ms"].items()}}


def run_broker(kind: str, tmp: Path, backlogs: dict[str, Path], args: argparse.Namespace,
               sizes: dict[str, int]) -> dict[str, Any]:
    with Fleet(kind, tmp / kind, devices()) as fleet:
        fleet.start_broker()
        print(f"[{kind}] raw MQTT limits ...", flush=True)
        raw = mqtt_limits(fleet, quick=args.quick, rtt_samples=sizes["latency"], gap_s=GAP_S)
        fleet.start_server()
        runs: list[dict[str, Any]] = []
        for name in SOLOS:
            print(f"[{kind}] 1 device ({name}) ...", flush=True)
            runs += throughput(fleet, [name], backlogs, sizes["single"], tmp)
        rows = [_median([r for r in runs if r["mode"] == mode]) for mode in ("backlog", "online")]
        print(f"[{kind}] 10 devices ...", flush=True)
        rows += throughput(fleet, MANY, backlogs, sizes["many"], tmp)
        print(f"[{kind}] latency ...", flush=True)
        lat = latency(fleet, sizes["latency"], tmp)
    return {"raw_mqtt": raw, "throughput": rows, "latency": lat, "single_device_runs": runs}


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(rows, key=lambda r: r["changes_s"])
    row = dict(ordered[len(ordered) // 2])
    row["runs_changes_s"] = [r["changes_s"] for r in rows]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--broker", choices=("embedded", "mosquitto"), action="append",
                        help="only this broker (repeatable; default: both)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    kinds = args.broker or ["embedded", "mosquitto"]
    if "mosquitto" in kinds and find_mosquitto() is None:
        print("mosquitto is not installed: measuring the embedded broker only")
        kinds = [k for k in kinds if k != "mosquitto"]
    sizes = ({"single": 2000, "many": 500, "latency": 50} if args.quick
             else {"single": 10000, "many": 2000, "latency": 200})
    print(f"machine: {machine_text()}")
    with workdir("ws-bench-e2e-", args.keep) as tmp:
        print("raw LMDB limits ...", flush=True)
        raw_lmdb = lmdb_limits(tmp, quick=args.quick)
        print("writing the offline backlogs ...", flush=True)
        backlogs, solo_rate = prepare_backlogs(tmp, SOLOS[:1], sizes["single"])
        backlogs.update(prepare_backlogs(tmp, SOLOS[1:], sizes["single"])[0])
        more, fleet_rate = prepare_backlogs(tmp, MANY, sizes["many"])
        backlogs.update(more)
        results = {kind: run_broker(kind, tmp, backlogs, args, sizes) for kind in kinds}
    report(results, raw_lmdb, sizes, solo_rate, fleet_rate, args.quick)
    return 0


def report(results: dict[str, Any], raw_lmdb: dict[str, Any], sizes: dict[str, int],
           solo_rate: float, fleet_rate: float, quick: bool) -> None:
    commit = raw_lmdb["synced_commit_ms_p50"]
    print()
    print_table(
        "Raw limits (same run): plain paho QoS-1 round trips via the broker, 300-byte payload",
        ["broker", "pipelined msg/s", "in-flight 100", "in-flight unlimited",
         "one at a time p50 ms", "p99 ms"],
        [[k, r["raw_mqtt"]["pipelined_msg_s"], r["raw_mqtt"]["pipelined_by_inflight"]["100"],
          r["raw_mqtt"]["pipelined_by_inflight"]["0"], r["raw_mqtt"]["rtt_ms_p50"],
          r["raw_mqtt"]["rtt_ms_p99"]] for k, r in results.items()])
    print_table(
        "Raw limits (same run): plain LMDB, 300-byte values, on the agents' disk",
        ["synced puts/s (1 per commit)", "synced commit p50 ms", "p99 ms",
         "unsynced puts/s", "synced puts/s (100 per commit)", "agent put() /s, 1 device",
         "agent put() /s, 10 devices together"],
        [[raw_lmdb["synced_puts_s"], commit, raw_lmdb["synced_commit_ms_p99"],
          raw_lmdb["nosync_puts_s"], raw_lmdb["synced_100_per_commit_puts_s"],
          solo_rate, fleet_rate]])
    rows = []
    verdicts: dict[str, Any] = {}
    for kind, r in results.items():
        raw = r["raw_mqtt"]["pipelined_msg_s"]
        for row in r["throughput"]:
            ratio = row["changes_s"] / raw
            ok = ratio >= 2.0
            verdict = ("PASS" if ok else "FAIL") if kind == "mosquitto" else (
                "(pass)" if ok else "(fail)")
            row["ratio_to_raw"] = ratio
            row["target_changes_s"] = 2 * raw
            row["verdict"] = verdict
            cpu = row["cpu_ms_per_1000"]
            rows.append([kind, row["devices"], row["mode"], row["changes"], row["secs"],
                         row["changes_s"], raw, ratio, verdict, cpu["agents"], cpu["server"],
                         cpu["broker"], cpu["machine"], f"{row['load']['other_cores']:.2f}"])
    print_table(
        "Throughput: changes/s until every ack is applied at its device "
        "(target: >= 2 x raw pipelined msg/s through Mosquitto)",
        ["broker", "devices", "mode", "changes", "s", "changes/s", "raw msg/s", "ratio",
         "verdict", "CPU ms per 1000: agents", "server", "broker", "whole machine",
         "other load (cores)"],
        rows)
    rows = []
    for kind, r in results.items():
        lat = r["latency"]
        rtt = r["raw_mqtt"]["rtt_ms_p50"]
        target = rtt + 2 * commit + 0.5
        ok = lat["p50_ms"] <= target
        lat["target_p50_ms"] = target
        lat["verdict"] = "PASS" if ok else "FAIL"
        verdicts[f"latency_{kind}"] = lat["verdict"]
        rows.append([kind, lat["samples"], lat["p50_ms"], lat["p99_ms"], lat["put_p50_ms"],
                     rtt, r["raw_mqtt"]["rtt_ms_p99"], commit, target, lat["verdict"]])
    print_table(
        "Latency of one change on an idle link: put() start -> ack applied "
        "(target: p50 <= raw RTT p50 + 2 synced commits + 0.5 ms)",
        ["broker", "samples", "p50 ms", "p99 ms", "put() p50 ms", "raw RTT p50 ms",
         "raw RTT p99 ms", "synced commit ms", "target p50 ms", "verdict"],
        rows)
    for kind, r in results.items():
        for row in r["throughput"]:
            verdicts[f"throughput_{kind}_{row['devices']}dev_{row['mode']}"] = row["verdict"]
    write_json("e2e", {"quick": quick, "sizes": sizes, "machine_text": machine_text(),
                       "raw_lmdb": raw_lmdb, "agent_put_s": {"1": solo_rate, "10": fleet_rate},
                       "results": results, "verdicts": verdicts})


if __name__ == "__main__":
    sys.exit(main())
