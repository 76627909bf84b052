"""Ten thousand devices on one Mosquitto with one merge server (issue 12).

    python -m bench.scale [--devices 10000] [--procs 4] [--steady 120] [--keep]

1. Mosquitto from deploy/mosquitto/mosquitto.conf (bench.fleet), one merge server
   (`waystation server run`, LMDB store), every device registered, one login each.
   Devices are in routes of ten (scope `route-N`): each change fans out to nine others.
2. Raw limit, same run: every device connects with plain MQTT (clean session) and
   subscribes to its down topic, all at once; time until the last SUBACK.
3. Connect storm: every device connects at once (persistent session, will, retained
   status, hello, catch-up) until the last `checkpoint` arrived.
4. Steady state: each device writes one change a minute; server CPU (cores) and RSS,
   broker RSS, ack latency.

The simulated devices run `--procs` processes of bench.swarm (one network thread each).
RLIMIT_NOFILE is raised to the hard limit first (children inherit it): Mosquitto needs
one descriptor per connection.
"""

from __future__ import annotations

import argparse
import resource
import secrets
import time
from typing import Any

from bench.common import machine, print_table, write_json
from bench.fleet import (
    PROBE,
    RAW_DEVICE,
    SERVER_USER,
    Fleet,
    LineProc,
    proc_cpu_s,
    proc_memory,
    workdir,
)
from broker.embedded.passwords import hash_password

ROUTE = 10


def raise_nofile() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def snapshot(fleet: Fleet) -> dict[str, Any]:
    assert fleet.server is not None and fleet.broker is not None
    return {"t": time.monotonic(), "server_cpu": proc_cpu_s(fleet.server.pid),
            "broker_cpu": proc_cpu_s(fleet.broker.pid),
            "server_mem": proc_memory(fleet.server.pid),
            "broker_mem": proc_memory(fleet.broker.pid)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--steady", type=float, default=120.0)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    nofile = raise_nofile()
    devs = {f"sim-{i:05d}": f"route-{i // ROUTE}" for i in range(args.devices)}
    result: dict[str, Any] = {"machine": machine(), "devices": args.devices,
                              "procs": args.procs, "nofile": nofile,
                              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with workdir("scale", args.keep) as tmp:
        fleet = Fleet("mosquitto", tmp, {}, server_settings={})
        passwords = {d: secrets.token_urlsafe(9) for d in devs}
        bdir = tmp / "broker"
        bdir.mkdir(parents=True)
        t = time.perf_counter()
        with (bdir / "passwd").open("w") as fh:
            for user, pw in {**fleet.passwords, **passwords}.items():
                fh.write(f"{user}:{hash_password(pw)}\n")
        fleet.passwords = {k: v for k, v in fleet.passwords.items()
                           if k in (SERVER_USER, PROBE, RAW_DEVICE)}
        fleet.start_broker()
        store = fleet.open_server_store()
        from broker.server.store.base import DeviceRow

        def register(txn: Any) -> None:
            for d, scope in devs.items():
                txn.put_device(DeviceRow(d, (scope,), created_ms=0))
            txn.put_device(DeviceRow(PROBE, ("probe",), created_ms=0))
            txn.bump_registry()

        store.transact(register)
        store.close()
        result["setup_s"] = time.perf_counter() - t
        fleet.start_server()
        base = snapshot(fleet)
        sims = [LineProc(f"swarm-{i}", "bench.swarm", tmp / f"swarm-{i}.log")
                for i in range(args.procs)]
        names = list(devs)
        for i, sim in enumerate(sims):
            part = names[i::args.procs]
            sim.call("init", port=fleet.port, devices=[
                {"dev": d, "password": passwords[d], "scope": devs[d]} for d in part])

        def storm(raw: bool) -> dict[str, Any]:
            for sim in sims:
                sim.send("connect", raw=raw)
            replies = [sim.recv() for sim in sims]
            t0 = min(r["t0"] for r in replies)
            last = max(r["t0"] + (r["last_s"] or 1e9) - t0 for r in replies)
            return {"done": sum(r["done"] for r in replies), "settled_s": last,
                    "errors": sum(r["error_count"] for r in replies),
                    "sample_errors": [e for r in replies for e in r["errors"]][:5]}

        result["raw_storm"] = storm(raw=True)
        for sim in sims:
            sim.call("disconnect")
        time.sleep(2)
        s0 = snapshot(fleet)
        result["storm"] = storm(raw=False)
        s1 = snapshot(fleet)
        result["storm"]["server_cpu_s"] = s1["server_cpu"] - s0["server_cpu"]
        result["storm"]["server_rss_mb"] = s1["server_mem"].get("VmRSS", 0) / 2**20
        result["storm"]["broker_rss_mb"] = s1["broker_mem"].get("VmRSS", 0) / 2**20
        time.sleep(5)
        a = snapshot(fleet)
        for sim in sims:
            sim.send("steady", seconds=args.steady, per_minute=1.0)
        replies = [sim.recv() for sim in sims]
        b = snapshot(fleet)
        secs = b["t"] - a["t"]
        lat50 = sorted(r["p50_ms"] for r in replies if r["p50_ms"] is not None)
        lat99 = sorted(r["p99_ms"] for r in replies if r["p99_ms"] is not None)
        result["steady"] = {
            "seconds": secs, "written": sum(r["written"] for r in replies),
            "acked": sum(r["acked"] for r in replies),
            "unacked": sum(r["unacked"] for r in replies),
            "deltas": sum(r["deltas"] for r in replies),
            "errors": sum(r["error_count"] for r in replies),
            "ack_p50_ms": lat50[len(lat50) // 2] if lat50 else None,
            "ack_p99_ms": max(lat99) if lat99 else None,
            "server_cores": (b["server_cpu"] - a["server_cpu"]) / secs,
            "broker_cores": (b["broker_cpu"] - a["broker_cpu"]) / secs,
            "server_rss_mb": b["server_mem"].get("VmRSS", 0) / 2**20,
            "server_peak_rss_mb": b["server_mem"].get("VmHWM", 0) / 2**20,
            "server_anon_mb": b["server_mem"].get("RssAnon", 0) / 2**20,
            "broker_rss_mb": b["broker_mem"].get("VmRSS", 0) / 2**20,
            "server_rss_idle_mb": base["server_mem"].get("VmRSS", 0) / 2**20,
        }
        for sim in sims:
            sim.call("stop")
            sim.close()
        fleet.stop()
    st, sd = result["storm"], result["steady"]
    print_table("Connect storm (all at once) to all caught up, one Mosquitto, one server",
                ["devices", "raw MQTT connect+subscribe s", "storm to all caught up s",
                 "caught up", "server CPU s", "server RSS MiB", "broker RSS MiB"],
                [[args.devices, round(result["raw_storm"]["settled_s"], 1),
                  round(st["settled_s"], 1), st["done"], round(st["server_cpu_s"], 1),
                  round(st["server_rss_mb"]), round(st["broker_rss_mb"])]])
    print_table("Steady state: one change per device per minute",
                ["devices", "s", "changes", "acked", "deltas", "server cores",
                 "broker cores", "server RSS MiB", "broker RSS MiB", "ack p50 ms",
                 "ack p99 ms"],
                [[args.devices, round(sd["seconds"]), sd["written"], sd["acked"],
                  sd["deltas"], round(sd["server_cores"], 3), round(sd["broker_cores"], 3),
                  round(sd["server_rss_mb"]), round(sd["broker_rss_mb"]),
                  round(sd["ack_p50_ms"] or 0, 2), round(sd["ack_p99_ms"] or 0, 1)]])
    path = write_json("scale", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
