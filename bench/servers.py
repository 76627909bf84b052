"""Several merge servers over PostgreSQL through Mosquitto: changes/s applied by 1, 2 and 3
`waystation server run` processes sharing one database, for 10 and 100 simulated
devices; the LMDB store with one server beside them; each row next to the raw paho
QoS-1 round-trip rate through the same Mosquitto, measured in the same run.

    .venv/bin/python -m bench.servers [--quick] [--reps N] [--no-agents] [--keep]

Every run starts from nothing: a fresh Mosquitto from the production config
(bench/fleet.py), a fresh database on a private PostgreSQL 15 (tests/pgserver.py,
durable settings: fsync and synchronous commit on) or a fresh LMDB store, then:

1. raw limits through that Mosquitto before any server runs (bench/raw.py): pipelined
   QoS-1 round trips/s and the one-at-a-time p50;
2. the servers start (`waystation server run`, shared subscription `waystation`,
   each with its metrics endpoint); the devices are registered in the store;
3. the simulated devices (bench/simdevices.py: protocol-level devices, each a real MQTT
   client with its own login, session and in-memory outbox; 25 to a process) connect,
   say hello and catch up; each holds a backlog of changes spread over 4 route scopes
   of its own (a new ~300-byte task per change, every 10th change of a route an
   increment of that route's tally counter; the "depots" workload adds an increment of
   a stock counter shared by the 10 devices of a depot every 20th change);
4. go: every device drains at once; changes/s = changes / (go -> last ack received);
   meanwhile the servers' metrics endpoints are scraped (server-side applied/s, the
   share of each server, how busy each merge worker was) and so is PostgreSQL's
   pg_stat_activity (how many server transactions wait on a lock); CPU per component
   from /proc/<pid>/stat;
5. verification, so that a fast but wrong run cannot be reported: every change acked
   once and none rejected; applied (sum of the servers' metrics) == changes written;
   outcomes in the store == changes written; each scope's sequence == the changes
   written to it and the q's the devices were acked with are exactly 1..that sequence
   (every change applied once, at one place in its scope's log); records stored ==
   records written; every counter's stored total == the sum of the increments the
   devices sent.

A cross-check (skipped by --no-agents) drains 10 real agent processes (bench/device.py:
agent + daemon + LMDB outbox, the existing e2e harness) the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import print_table, write_json
from bench.fleet import (
    DeviceProc,
    Fleet,
    LineProc,
    LoadMeter,
    call_all,
    copy_tree,
    find_mosquitto,
    machine_text,
    process_table,
    tree_cpu_s,
    workdir,
)
from bench.raw import mqtt_limits

ROUTES_PER_DEVICE = 4
DEPOT_SIZE = 10
DEPOT_EVERY = 20
DEVICES_PER_PROCESS = 25
GAP_S = 0.02
APPLIED = 'waystation_server_changes_total{outcome="applied"}'
DUPLICATE = 'waystation_server_changes_total{outcome="duplicate"}'
GROUPS = "waystation_server_groups_total"
GROUP_S = "waystation_server_group_seconds_total"
MSGS_IN = 'waystation_server_messages_total{direction="in"}'
COUNTER_FIELD = {"tasks": "attempts", "inventory": "stock"}
PG_SETTINGS = ["shared_buffers = 256MB"]
"""Added to tests/pgserver.py's settings (its 32 MB is sized for test suites)."""


# ------------------------------------------------------------------ the workload

def fleet_devices(count: int, workload: str) -> dict[str, dict[str, Any]]:
    """Device id -> {scopes (its own routes), depot (shared scope or None), seed}."""
    out: dict[str, dict[str, Any]] = {}
    for i in range(count):
        dev = f"sim-{i:03d}"
        out[dev] = {"scopes": [f"{dev}-r{j}" for j in range(ROUTES_PER_DEVICE)],
                    "depot": f"depot-{i // DEPOT_SIZE:02d}" if workload == "depots" else None,
                    "seed": i}
    return out


def registered_scopes(spec: dict[str, Any]) -> list[str]:
    return spec["scopes"] + ([spec["depot"]] if spec["depot"] else [])


class SimProc(LineProc):
    """A `python -m bench.simdevices` process hosting several simulated devices."""

    def __init__(self, index: int, workdir: Path) -> None:
        super().__init__(f"simdevices-{index}", "bench.simdevices",
                         workdir / f"simdevices-{index}.log")


# ------------------------------------------------------------------ measuring

class Sampler(threading.Thread):
    """Scrapes every server's metrics endpoint (every 0.2 s) and PostgreSQL's
    pg_stat_activity (every 0.05 s) while the devices drain."""

    def __init__(self, fleet: Fleet, pg_url: str | None) -> None:
        super().__init__(name="sampler", daemon=True)
        self.fleet = fleet
        self.metrics: list[tuple[float, list[dict[str, float]]]] = []
        self.activity: list[tuple[int, int, int]] = []  # (lock wait, in transaction, running)
        self._stop_event = threading.Event()
        self.queries = 0  # our own transactions in the database, not the servers'
        self._conn: Any = None
        if pg_url:
            import psycopg

            self._conn = psycopg.connect(pg_url, autocommit=True)

    def pg_db_stats(self) -> dict[str, int]:
        if self._conn is None:
            return {}
        row = self._conn.execute(
            "SELECT xact_commit, xact_rollback, deadlocks FROM pg_stat_database "
            "WHERE datname = current_database()").fetchone()
        self.queries += 1
        return {"commits": int(row[0]), "rollbacks": int(row[1]), "deadlocks": int(row[2])}

    def run(self) -> None:
        next_scrape = 0.0
        while not self._stop_event.is_set():
            now = time.perf_counter()
            if now >= next_scrape:
                next_scrape = now + 0.2
                with contextlib.suppress(OSError):
                    self.metrics.append((now, [self.fleet.scrape(i)
                                               for i in range(len(self.fleet.servers))]))
            if self._conn is not None:
                row = self._conn.execute(
                    "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'), "
                    "count(*) FILTER (WHERE state LIKE 'idle in transaction%%'), "
                    "count(*) FILTER (WHERE state = 'active' "
                    "AND wait_event_type IS DISTINCT FROM 'Lock') "
                    "FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'waystation' AND pid <> pg_backend_pid()"
                ).fetchone()
                self.queries += 1
                self.activity.append((int(row[0]), int(row[1]), int(row[2])))
            self._stop_event.wait(0.05)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def server_rate(self, base: float) -> dict[str, Any]:
        """Applied changes/s seen by the metrics: applied / (last sample before the
        counter moved -> first sample at its final value); 0.2 s resolution."""
        series = [(t, sum(m.get(APPLIED, 0.0) for m in ms)) for t, ms in self.metrics]
        if len(series) < 2:
            return {"applied_s": float("nan")}
        final = series[-1][1]
        start = max((t for t, a in series if a <= base), default=series[0][0])
        end = min((t for t, a in series if a >= final), default=series[-1][0])
        peak = 0.0
        for i, (t, a) in enumerate(series):
            for t2, a2 in series[i + 1:]:
                if t2 - t >= 1.0:
                    peak = max(peak, (a2 - a) / (t2 - t))
                    break
        span = end - start
        return {"applied_s": (final - base) / span if span > 0 else float("nan"),
                "span_s": span, "peak_1s_applied_s": peak}


def cpu_snapshot(fleet: Fleet, pg: Any, sims: list[LineProc]) -> dict[str, Any]:
    table = process_table()
    assert fleet.broker is not None
    return {"mosquitto": tree_cpu_s(fleet.broker.pid, table),
            "servers": [table.get(p.pid, (0, 0.0))[1] for p in fleet.servers],
            "postgres": tree_cpu_s(pg.pid, table) if pg is not None and pg.pid else 0.0,
            "devices": sum(tree_cpu_s(s.pid, table) for s in sims),
            "bench": table.get(os.getpid(), (0, 0.0))[1]}


def cpu_cores(a: dict[str, Any], b: dict[str, Any], secs: float) -> dict[str, Any]:
    out: dict[str, Any] = {k: (b[k] - a[k]) / secs for k in ("mosquitto", "postgres",
                                                             "devices", "bench")}
    out["servers_each"] = [(y - x) / secs for x, y in zip(a["servers"], b["servers"],
                                                          strict=True)]
    out["servers"] = sum(out["servers_each"])
    return out


def start_py_spy(fleet: Fleet, name: str) -> list[Any]:
    """py-spy (raw folded stacks, all threads, 200 Hz) on every server while it drains."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(__file__).parent / "results" / "profiles"
    out.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([spy, "record", "-r", "200", "--threads", "--idle", "-f", "raw",
                              "-o", str(out / f"{name}-{proc.name}.txt"), "-p", str(proc.pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for proc in fleet.servers]


def stop_py_spy(spies: list[Any]) -> None:
    import signal

    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        spy.wait(30)


# ------------------------------------------------------------------ verification

def verify(fleet: Fleet, res: list[dict[str, Any]], m0: list[dict[str, float]],
           m1: list[dict[str, float]], total: int) -> dict[str, Any]:
    """Everything applied exactly once (see the module docstring); servers stopped."""
    from waystation import merge

    problems: list[str] = []
    devices = [d for r in res for d in r["devices"]]
    acked = sum(d["acked"] for d in devices)
    rejected = sum(d["rejected_count"] for d in devices)
    if any(r["timed_out"] for r in res):
        problems.append("timed out before every change was acked")
    if acked != total:
        problems.append(f"acked {acked} of {total}")
    if rejected:
        sample = [d["rejected"] for d in devices if d["rejected"]][:2]
        problems.append(f"{rejected} changes rejected, e.g. {sample}")
    applied = sum(b.get(APPLIED, 0) - a.get(APPLIED, 0) for a, b in zip(m0, m1, strict=True))
    duplicates = sum(b.get(DUPLICATE, 0) - a.get(DUPLICATE, 0)
                     for a, b in zip(m0, m1, strict=True))
    if applied != total:
        problems.append(f"servers' metrics say {applied:.0f} applied, {total} written")
    q_by_scope: dict[str, list[int]] = {}
    count_by_scope: dict[str, int] = {}
    totals: dict[str, int] = {}
    for r in res:
        for scope, qs in r["q_by_scope"].items():
            q_by_scope.setdefault(scope, []).extend(qs)
        for scope, n in r["count_by_scope"].items():
            count_by_scope[scope] = count_by_scope.get(scope, 0) + n
        for key, v in r["totals"].items():
            totals[key] = totals.get(key, 0) + v
    store = fleet.open_server_store()
    try:
        with store.read() as txn:
            counts = txn.counts()
            seqs = txn.scope_seqs()
            stored: dict[str, Any] = {}
            for key in totals:
                c, k = key.split("/", 1)
                raw = txn.get_record(c, k)
                stored[key] = (None if raw is None else
                               merge.to_rec(merge.from_json(raw)).get("f", {}).get(
                                   COUNTER_FIELD[c]))
    finally:
        store.close()
    if counts["outcomes"] != total:
        problems.append(f"{counts['outcomes']} outcomes stored, {total} changes written")
    want_records = sum(r["new_records"] for r in res) + len(totals)
    if counts["records"] != want_records:
        problems.append(f"{counts['records']} records stored, {want_records} expected")
    bad_scopes = []
    for scope, n in count_by_scope.items():
        qs = sorted(q_by_scope.get(scope, []))
        if seqs.get(scope, 0) != n or qs != list(range(1, n + 1)):
            bad_scopes.append(f"{scope}: seq {seqs.get(scope, 0)}, {n} written, "
                              f"{len(qs)} acked, {len(set(qs))} distinct q")
    if bad_scopes:
        problems.append(f"{len(bad_scopes)} scopes wrong, e.g. {bad_scopes[:3]}")
    wrong = {k: (stored[k], v) for k, v in totals.items() if stored[k] != v}
    if wrong:
        problems.append(f"{len(wrong)} of {len(totals)} counters wrong (stored, expected): "
                        f"{dict(list(wrong.items())[:3])}")
    return {"ok": not problems, "problems": problems, "acked": acked, "rejected": rejected,
            "applied_metrics": applied, "duplicates_metrics": duplicates,
            "outcomes": counts["outcomes"], "records": counts["records"],
            "scopes_checked": len(count_by_scope), "counters_checked": len(totals),
            "dup_acks": sum(d["dup_acks"] for d in devices),
            "resent": sum(d["resent"] for d in devices)}


# ------------------------------------------------------------------ one run

class Context:
    def __init__(self, args: argparse.Namespace, tmp: Path, pg: Any) -> None:
        self.args = args
        self.tmp = tmp
        self.pg = pg
        self.runs = 0


def run_sim(ctx: Context, store_kind: str, nservers: int, ndev: int, per_dev: int,
            workload: str) -> dict[str, Any]:
    ctx.runs += 1
    name = f"{store_kind}-{nservers}s-{ndev}d-{workload}-{ctx.runs}"
    print(f"[{name}] {ndev} devices x {per_dev} changes, {nservers} server(s) ...",
          flush=True)
    specs = fleet_devices(ndev, workload)
    db = f"bench_{ctx.runs}"
    store = None
    url = None
    if store_kind == "postgres":
        url = ctx.pg.create_database(db)
        store = {"kind": "postgres", "url": url}
    fleet = Fleet("mosquitto", ctx.tmp / name,
                  {dev: registered_scopes(spec) for dev, spec in specs.items()}, store=store)
    sims: list[LineProc] = []
    sampler: Sampler | None = None
    try:
        fleet.start_broker()
        raw = mqtt_limits(fleet, quick=ctx.args.quick, rtt_samples=100, gap_s=GAP_S)
        fleet.start_servers(nservers)
        names = list(specs)
        for index in range((ndev + DEVICES_PER_PROCESS - 1) // DEVICES_PER_PROCESS):
            sims.append(SimProc(index, fleet.dir))
        for i, sim in enumerate(sims):
            chunk = names[i * DEVICES_PER_PROCESS:(i + 1) * DEVICES_PER_PROCESS]
            sim.send("init", port=fleet.port, changes=per_dev, depot_every=DEPOT_EVERY,
                     ack_timeout_s=ctx.args.ack_timeout,
                     devices=[{"dev": d, "password": fleet.passwords[d], **specs[d]}
                              for d in chunk])
        init = [s.recv() for s in sims]
        connect = call_all(sims, "connect")
        time.sleep(0.5)  # presence and hellos settle before the clock starts
        sampler = Sampler(fleet, url)
        db0 = sampler.pg_db_stats()
        m0 = [fleet.scrape(i) for i in range(nservers)]
        load = LoadMeter()
        cpu0 = cpu_snapshot(fleet, ctx.pg if url else None, sims)
        spies = start_py_spy(fleet, name) if ctx.args.py_spy else []
        sampler.start()
        res = call_all(sims, "go", timeout=900)
        stop_py_spy(spies)
        cpu1 = cpu_snapshot(fleet, ctx.pg if url else None, sims)
        loadr = load.result()
        m1 = [fleet.scrape(i) for i in range(nservers)]
        sampler.stop()
        t0 = min(r["t_go"] for r in res)
        t1 = max((d["t_done"] or 0.0) for r in res for d in r["devices"])
        secs = t1 - t0
        total = ndev * per_dev
        call_all(sims, "stop")
        fleet.stop_server()  # (backends flush their statistics as they exit)
        db1 = sampler.pg_db_stats()
        check = verify(fleet, res, m0, m1, total)
        applied = [b.get(APPLIED, 0) - a.get(APPLIED, 0) for a, b in zip(m0, m1, strict=True)]
        msgs = [b.get(MSGS_IN, 0) - a.get(MSGS_IN, 0) for a, b in zip(m0, m1, strict=True)]
        groups = [b.get(GROUPS, 0) - a.get(GROUPS, 0) for a, b in zip(m0, m1, strict=True)]
        busy = [(b.get(GROUP_S, 0) - a.get(GROUP_S, 0)) / secs
                for a, b in zip(m0, m1, strict=True)]
        act = sampler.activity
        row: dict[str, Any] = {
            "store": store_kind, "servers": nservers, "devices": ndev, "workload": workload,
            "per_device": per_dev, "changes": total, "secs": secs, "changes_s": total / secs,
            "server_side": sampler.server_rate(sum(a.get(APPLIED, 0) for a in m0)),
            "applied_by_server": applied, "messages_by_server": msgs,
            "groups_by_server": groups, "busy_by_server": busy,
            "share_by_server": [a / max(1, sum(applied)) for a in applied],
            "raw_mqtt": raw, "cpu_cores": cpu_cores(cpu0, cpu1, secs), "load": loadr,
            "connect_s": max(c["connect_s"] for c in connect),
            "batches": sum(i["batches"] for i in init),
            "payload_mb_up": sum(i["payload_bytes"] for i in init) / 1e6,
            "deltas_received": sum(d["deltas"] for r in res for d in r["devices"]),
            "device_finish_s": sorted((d["t_done"] or t1) - t0
                                      for r in res for d in r["devices"]),
            "verify": check,
        }
        if url:
            n = max(1, len(act))
            row["postgres"] = {
                # pg_stat_database's commit counts lag (backends flush them about once
                # a second), so a short drain can even read negative: the servers' own
                # group counter (`groups_by_server`) counts the merge transactions.
                "deadlocks": db1["deadlocks"] - db0["deadlocks"],
                "avg_lock_waiting": sum(a[0] for a in act) / n,
                "avg_in_transaction": sum(a[1] for a in act) / n,
                "avg_running_sql": sum(a[2] for a in act) / n, "samples": len(act)}
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
        if url:
            with contextlib.suppress(Exception):
                ctx.pg.drop_database(db)


# ------------------------------------------------------------------ cross-check: real agents

def prepare_agent_backlogs(ctx: Context, count: int, per_dev: int) -> dict[str, Path]:
    """`per_dev` changes in the LMDB outbox of `count` real agents (no daemon), in
    parallel; copied for every run."""
    names = [f"agent-{i:02d}" for i in range(count)]
    base = ctx.tmp / "agent-backlogs"
    fleet = Fleet("mosquitto", base, {n: [f"{n}-r0"] for n in names})
    procs = [DeviceProc(n, fleet.agent_config(n, base / n, port=1), base) for n in names]
    try:
        call_all(procs, "write", count=per_dev)
    finally:
        for proc in procs:
            proc.close()
    return {n: base / n for n in names}


def run_agents(ctx: Context, backlogs: dict[str, Path], store_kind: str, nservers: int,
               per_dev: int) -> dict[str, Any]:
    ctx.runs += 1
    name = f"agents-{store_kind}-{nservers}s-{ctx.runs}"
    print(f"[{name}] {len(backlogs)} agent processes x {per_dev} changes, {nservers} "
          "server(s) ...", flush=True)
    db = f"bench_{ctx.runs}"
    url = ctx.pg.create_database(db) if store_kind == "postgres" else None
    store = {"kind": "postgres", "url": url} if url else None
    fleet = Fleet("mosquitto", ctx.tmp / name, {n: [f"{n}-r0"] for n in backlogs}, store=store)
    try:
        fleet.start_broker()
        fleet.start_servers(nservers)
        devs = [fleet.device(n, copy_tree(p, fleet.dir / "dev" / n)) for n, p in backlogs.items()]
        os.sync()
        m0 = [fleet.scrape(i) for i in range(nservers)]
        load = LoadMeter()
        cpu0 = cpu_snapshot(fleet, ctx.pg if url else None, devs)
        res = call_all(devs, "start", wait="drained")
        cpu1 = cpu_snapshot(fleet, ctx.pg if url else None, devs)
        loadr = load.result()
        m1 = [fleet.scrape(i) for i in range(nservers)]
        secs = max(r["t_drained"] for r in res) - min(r["t0"] for r in res)
        total = per_dev * len(devs)
        for dev in devs:
            fleet.close_device(dev)
        fleet.stop_server()
        problems = []
        applied = sum(b.get(APPLIED, 0) - a.get(APPLIED, 0) for a, b in zip(m0, m1, strict=True))
        if applied != total:
            problems.append(f"metrics: {applied:.0f} applied of {total}")
        store_ = fleet.open_server_store()
        try:
            with store_.read() as txn:
                outcomes = txn.counts()["outcomes"]
                seqs = txn.scope_seqs()
        finally:
            store_.close()
        if outcomes != total:
            problems.append(f"{outcomes} outcomes of {total}")
        wrong = [n for n in backlogs if seqs.get(f"{n}-r0") != per_dev]
        if wrong:
            problems.append(f"scope sequences wrong for {wrong}")
        stats = [r.get("stats", {}) for r in res]
        row = {"store": store_kind, "servers": nservers, "devices": len(devs),
               "per_device": per_dev, "changes": total, "secs": secs,
               "changes_s": total / secs, "load": loadr,
               "cpu_cores": cpu_cores(cpu0, cpu1, secs),
               "resent": sum(s.get("resent", 0) for s in stats),
               "batches": sum(s.get("batches_sent", 0) for s in stats),
               "verify": {"ok": not problems, "problems": problems, "outcomes": outcomes,
                          "applied_metrics": applied}}
        print(f"[{name}] {total / secs:,.0f} changes/s; verified: "
              f"{problems or 'ok'}", flush=True)
        return row
    finally:
        fleet.stop()
        if url:
            with contextlib.suppress(Exception):
                ctx.pg.drop_database(db)


# ------------------------------------------------------------------ main

def start_pg() -> Any:
    """A private PostgreSQL (tests/pgserver.py: its own directory, which the `postgres`
    user can reach when we run as root, and a free port; never the system cluster)."""
    from tests.pgserver import PgServer, unavailable_reason

    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"PostgreSQL is needed: {reason}")
    pg = PgServer()
    pg.initdb()
    with (pg.data_dir / "postgresql.conf").open("a") as conf:
        conf.write("# --- bench/servers.py\n" + "\n".join(PG_SETTINGS) + "\n")
    return pg.start()


def pg_version(pg: Any) -> str:
    import psycopg

    with psycopg.connect(pg.url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


def git_head() -> str:
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes" if dirty else "")


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(rows, key=lambda r: r["changes_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["runs_changes_s"] = [r["changes_s"] for r in rows]
    row["all_verified"] = all(r["verify"]["ok"] for r in rows)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small backlogs, one run each")
    parser.add_argument("--reps", type=int, help="runs per configuration (median shown)")
    parser.add_argument("--no-agents", action="store_true",
                        help="skip the cross-check with real agent processes")
    parser.add_argument("--only", help="only configurations whose name contains this "
                                       "(e.g. 'postgres-2s', '100d', 'agents')")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--ack-timeout", type=float, default=30.0, metavar="S",
                        help="devices resend changes not acked after S seconds (30; the "
                             "agent's default is 10, made for cellular links)")
    parser.add_argument("--code", default="",
                        help="what code is measured, for the JSON (default: git HEAD)")
    parser.add_argument("--py-spy", action="store_true",
                        help="profile the servers while they drain (bench/results/profiles/)")
    args = parser.parse_args(argv)
    if find_mosquitto() is None:
        print("mosquitto is not installed (apt-get install mosquitto)")
        return 2
    per_dev = {10: 500, 100: 100} if args.quick else {10: 5000, 100: 1000}
    reps = args.reps or (1 if args.quick else 3)
    agent_changes = 500 if args.quick else 5000
    plan: list[tuple[str, int, int, str]] = []
    for ndev in (10, 100):
        plan.append(("lmdb", 1, ndev, "routes"))
        plan += [("postgres", n, ndev, "routes") for n in (1, 2, 3)]
    plan += [("postgres", n, 100, "depots") for n in (1, 2, 3)]
    if args.only:
        plan = [p for p in plan if args.only in f"{p[0]}-{p[1]}s-{p[2]}d-{p[3]}"]
    print(f"machine: {machine_text()}")
    started = time.time()
    rows: list[dict[str, Any]] = []
    agents: list[dict[str, Any]] = []
    errors: list[str] = []
    with workdir("ws-bench-servers-", args.keep) as tmp:
        pg = start_pg()
        try:
            version = pg_version(pg)
            print(f"PostgreSQL {version} on port {pg.port} ({', '.join(PG_SETTINGS)}; "
                  "fsync and synchronous_commit on)", flush=True)
            ctx = Context(args, tmp, pg)
            for rep in range(reps):
                for store_kind, nservers, ndev, workload in plan:
                    try:
                        row = run_sim(ctx, store_kind, nservers, ndev, per_dev[ndev],
                                      workload)
                    except Exception as exc:  # one broken run must not lose the others
                        traceback.print_exc()
                        errors.append(f"{store_kind} {nservers}s {ndev}d {workload} "
                                      f"rep {rep}: {type(exc).__name__}: {exc}")
                        continue
                    row["rep"] = rep
                    rows.append(row)
            if not args.no_agents and (not args.only or "agents" in args.only):
                backlogs = prepare_agent_backlogs(ctx, 10, agent_changes)
                for store_kind, nservers in (("lmdb", 1), ("postgres", 1), ("postgres", 2),
                                             ("postgres", 3)):
                    agents.append(run_agents(ctx, backlogs, store_kind, nservers,
                                             agent_changes))
        finally:
            pg.cleanup()
    cells: dict[tuple[str, int, int, str], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["store"], row["servers"], row["devices"], row["workload"]),
                         []).append(row)
    medians = [median_row(v) for v in cells.values()]
    report(medians, agents, reps)
    write_json("servers", {
        "quick": args.quick, "reps": reps, "postgres": version, "pg_settings": PG_SETTINGS,
        "code": args.code or git_head(),
        "machine_text": machine_text(), "minutes": (time.time() - started) / 60,
        "device": "bench/simdevices.py protocol-level devices, "
                  f"{DEVICES_PER_PROCESS} per process",
        "workload": {"routes_per_device": ROUTES_PER_DEVICE, "depot_size": DEPOT_SIZE,
                     "depot_every": DEPOT_EVERY, "per_device": per_dev},
        "rows": medians, "runs": rows, "agents": agents, "errors": errors})
    for error in errors:
        print(f"run failed: {error}")
    wrong = [r for r in rows + agents if not r["verify"]["ok"]]
    if wrong:
        print(f"{len(wrong)} run(s) FAILED verification: their rates are not results")
    return 1 if wrong or errors else 0


def _share(row: dict[str, Any]) -> str:
    return "/".join(f"{s * 100:.0f}" for s in row["share_by_server"])


def _busy(row: dict[str, Any]) -> str:
    return "/".join(f"{b * 100:.0f}" for b in row["busy_by_server"])


def report(rows: list[dict[str, Any]], agents: list[dict[str, Any]], reps: int) -> None:
    print()
    if rows:
        report_runs(rows, reps)
    if agents:
        print_table(
            "Cross-check: 10 real agent processes (agent + daemon + LMDB outbox, "
            "bench/device.py), start() -> last ack applied",
            ["store", "servers", "devices", "changes", "s", "changes/s", "servers cores",
             "postgres cores", "agents cores", "other load", "resent", "verified"],
            [[a["store"], a["servers"], a["devices"], a["changes"], a["secs"],
              a["changes_s"], a["cpu_cores"]["servers"], a["cpu_cores"]["postgres"],
              a["cpu_cores"]["devices"], a["load"]["other_cores"], a["resent"],
              "yes" if a["verify"]["ok"] else "NO"] for a in agents])


def report_runs(rows: list[dict[str, Any]], reps: int) -> None:
    base = {(r["devices"], r["workload"]): r["changes_s"] for r in rows
            if r["store"] == "postgres" and r["servers"] == 1}
    print_table(
        f"Changes/s until every change is acked (median of {reps}), beside raw MQTT through "
        "the same Mosquitto",
        ["store", "servers", "devices", "workload", "changes", "s", "changes/s",
         "vs 1 server", "runs", "server-side applied/s", "share per server %",
         "worker busy %", "raw pipelined msg/s", "raw p50 ms", "other load (cores)",
         "verified"],
        [[r["store"], r["servers"], r["devices"], r["workload"], r["changes"], r["secs"],
          r["changes_s"],
          (f"{r['changes_s'] / base[(r['devices'], r['workload'])]:.2f}x"
           if r["store"] == "postgres" and (r["devices"], r["workload"]) in base else "-"),
          " ".join(f"{x:,.0f}" for x in r["runs_changes_s"]),
          r["server_side"]["applied_s"], _share(r), _busy(r),
          r["raw_mqtt"]["pipelined_msg_s"], r["raw_mqtt"]["rtt_ms_p50"],
          f"{r['load']['other_cores']:.2f}", "yes" if r["all_verified"] else "NO"]
         for r in rows])
    print_table(
        "CPU during the drain, in cores (2 on this machine), median run",
        ["store", "servers", "devices", "workload", "servers (each)", "postgres",
         "mosquitto", "sim devices", "bench", "other load", "idle"],
        [[r["store"], r["servers"], r["devices"], r["workload"],
          f"{r['cpu_cores']['servers']:.2f} (" + "/".join(
              f"{c:.2f}" for c in r["cpu_cores"]["servers_each"]) + ")",
          r["cpu_cores"]["postgres"], r["cpu_cores"]["mosquitto"], r["cpu_cores"]["devices"],
          r["cpu_cores"]["bench"], r["load"]["other_cores"],
          max(0.0, (os.cpu_count() or 2) - r["load"]["machine_cores"])] for r in rows])
    pg_rows = [r for r in rows if "postgres" in r]
    if pg_rows:
        print_table(
            "PostgreSQL during the drain (merge transactions from the servers' metrics; "
            "pg_stat_activity sampled every 50 ms)",
            ["servers", "devices", "workload", "merge transactions", "deadlocks",
             "changes per transaction", "avg txns waiting on a lock", "avg txns in Python",
             "avg running SQL"],
            [[r["servers"], r["devices"], r["workload"], sum(r["groups_by_server"]),
              r["postgres"]["deadlocks"],
              r["changes"] / max(1, sum(r["groups_by_server"])),
              r["postgres"]["avg_lock_waiting"], r["postgres"]["avg_in_transaction"],
              r["postgres"]["avg_running_sql"]] for r in pg_rows])
    print_table(
        "Correctness (median run; every run is checked the same way)",
        ["store", "servers", "devices", "workload", "written", "acked", "applied (metrics)",
         "outcomes stored", "scopes: seq == written, q's = 1..seq", "counters == sum sent",
         "duplicate acks", "resent", "verdict"],
        [[r["store"], r["servers"], r["devices"], r["workload"], r["changes"],
          r["verify"]["acked"], r["verify"]["applied_metrics"], r["verify"]["outcomes"],
          f"{r['verify']['scopes_checked']} ok" if r["verify"]["ok"] else "see problems",
          f"{r['verify']['counters_checked']} ok" if r["verify"]["ok"] else "see problems",
          r["verify"]["dup_acks"], r["verify"]["resent"],
          "ok" if r["verify"]["ok"] else "WRONG"] for r in rows])
    for r in rows:
        if not r["all_verified"]:
            print(f"WRONG: {r['store']} {r['servers']}s {r['devices']}d: "
                  f"{r['verify']['problems']}")


if __name__ == "__main__":
    sys.exit(main())
