"""Ten thousand devices through the three-node RabbitMQ cluster, and the changes/s one, two
and three merge servers reach there, beside raw QoS-1 through the same cluster (issue 12).

    python -m bench.scale_rabbit [--devices 10000] [--procs 3] [--quick] [--keep]

One run, everything started here and from nothing:

1. A private PostgreSQL (bench.servers.start_pg) and a three-node RabbitMQ cluster from
   deploy/rabbitmq (tests/rabbitmq_cluster.py: own ports, data dirs, cookie, epmd);
   every login imported at once (broker.rabbitmq.definitions: the design's ACL).
2. Raw QoS-1 round trips through the cluster, before any server runs (bench/raw.py; the
   shared up queue is not bound yet, so raw traffic goes only where raw MQTT sends it):
   a paho publisher on node 1, an echo client in another process on node 2
   republishing every message to the publisher's down topic.
3. Changes/s: for 1, 2 and 3 servers (`waystation server run` with `[amqp] nodes`, as
   deploy/README.md's RabbitMQ section configures it; a fresh PostgreSQL database
   each; each server starts on another node), 100 simulated devices
   (bench/simdevices.py, 25 per process, process i on node i mod 3) drain a backlog
   each at once; changes/s = changes / (go -> last ack), verified as bench/servers.py
   verifies its runs (every change applied exactly once, at one place in its scope's
   order; counters equal the sums sent).
4. Connect storm: one server, `--devices` registered devices in routes of ten; every
   device connects at once with a persistent session (a quorum queue per device,
   `mqtt.durable_queue_type = quorum`), last will, retained status, hello and
   catch-up, until the last `checkpoint` or `--storm-timeout`. The devices are
   bench/swarm.py processes (one selector thread each), process i on node i mod 3.
5. Raw storm: the same devices with a plain clean-session MQTT connect + subscribe, all
   at once; time until the last SUBACK (after step 4: see storm_phase).

Prints markdown tables and writes bench/results/scale_rabbit.json (machine, versions,
time of run, every figure).
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import write_json
from bench.fleet import (
    PROBE,
    RAW_DEVICE,
    SERVER_USER,
    LineProc,
    LoadMeter,
    call_all,
    machine_text,
    proc_cpu_s,
    proc_memory,
    workdir,
)
from bench.rabbit_fleet import (
    RabbitBenchFleet,
    cluster_definitions,
    import_definitions,
    load_average,
    node_memory,
    nodes_cpu_s,
    purge_up_queue,
    raise_nofile,
)
from bench.raw import mqtt_limits
from bench.scale_rabbit_report import report
from bench.servers import (
    APPLIED,
    DEPOT_EVERY,
    DEVICES_PER_PROCESS,
    GAP_S,
    GROUP_S,
    Sampler,
    SimProc,
    fleet_devices,
    git_head,
    pg_version,
    registered_scopes,
    start_pg,
    verify,
)
from tests.rabbitmq_cluster import RABBITMQ_BIN, RabbitCluster, rabbitmq_unavailable

ROUTE = 10


def versions(cluster: RabbitCluster, pg: Any) -> dict[str, str]:
    out = {"postgres": pg_version(pg), "machine": machine_text()}
    with contextlib.suppress(Exception):
        out["rabbitmq"] = cluster.ctl(0, "version").strip()
    with contextlib.suppress(Exception):
        out["erlang"] = subprocess.run(
            [str(RABBITMQ_BIN.parent / "bin" / "rabbitmq-diagnostics"), "-n",
             cluster.nodes[0].name, "erlang_version", "-q"], env=cluster.base_env(),
            capture_output=True, text=True, timeout=60).stdout.strip()
    return out


# ------------------------------------------------------------------ phases

def storm_phase(args: argparse.Namespace, tmp: Path, cluster: RabbitCluster, pg: Any,
                swarms: list[LineProc], devs: dict[str, str], passwords: dict[str, str],
                out: dict[str, Any]) -> None:
    """The storm with one server (step 4), then the raw connect+subscribe storm (5);
    figures go into `out` as they are measured, so a later failure keeps them."""

    def storm(raw: bool) -> dict[str, Any]:
        for sim in swarms:
            sim.send("connect", raw=raw, timeout=args.storm_timeout)
        replies = [sim.recv() for sim in swarms]
        t0 = min(r["t0"] for r in replies)
        done = sum(r["done"] for r in replies)
        last = max(r["t0"] + (r["last_s"] or 0.0) - t0 for r in replies)
        return {"done": done, "all": done == len(devs), "settled_s": last,
                "p50_s": sorted(r["p50_s"] or 0.0 for r in replies)[len(replies) // 2],
                "errors": sum(r["error_count"] for r in replies),
                "sample_errors": [e for r in replies for e in r["errors"]][:5]}

    url = pg.create_database("storm")
    fleet = RabbitBenchFleet(tmp / "storm", cluster, {d: [s] for d, s in devs.items()},
                             store={"kind": "postgres", "url": url}, passwords=passwords,
                             run_id="storm")
    try:
        fleet.start_broker()
        fleet.start_servers(1)
        assert fleet.server is not None
        pid = fleet.server.pid
        out["server_rss_idle_mb"] = proc_memory(pid).get("VmRSS", 0) / 2**20
        out["nodes_rss_before_mb"] = node_memory(cluster)
        cpu0, ncpu0, t0 = proc_cpu_s(pid), nodes_cpu_s(cluster), time.perf_counter()
        load = LoadMeter()
        out["storm"] = storm(raw=False)
        secs = time.perf_counter() - t0
        out["storm"]["server_rss_idle_mb"] = out["server_rss_idle_mb"]
        out["storm"].update({
            "server_cpu_s": proc_cpu_s(pid) - cpu0,
            "nodes_cpu_s": [b - a for a, b in zip(ncpu0, nodes_cpu_s(cluster), strict=True)],
            "server_rss_mb": proc_memory(pid).get("VmRSS", 0) / 2**20,
            "server_peak_rss_mb": proc_memory(pid).get("VmHWM", 0) / 2**20,
            "nodes_rss_mb": node_memory(cluster), "wall_s": secs, "load": load.result()})
        print(f"[storm] {out['storm']}", flush=True)
        # connected and idle for a while: what the fleet costs at rest
        time.sleep(10)
        cpu1, t1 = proc_cpu_s(pid), time.perf_counter()
        ncpu1 = nodes_cpu_s(cluster)
        time.sleep(args.idle)
        secs = time.perf_counter() - t1
        out["connected_idle"] = {
            "seconds": secs, "server_cores": (proc_cpu_s(pid) - cpu1) / secs,
            "nodes_cores": [(b - a) / secs for a, b in zip(ncpu1, nodes_cpu_s(cluster),
                                                           strict=True)],
            "server_rss_mb": proc_memory(pid).get("VmRSS", 0) / 2**20,
            "nodes_rss_mb": node_memory(cluster)}
        print(f"[idle] {out['connected_idle']}", flush=True)
        call_all(swarms, "disconnect")
    finally:
        fleet.stop()
    # The raw limit after the real storm (not before it): 10,000 plain subscribes wedged
    # the cluster for longer than a run can wait (see bench/README.md), and the storm
    # through the product is what this benchmark is for.
    out["raw_storm"] = storm(raw=True)
    call_all(swarms, "disconnect")
    print(f"[storm] raw connect+subscribe: {out['raw_storm']}", flush=True)


def throughput_run(args: argparse.Namespace, tmp: Path, cluster: RabbitCluster, pg: Any,
                   nservers: int, specs: dict[str, dict[str, Any]],
                   passwords: dict[str, str]) -> dict[str, Any]:
    """One drain with `nservers` servers (step 4), verified."""
    name = f"{nservers}s"
    print(f"[{name}] {len(specs)} devices x {args.per_device} changes ...", flush=True)
    purge_up_queue(cluster)
    url = pg.create_database(f"thr_{nservers}")
    fleet = RabbitBenchFleet(tmp / name, cluster,
                             {d: registered_scopes(s) for d, s in specs.items()},
                             store={"kind": "postgres", "url": url}, passwords=passwords,
                             run_id=f"thr{nservers}")
    sims: list[LineProc] = []
    sampler: Sampler | None = None
    try:
        fleet.start_broker()
        fleet.start_servers(nservers)
        names = list(specs)
        for index in range((len(names) + DEVICES_PER_PROCESS - 1) // DEVICES_PER_PROCESS):
            host = SimProc(index, fleet.dir)
            sims.append(host)
            chunk = names[index * DEVICES_PER_PROCESS:(index + 1) * DEVICES_PER_PROCESS]
            host.send("init", port=cluster.mqtt_port(index % len(cluster.nodes)),
                     changes=args.per_device, depot_every=DEPOT_EVERY, ack_timeout_s=30.0,
                     devices=[{"dev": d, "password": passwords[d], **specs[d]}
                              for d in chunk])
        for sim in sims:
            sim.recv()
        call_all(sims, "connect")
        time.sleep(0.5)  # presence and hellos settle before the clock starts
        sampler = Sampler(fleet, url)
        m0 = [fleet.scrape(i) for i in range(nservers)]
        s0 = [proc_cpu_s(p) for p in fleet.server_pids()]
        n0, load = nodes_cpu_s(cluster), LoadMeter()
        sampler.start()
        res = call_all(sims, "go", timeout=900)
        t0 = min(r["t_go"] for r in res)
        t1 = max((d["t_done"] or 0.0) for r in res for d in r["devices"])
        secs = t1 - t0
        s1 = [proc_cpu_s(p) for p in fleet.server_pids()]
        n1, loadr = nodes_cpu_s(cluster), load.result()
        m1 = [fleet.scrape(i) for i in range(nservers)]
        sampler.stop()
        rss = [proc_memory(p).get("VmRSS", 0) / 2**20 for p in fleet.server_pids()]
        nodes_rss = node_memory(cluster)
        total = len(specs) * args.per_device
        call_all(sims, "stop")
        fleet.stop_server()
        check = verify(fleet, res, m0, m1, total)
        applied = [b.get(APPLIED, 0) - a.get(APPLIED, 0) for a, b in zip(m0, m1, strict=True)]
        row = {
            "servers": nservers, "devices": len(specs), "per_device": args.per_device,
            "changes": total, "secs": secs, "changes_s": total / secs,
            "server_side": sampler.server_rate(sum(a.get(APPLIED, 0) for a in m0)),
            "share_by_server": [a / max(1, sum(applied)) for a in applied],
            "busy_by_server": [(b.get(GROUP_S, 0) - a.get(GROUP_S, 0)) / secs
                               for a, b in zip(m0, m1, strict=True)],
            "server_cores_each": [(b - a) / secs for a, b in zip(s0, s1, strict=True)],
            "nodes_cores": [(b - a) / secs for a, b in zip(n0, n1, strict=True)],
            "server_rss_mb": rss, "nodes_rss_mb": nodes_rss, "load": loadr,
            "verify": check}
        verdict = "ok" if check["ok"] else "WRONG: " + "; ".join(check["problems"])
        print(f"[{name}] {total} changes in {secs:.2f} s = {total / secs:,.0f} changes/s; "
              f"verified: {verdict}", flush=True)
        return row
    finally:
        if sampler is not None:
            sampler.stop()
            sampler.close()
        for sim in sims:
            sim.close()
        fleet.stop()


# ------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, help="connect-storm fleet (10,000; --quick 300)")
    ap.add_argument("--procs", type=int, default=3, help="swarm processes for the storm")
    ap.add_argument("--per-device", type=int, help="backlog per throughput device "
                                                   "(1,000; --quick 100)")
    ap.add_argument("--throughput-devices", type=int, default=100)
    ap.add_argument("--storm-timeout", type=float, default=300.0, metavar="S",
                    help="each storm is measured as far as it got after S seconds")
    ap.add_argument("--idle", type=float, default=30.0, metavar="S",
                    help="seconds measured with every device connected and idle")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    args.devices = args.devices or (300 if args.quick else 10_000)
    args.per_device = args.per_device or (100 if args.quick else 1000)
    if args.quick:
        args.idle = min(args.idle, 5.0)
    reason = rabbitmq_unavailable()
    if reason:
        print(reason)
        return 2
    nofile = raise_nofile()
    started = time.time()
    devs = {f"sim-{i:05d}": f"route-{i // ROUTE}" for i in range(args.devices)}
    thr_specs = {n: {f"t{n}-{d}": {**s, "scopes": [f"t{n}-{x}" for x in s["scopes"]]}
                     for d, s in fleet_devices(args.throughput_devices, "routes").items()}
                 for n in (1, 2, 3)}
    users = [*devs, *(d for specs in thr_specs.values() for d in specs),
             SERVER_USER, PROBE, RAW_DEVICE]
    passwords = {u: secrets.token_urlsafe(12) for u in users}
    result: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "devices": args.devices,
        "procs": args.procs, "nofile": nofile, "quick": args.quick,
        "throughput_devices": args.throughput_devices, "per_device": args.per_device,
        "code": git_head(), "load_average_start": load_average()}
    errors: list[str] = []
    with workdir("ws-bench-scale-rabbit-", args.keep) as tmp:
        pg = start_pg()
        cluster = RabbitCluster(tmp / "rabbit")
        swarms: list[LineProc] = []
        try:
            t = time.perf_counter()
            cluster.start()
            result["cluster_start_s"] = time.perf_counter() - t
            result["versions"] = versions(cluster, pg)
            print(f"versions: {result['versions']}", flush=True)
            t = time.perf_counter()
            import_definitions(cluster, cluster_definitions(passwords, bindings=False))
            result["import_s"] = time.perf_counter() - t
            result["users"] = len(passwords)
            raw_fleet = RabbitBenchFleet(tmp / "raw", cluster, {}, store={},
                                         passwords=passwords, run_id="raw")
            raw_fleet.start_broker()
            # quick=True: 5,000 messages a pipelined run (20,000 take minutes here)
            result["raw_mqtt"] = mqtt_limits(raw_fleet, quick=True, rtt_samples=100,
                                             gap_s=GAP_S, echo_port=cluster.mqtt_port(1))
            print(f"[raw] {result['raw_mqtt']}", flush=True)
            import_definitions(cluster, cluster_definitions({}, bindings=True))
            names = list(devs)
            for i in range(args.procs):
                swarm = LineProc(f"swarm-{i}", "bench.swarm", tmp / f"swarm-{i}.log")
                swarms.append(swarm)
                swarm.call("init", port=cluster.mqtt_port(i % len(cluster.nodes)), devices=[
                    {"dev": d, "password": passwords[d], "scope": devs[d]}
                    for d in names[i::args.procs]])
            rows = []
            for n in (1, 2, 3):
                try:
                    rows.append(throughput_run(args, tmp, cluster, pg, n, thr_specs[n],
                                               passwords))
                except Exception as exc:  # one broken run must not lose the others
                    traceback.print_exc()
                    errors.append(f"{n} server(s): {type(exc).__name__}: {exc}")
            result["throughput"] = rows
            try:
                storm_phase(args, tmp, cluster, pg, swarms, devs, passwords, result)
            except Exception as exc:
                traceback.print_exc()
                errors.append(f"storm: {type(exc).__name__}: {exc}")
            for sim in swarms:
                sim.close()
            swarms.clear()
            result["nodes_rss_sessions_offline_mb"] = node_memory(cluster)
        except Exception as exc:
            traceback.print_exc()
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            for sim in swarms:
                with contextlib.suppress(Exception):
                    sim.close()
            cluster.stop()
            pg.cleanup()
    result["errors"] = errors
    result["minutes"] = (time.time() - started) / 60
    result["load_average_end"] = load_average()
    report(result)
    write_json("scale_rabbit", result)
    for error in errors:
        print(f"run failed: {error}")
    wrong = [r for r in result.get("throughput", []) if not r["verify"]["ok"]]
    return 1 if errors or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
