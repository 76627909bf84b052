"""Many real agent instances per process (issue 12): what one simulated device costs.

    python -m bench.agents_per_process [--sizes 500 1000] [--thread-sizes 100] [--quick]

Mosquitto from deploy/mosquitto/mosquitto.conf and one merge server (`waystation
server run`, LMDB store) as in bench/scale.py; then, per run, ONE process
(bench/agent_host.py) opens N real agents (`Agent.open`: an LMDB store each) and
starts N daemons at once - `AgentDaemon` as shipped for `--thread-sizes` (an engine
thread each), bench/agent_pool.py's `PooledDaemon` on one shared engine thread for
`--sizes` - until every one finished its first catch-up; then quiet for `--idle` s;
then each agent puts one ~300-byte task a minute for `--steady` s. Devices are in
routes of ten (every put is a delta to nine others). Per-device cost = (process RSS -
its RSS before the first agent opened) / N, and CPU cores / N. Prints a table, writes
bench/results/agents_per_process.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import print_table, write_json
from bench.fleet import PROBE, RAW_DEVICE, SERVER_USER, Fleet, LineProc, machine_text, workdir
from bench.rabbit_fleet import load_average, raise_nofile
from bench.servers import git_head
from broker.embedded.passwords import hash_password

ROUTE = 10


def device_name(size: int, engine: str, i: int, kind: str = "dev") -> str:
    """Distinct per run: a device id reused with a fresh store is another device."""
    return f"a{size}-{engine}-{kind}-{i:05d}"


def run_size(fleet: Fleet, tmp: Path, size: int, engine: str, passwords: dict[str, str],
             args: argparse.Namespace) -> dict[str, Any]:
    names = [device_name(size, engine, i) for i in range(size)]
    tag = f"{size}-{engine}"
    host = LineProc(f"agents-{tag}", "bench.agent_host", tmp / f"agents-{tag}.log")
    try:
        opened = host.call("init", port=fleet.port, root=str(tmp / f"agents-{tag}"),
                           devices=[{"dev": d, "password": passwords[d],
                                     "scopes": fleet.devices[d]} for d in names])
        base = opened["baseline_rss_mb"]
        started = host.call("start", engine=engine, timeout=args.timeout)
        print(f"[{tag}] started: {started}", flush=True)
        idle = host.call("idle", seconds=args.idle)
        steady = host.call("steady", seconds=args.steady, per_minute=1.0)
        print(f"[{tag}] idle {idle}; steady {steady}", flush=True)
        return {"agents": size, "engine": engine, "open": opened, "start": started,
                "idle": idle, "steady": steady,
                "per_device_kb": {
                    "opened": (opened["opened_rss_mb"] - base) * 1024 / size,
                    "connected": (started["rss_mb"] - base) * 1024 / size,
                    "steady": (steady["rss_mb"] - base) * 1024 / size},
                "per_device_millicores": {"idle": idle["cores"] * 1000 / size,
                                          "steady": steady["cores"] * 1000 / size},
                "per_device_fds": started["fds"] / size,
                "threads_per_device": started["threads"] / size}
    finally:
        host.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+",
                    help="agents per process on bench/agent_pool.py's shared engine "
                         "(500 1000)")
    ap.add_argument("--thread-sizes", type=int, nargs="*", default=[100],
                    help="agents per process with AgentDaemon as shipped (an engine "
                         "thread each); 500 of them overloaded this 2-core machine")
    ap.add_argument("--idle", type=float, default=20.0, metavar="S")
    ap.add_argument("--steady", type=float, default=60.0, metavar="S")
    ap.add_argument("--timeout", type=float, default=120.0, metavar="S",
                    help="until every agent caught up (then measured as it is)")
    ap.add_argument("--quick", action="store_true", help="50 and 100 agents, short phases")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    sizes = args.sizes or ([50, 100] if args.quick else [500, 1000])
    if args.quick:
        args.idle, args.steady = min(args.idle, 5.0), min(args.steady, 15.0)
    nofile = raise_nofile()
    runs = [(n, "threads") for n in args.thread_sizes] + [(n, "pool") for n in sizes]
    devices = {device_name(n, p, i): [device_name(n, p, i // ROUTE, "route")]
               for n, p in runs for i in range(n)}
    result: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "nofile": nofile,
                              "machine_text": machine_text(), "code": git_head(),
                              "load_average_start": load_average(), "sizes": sizes,
                              "idle_s": args.idle, "steady_s": args.steady}
    rows = []
    with workdir("ws-bench-agents-", args.keep) as tmp:
        fleet = Fleet("mosquitto", tmp, devices, server_settings={})
        passwords = dict(fleet.passwords)
        bdir = tmp / "broker"
        bdir.mkdir(parents=True)
        with (bdir / "passwd").open("w") as fh:  # once, not an entry rewrite per device
            for user, pw in passwords.items():
                fh.write(f"{user}:{hash_password(pw)}\n")
        fleet.passwords = {k: v for k, v in passwords.items()
                           if k in (SERVER_USER, PROBE, RAW_DEVICE)}
        try:
            fleet.start_broker()
            fleet.passwords = passwords
            fleet.start_server()
            for size, engine in runs:
                rows.append(run_size(fleet, tmp, size, engine, passwords, args))
        finally:
            fleet.stop()
    result["rows"] = rows
    result["load_average_end"] = load_average()
    print_table(
        "Real agents in one process (Agent + AgentDaemon + LMDB store each), Mosquitto, "
        "one server",
        ["agents", "engine", "start to all caught up s", "RSS MiB (process)",
         "KiB per device opened", "KiB per device connected", "KiB per device steady",
         "idle millicores/device",
         "1 change/min millicores/device", "acked/written", "ack p50 ms",
         "threads per device", "fds per device"],
        [[r["agents"], r["engine"], (f"{r['start']['last_s']:.1f}" if r["start"]["all"] else
           f"{r['start']['caught_up']} of {r['agents']} in {args.timeout:.0f}"),
          r["steady"]["rss_mb"],
          r["per_device_kb"]["opened"], r["per_device_kb"]["connected"],
          r["per_device_kb"]["steady"], r["per_device_millicores"]["idle"],
          r["per_device_millicores"]["steady"],
          f"{r['steady']['acked']}/{r['steady']['written']}",
          r["steady"]["ack_p50_ms"] or float("nan"), r["threads_per_device"],
          r["per_device_fds"]] for r in rows])
    write_json("agents_per_process", result)
    ok = all(r["start"]["all"] and r["steady"]["acked"] == r["steady"]["written"]
             for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
