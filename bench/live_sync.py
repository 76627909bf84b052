"""The live-sync path in one run: a lone change's latency split into phases, CPU per
synced change in steady online use, raw limits and the PouchDB peer's live push, all
measured in interleaved rounds on the same machine (issue 11 §1).

    .venv/bin/python -m bench.live_sync [--rounds 8] [--samples 40] [--gap-ms 50]
        [--name live_sync] [--no-pouch] [--pouch-peer DIR]

Every round runs each measurement once, in an order rotated from round to round, so
load that comes and goes on a shared machine falls on all of them alike:

- raw RTT: plain paho QoS-1 publish -> echo (another process, as the merge server is)
  -> back, 300-byte payload, one at a time with `--gap-ms` between, through a second
  Mosquitto started from the same production config (the first one carries the
  product: an echo subscribed there would also see the device's changes);
- raw commit: one ~300-byte LMDB put per synced commit, opened as the agent opens its
  store, on the device's disk, with the same gap;
- lone change: `Agent.put()` start -> its ack applied at the device (bench.device
  `latency`), split into put, wake->publish, publish->ack received, ack received ->
  applied, with the same gap;
- PouchDB: the peer's own live-push benchmark (`bench_live.js` from the peer directory,
  invoked as it is, against its own `server.js`): local put() start -> the new revision
  on the server's changes feed, with the same gap;
- CPU: one device writing `--stream` changes one after another while its daemon runs
  (what bench.e2e calls "online"), then `--paced` changes one every 10 ms (each goes
  alone); CPU of the agent process split into the app thread (its put() calls) and
  the daemon's threads, and CPU of the merge server, per synced change.

The target of the lone change is raw RTT p50 + 2 synced commits p50 + 0.5 ms, and 1/5
of PouchDB's live-push p50. Medians are over all samples of all rounds; the JSON keeps
every round's p50 and the load average and other load of each.

If the peer cannot run (no Node.js, no peer directory, npm failing), the report says
why and gives the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import lmdb

from bench.common import median, percentile, print_table, write_json
from bench.fleet import (
    REPO,
    DeviceProc,
    Fleet,
    LoadMeter,
    free_port,
    machine_text,
    proc_cpu_s,
    workdir,
)
from bench.raw import AGENT_LMDB_FLAGS, Echo
from bench.raw import Device as RawDevice

LAT = "lat-1"
CPU = "cpu-1"
PACED_GAP_S = 0.01


# ------------------------------------------------------------------ PouchDB peer


def find_peer(explicit: str | None) -> Path | None:
    """The PouchDB peer directory: --pouch-peer, $WAYSTATION_POUCH_PEER, or `shared/
    peers/pouchdb` beside the repository or beside its parent (a worktree)."""
    candidates = [explicit, os.environ.get("WAYSTATION_POUCH_PEER")]
    candidates += [str(p / "shared" / "peers" / "pouchdb") for p in REPO.parents[:3]]
    for cand in candidates:
        if cand and (Path(cand) / "bench_live.js").is_file():
            return Path(cand)
    return None


class PouchPeer:
    """The peer's server.js and bench_live.js, run as the peer's run.sh runs them
    (its node modules installed with `npm ci` into $POUCHPEER_DIR, never in the peer
    directory)."""

    def __init__(self, peer: Path, tmp: Path) -> None:
        self.peer = peer
        self.modules = Path(os.environ.get("POUCHPEER_DIR", "/tmp/pouchpeer"))
        self.results = tmp / "pouch-results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.env = {**os.environ, "POUCHPEER_DIR": str(self.modules),
                    "POUCH_SERVER_PORT": str(self.port), "RESULTS_DIR": str(self.results),
                    "POUCH_SERVER_MAX_S": "1500"}
        self.server: subprocess.Popen[bytes] | None = None
        self.log = tmp / "pouch-server.log"

    def install(self) -> None:
        if shutil.which("node") is None or shutil.which("npm") is None:
            raise RuntimeError("Node.js/npm not found")
        lock = self.peer / "package-lock.json"
        installed = self.modules / "package-lock.json"
        if (installed.is_file() and installed.read_bytes() == lock.read_bytes()
                and (self.modules / "node_modules" / "pouchdb").is_dir()):
            return
        self.modules.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.peer / "package.json", self.modules)
        shutil.copy(lock, self.modules)
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=self.modules,
                       check=True, timeout=600, stdout=subprocess.DEVNULL)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.server = subprocess.Popen(
                ["node", str(self.peer / "server.js"), str(self.port), "fullCouchDB"],
                cwd=self.peer, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        url = f"http://127.0.0.1:{self.port}/_bench/stats"
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"PouchDB server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if json.loads(resp.read()).get("pid") == self.server.pid:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("PouchDB server did not answer")

    def live(self, updates: int, idle_ms: int) -> dict[str, Any]:
        """One run of the peer's bench_live.js: its latency samples (ms)."""
        out = self.results / "live_latency.json"
        out.unlink(missing_ok=True)
        proc = subprocess.run(["node", str(self.peer / "bench_live.js"), str(updates),
                               str(idle_ms), "1"], cwd=self.peer, env=self.env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"bench_live.js failed ({proc.returncode}): "
                               f"{proc.stderr[-2000:]}")
        data = json.loads(out.read_text())
        run = data["runs"][0]
        return {"ms": run["samples_ms"], "timeouts": run["timeouts"],
                "put_p50_ms": run["local_put_ms"]["p50"], "versions": data.get("versions")}

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(5)


# ------------------------------------------------------------------ raw limits


def raw_commits(env: lmdb.Environment, dbs: list[Any], count: int, gap_s: float,
                start: int) -> tuple[list[float], list[float], list[float]]:
    """Synced commits of one ~300-byte put, one at a time with a gap: ms of each, and
    the CPU µs of each (this thread: the commit's syscalls included), then the CPU µs
    of commits that put one value into each of `dbs` (about the databases one agent
    write touches: a commit costs CPU per B-tree page it writes)."""
    value = b"v" * 300
    ms, cpu_one, cpu_many = [], [], []
    for i in range(start, start + count):
        time.sleep(gap_s)
        key = i.to_bytes(8, "big")
        t, c = time.perf_counter(), time.thread_time()
        with env.begin(write=True) as txn:
            txn.put(key, value)
        cpu_one.append((time.thread_time() - c) * 1e6)
        ms.append((time.perf_counter() - t) * 1000)
        c = time.thread_time()
        with env.begin(write=True) as txn:
            for db in dbs:
                txn.put(key, value, db=db)
        cpu_many.append((time.thread_time() - c) * 1e6)
    return ms, cpu_one, cpu_many


RAW_DBS = 8
"""Databases of the "raw commit, 8 databases" figure (an agent write touches the
outbox, its index, the view, the base, index entries, the feed, meta, ...)."""


# ------------------------------------------------------------------ CPU


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def _thread_role(name: str) -> str:
    """Which part of the daemon a thread of the device process is (by its name)."""
    for prefix, role in (("agent-", "engine"), ("mqtt-", "network"), ("wake-", "wake")):
        if name.startswith(prefix):
            return role
    return "other"


_BATCHES: dict[int, int] = {}
"""Batches the daemon of each device process had sent at the end of its last phase."""


def cpu_phase(dev: DeviceProc, server_pid: int, cmd: str, count: int, start: int,
              **args: Any) -> dict[str, Any]:
    """Run `cmd` (online_write or paced) on the device; CPU µs per change of the app
    thread (the device process's main thread: put() calls), the daemon's threads and
    the merge server."""
    dev.call("prepare", count=count, start=start)  # record building is not the agent's CPU
    threads0, server0 = thread_cpu_s(dev.pid), proc_cpu_s(server_pid)
    total0 = proc_cpu_s(dev.pid)
    load = LoadMeter()
    t0 = time.perf_counter()
    res = dev.call(cmd, count=count, start=start, **args)
    secs = time.perf_counter() - t0
    threads1, server1 = thread_cpu_s(dev.pid), proc_cpu_s(server_pid)
    total = proc_cpu_s(dev.pid) - total0
    app = threads1.get(dev.pid, 0.0) - threads0.get(dev.pid, 0.0)
    names = dev.call("threads")["threads"]
    by_role = dict.fromkeys(("engine", "network", "wake", "other"), 0.0)
    for tid, secs_used in threads1.items():
        if tid == dev.pid:
            continue
        role = _thread_role(names.get(str(tid), ""))
        by_role[role] = by_role.get(role, 0.0) + secs_used - threads0.get(tid, 0.0)
    sent = res.get("stats", {}).get("batches_sent", 0)
    batches, _BATCHES[dev.pid] = sent - _BATCHES.get(dev.pid, 0), sent
    return {"changes": count, "secs": secs, "changes_s": count / secs,
            "agent_us": total * 1e6 / count, "agent_app_thread_us": app * 1e6 / count,
            "agent_daemon_us": (total - app) * 1e6 / count,
            "server_us": (server1 - server0) * 1e6 / count,
            **{f"agent_{role}_us": v * 1e6 / count for role, v in sorted(by_role.items())},
            "batches": batches, "load": load.result()}


# ------------------------------------------------------------------ the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--samples", type=int, default=40, help="per round and measurement")
    parser.add_argument("--gap-ms", type=int, default=50, help="idle gap between samples")
    parser.add_argument("--stream", type=int, default=500, help="online changes per round")
    parser.add_argument("--paced", type=int, default=100, help="paced changes per round")
    parser.add_argument("--name", default="live_sync", help="result file bench/results/NAME.json")
    parser.add_argument("--no-pouch", action="store_true")
    parser.add_argument("--pouch-peer", help="the PouchDB peer directory")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    gap = args.gap_ms / 1000
    load_start = os.getloadavg()
    print(f"machine: {machine_text()}; load average {load_start}", flush=True)
    pouch_note = "not run (--no-pouch)"
    with workdir("ws-bench-live-", args.keep) as tmp:
        peer: PouchPeer | None = None
        if not args.no_pouch:
            where = find_peer(args.pouch_peer)
            if where is None:
                pouch_note = "not run: peer directory not found (--pouch-peer)"
            else:
                try:
                    peer = PouchPeer(where, tmp)
                    peer.install()
                    peer.start()
                    pouch_note = f"run from {where}"
                except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                    pouch_note = f"not run: {exc}"
                    if peer is not None:
                        peer.stop()
                    peer = None
        print(f"PouchDB peer: {pouch_note}", flush=True)
        try:
            data = _rounds(args, gap, tmp, peer)
        finally:
            if peer is not None:
                peer.stop()
    data["pouch_note"] = pouch_note
    data["load_avg_start"] = list(load_start)
    data["load_avg_end"] = list(os.getloadavg())
    report(data)
    write_json(args.name, data)
    return 0


def _rounds(args: argparse.Namespace, gap: float, tmp: Path, peer: PouchPeer | None
            ) -> dict[str, Any]:
    samples: dict[str, list[float]] = {k: [] for k in (
        "raw_rtt", "raw_commit", "lone", "put", "wake_to_publish", "publish_to_ack_received",
        "ack_received_to_applied", "pouch", "pouch_put", "raw_commit_cpu_us",
        f"raw_commit_{RAW_DBS}db_cpu_us")}
    rounds: list[dict[str, Any]] = []
    cpu_rounds: dict[str, list[dict[str, Any]]] = {"stream": [], "paced": []}
    with Fleet("mosquitto", tmp / "raw", {}) as rawfleet, \
            Fleet("mosquitto", tmp / "ws", {LAT: ["route-lat"], CPU: ["route-cpu"]}) as fleet:
        rawfleet.start_broker()
        echo = Echo(rawfleet)
        rawdev = RawDevice(rawfleet, 100)
        fleet.start_broker()
        fleet.start_server()
        assert fleet.server is not None
        server_pid = fleet.server.pid
        lat = fleet.device(LAT, tmp / "dev" / LAT)
        cpudev = fleet.device(CPU, tmp / "dev" / CPU)
        env = lmdb.open(tempfile.mkdtemp(dir=tmp / "dev", prefix="raw-lmdb-"),
                        map_size=1 << 30, max_dbs=RAW_DBS, **AGENT_LMDB_FLAGS)
        dbs = [env.open_db(f"db{i}".encode()) for i in range(RAW_DBS)]
        try:
            lat.call("start", wait="catchup")
            cpudev.call("start", wait="catchup")
            # warm-up of every path
            rawdev.round_trips(10, gap)
            raw_commits(env, dbs, 10, gap, 10_000_000)
            lat.call("latency", samples=10, gap_s=gap, start=9_000_000)
            cpu_phase(cpudev, server_pid, "online_write", 100, 9_000_000)
            n = 0

            def raw_rtt() -> dict[str, Any]:
                ms = rawdev.round_trips(args.samples, gap)
                samples["raw_rtt"] += ms
                return {"raw_rtt_p50": percentile(ms, 50)}

            def raw_commit() -> dict[str, Any]:
                ms, cpu_one, cpu_many = raw_commits(env, dbs, args.samples, gap, n * 1000)
                samples["raw_commit"] += ms
                samples["raw_commit_cpu_us"] += cpu_one
                samples[f"raw_commit_{RAW_DBS}db_cpu_us"] += cpu_many
                return {"raw_commit_p50": percentile(ms, 50)}

            def lone() -> dict[str, Any]:
                try:
                    res = lat.call("latency", samples=args.samples, gap_s=gap,
                                   start=n * 1000)
                except RuntimeError as exc:
                    # A change not acked within the device's 30 s: reported (with the
                    # device's log tail), and the round's other measurements kept.
                    print(f"lone change round {n + 1} failed: {exc}", flush=True)
                    return {"lone_error": str(exc)[-4000:]}
                samples["lone"] += res["ms"]
                samples["put"] += res["put_ms"]
                for part, ms in res["parts_ms"].items():
                    samples[part] += ms
                return {"lone_p50": percentile(res["ms"], 50)}

            def pouch() -> dict[str, Any]:
                if peer is None:
                    return {}
                res = peer.live(args.samples, args.gap_ms)
                samples["pouch"] += res["ms"]
                samples["pouch_put"].append(res["put_p50_ms"])
                return {"pouch_p50": percentile(res["ms"], 50), "pouch_timeouts": res["timeouts"]}

            def cpu() -> dict[str, Any]:
                base = 1_000_000 + n * 10_000
                stream = cpu_phase(cpudev, server_pid, "online_write", args.stream, base)
                paced = cpu_phase(cpudev, server_pid, "paced", args.paced,
                                  base + args.stream, gap_s=PACED_GAP_S)
                cpu_rounds["stream"].append(stream)
                cpu_rounds["paced"].append(paced)
                return {"stream_agent_us": stream["agent_us"], "paced_agent_us": paced["agent_us"]}

            steps = [raw_rtt, raw_commit, lone, pouch, cpu]
            for n in range(args.rounds):
                order = steps[n % len(steps):] + steps[:n % len(steps)]
                load = LoadMeter()
                row: dict[str, Any] = {"round": n, "order": [f.__name__ for f in order],
                                       "load_avg_1m": os.getloadavg()[0]}
                for step in order:
                    row.update(step())
                row["other_cores"] = load.result()["other_cores"]
                rounds.append(row)
                print(f"round {n + 1}/{args.rounds}: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in row.items()
                                  if isinstance(v, float)), flush=True)
            if not samples["lone"]:
                raise RuntimeError("no lone-change round succeeded: see the errors above")
        finally:
            env.close()
            rawdev.close()
            echo.close()
    return {"args": vars(args), "samples": samples, "rounds": rounds, "cpu_rounds": cpu_rounds}


_ROLE_KEYS = ("agent_engine_us", "agent_network_us", "agent_wake_us", "agent_other_us")


def _cpu_median(rows: list[dict[str, Any]], key: str) -> float:
    return median([r[key] for r in rows])


def report(data: dict[str, Any]) -> None:
    s = data["samples"]
    p50 = {k: percentile(v, 50) for k, v in s.items() if v}
    p99 = {k: percentile(v, 99) for k, v in s.items() if v}
    target = p50["raw_rtt"] + 2 * p50["raw_commit"] + 0.5
    pouch = p50.get("pouch")
    summary: dict[str, Any] = {
        "p50_ms": p50, "p99_ms": p99, "target_ms": target,
        "lone_over_target": p50["lone"] / target,
        "lone_over_pouch": p50["lone"] / pouch if pouch else None,
        "met_target": p50["lone"] <= target,
        "met_pouch_fifth": (p50["lone"] <= pouch / 5) if pouch else None,
        "other_cores_median": median([r["other_cores"] for r in data["rounds"]]),
        "load_avg_median": median([r["load_avg_1m"] for r in data["rounds"]]),
        "lone_rounds_failed": sum(1 for r in data["rounds"] if "lone_error" in r),
    }
    cpu: dict[str, Any] = {}
    for mode, rows in data["cpu_rounds"].items():
        cpu[mode] = {k: _cpu_median(rows, k) for k in (
            "agent_us", "agent_app_thread_us", "agent_daemon_us", "server_us", "changes_s",
            *_ROLE_KEYS) if all(k in r for r in rows)}
        cpu[mode]["changes_per_batch"] = median(
            [r["changes"] / r["batches"] for r in rows if r.get("batches")]) if rows else None
    summary["cpu"] = cpu
    data["summary"] = summary
    print_table(
        "Lone change on an idle link vs raw limits and PouchDB live push (same run, medians "
        "over all samples)",
        ["lone p50 ms", "target ms (RTT + 2 commits + 0.5)", "lone / target",
         "PouchDB p50 ms", "lone / PouchDB (goal <= 0.2)", "lone p99 ms", "PouchDB p99 ms",
         "other load (cores)"],
        [[p50["lone"], target, summary["lone_over_target"], pouch or "not run",
          summary["lone_over_pouch"] or "-", p99["lone"], p99.get("pouch", "-"),
          summary["other_cores_median"]]])
    print_table(
        "Where a lone change's time goes (p50 ms of each phase; raw limits of the same run)",
        ["put()", "wake -> publish", "publish -> ack received", "ack received -> applied",
         "raw RTT", "raw synced commit"],
        [[p50["put"], p50["wake_to_publish"], p50["publish_to_ack_received"],
          p50["ack_received_to_applied"], p50["raw_rtt"], p50["raw_commit"]]])
    print_table(
        "CPU per synced change, µs (median of rounds; agent = device process: app thread "
        "doing put() + daemon threads)",
        ["mode", "changes/s", "changes per batch", "agent total", "agent: put() thread",
         "agent: daemon", "server", "raw synced commit CPU (1 db)", f"({RAW_DBS} dbs)"],
        [[mode, c["changes_s"], c["changes_per_batch"] or "-", c["agent_us"],
          c["agent_app_thread_us"], c["agent_daemon_us"], c["server_us"],
          p50["raw_commit_cpu_us"], p50[f"raw_commit_{RAW_DBS}db_cpu_us"]]
         for mode, c in cpu.items()])
    print_table(
        "Daemon CPU per synced change by thread, µs (median of rounds): engine = the sync "
        "loop (scan, encode, apply acks, its commits), network = the MQTT link's thread, "
        "wake = the wake socket's reader",
        ["mode", "engine", "network", "wake", "other"],
        [[mode, *(c.get(k, "-") for k in _ROLE_KEYS)] for mode, c in cpu.items()])
    print(f"PouchDB peer: {data['pouch_note']}")
    if summary["lone_rounds_failed"]:
        print(f"lone-change rounds that failed (a change not acked in 30 s): "
              f"{summary['lone_rounds_failed']} (errors in the JSON)")


if __name__ == "__main__":
    sys.exit(main())
