"""Many real agents in ONE process: each its own LMDB store, Sync engine and daemon.

    python -m bench.agent_host     (started by bench.agents_per_process; not for people)

Unlike bench/swarm.py and bench/simdevices.py (protocol-level devices, outbox in
memory), every device here is the product's own code: `Agent.open` (its LMDB store in
a directory of its own) and `AgentDaemon` (engine thread, MQTT link, wake socket), as
`waystation agent run` builds them; the process shares only what is read-only: the
schema catalog and the imported code. What a device costs is then what the product
costs per device, measured from this process's RSS and CPU time.

Commands, one JSON object per line on stdin, one answer per line on stdout:

    init {port, root, devices: [{dev, password, scopes}], sync}   open every agent
    start {engine, timeout}  start every daemon at once (engine "threads": AgentDaemon as
                           shipped; "pool": bench.agent_pool, one shared engine thread);
                           answers when each one's first catch-up completed
    idle {seconds}         measure CPU and RSS with every device connected and quiet
    steady {seconds, per_minute}   each agent puts `per_minute` task records a minute
                           (random phase) with `Agent.put`; waits for the last acks
    stop                   stop every daemon (offline status, clean disconnect), exit
"""

from __future__ import annotations

import heapq
import os
import random
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import paho_poll
from bench.common import serve_commands
from bench.device import record


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_s() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Host:
    def __init__(self) -> None:
        self.agents: list[Any] = []
        self.daemons: list[Any] = []
        self.scopes: list[str] = []
        self._cond = threading.Condition()
        self.caught_up: dict[int, float] = {}
        self.acked: dict[tuple[int, int], float] = {}
        self.baseline_mb = rss_mb()
        self.pool: Any = None

    def init(self, port: int, root: str, devices: list[dict[str, Any]],
             sync: dict[str, Any] | None = None) -> dict[str, Any]:
        import agent.daemon  # noqa: F401  (imported before the baseline)
        from agent.api import Agent
        from schemas.collection import load_catalog
        from waystation.config import AgentConfig
        from waystation.logs import configure_logging

        cfgs = [AgentConfig.model_validate({
            "device_id": d["dev"], "data_dir": str(Path(root) / d["dev"]),
            "scopes": d["scopes"], "sync": sync or {}, "log": {"level": "warning"},
            "mqtt": {"host": "127.0.0.1", "port": port, "password": d["password"]}})
            for d in devices]
        configure_logging(cfgs[0].log)
        paho_poll.install()  # hundreds of agents: descriptors beyond select()'s 1024
        catalog = load_catalog(cfgs[0].schema_path())  # read-only: one for all
        self.baseline_mb = rss_mb()
        t0 = time.perf_counter()
        self.agents = [Agent.open(cfg, catalog) for cfg in cfgs]
        self.scopes = [cfg.scopes[0] for cfg in cfgs]
        self.cfgs = cfgs
        self.catalog = catalog
        return {"pid": os.getpid(), "open_s": time.perf_counter() - t0,
                "baseline_rss_mb": self.baseline_mb, "opened_rss_mb": rss_mb(),
                "fds": open_fds(), "threads": threading.active_count()}

    def _hook(self, index: int, daemon: Any) -> None:
        """Timestamp the first catch-up and every ack in the engine thread."""
        sync = daemon.sync
        apply_ack, apply_checkpoint = sync.apply_ack, sync.apply_checkpoint

        def ack_hook(msg: Any) -> Any:
            result = apply_ack(msg)
            now = time.perf_counter()
            with self._cond:
                for n in result.applied:
                    self.acked[(index, n)] = now
                self._cond.notify_all()
            return result

        def checkpoint_hook(msg: Any) -> Any:
            result = apply_checkpoint(msg)
            if not result.behind:
                with self._cond:
                    self.caught_up.setdefault(index, time.perf_counter())
                    self._cond.notify_all()
            return result

        sync.apply_ack = ack_hook
        sync.apply_checkpoint = checkpoint_hook

    def start(self, engine: str = "threads", timeout: float = 300.0) -> dict[str, Any]:
        """engine "threads": AgentDaemon as shipped (an engine thread each); "pool":
        bench.agent_pool.PooledDaemon (every engine on one shared thread)."""
        from agent.daemon import AgentDaemon
        from bench.agent_pool import EnginePool, PooledDaemon

        pairs = list(zip(self.cfgs, self.agents, strict=True))
        if engine == "pool":
            self.pool = EnginePool()
            self.daemons = [PooledDaemon(cfg, self.catalog, agent=agent, pool=self.pool)
                            for cfg, agent in pairs]
        elif engine == "threads":
            self.daemons = [AgentDaemon(cfg, self.catalog, agent=agent) for cfg, agent in pairs]
        else:
            raise ValueError(f"engine must be threads or pool, not {engine!r}")
        for i, daemon in enumerate(self.daemons):
            self._hook(i, daemon)
        cpu0, t0 = cpu_s(), time.perf_counter()
        for daemon in self.daemons:
            daemon.start()
        with self._cond:
            done = self._cond.wait_for(lambda: len(self.caught_up) == len(self.daemons),
                                       timeout)
        times = sorted(t - t0 for t in self.caught_up.values())
        return {"t0": t0, "all": done, "caught_up": len(times),
                "last_s": times[-1] if times else None,
                "p50_s": times[len(times) // 2] if times else None,
                "cpu_s": cpu_s() - cpu0, "rss_mb": rss_mb(), "fds": open_fds(),
                "threads": threading.active_count()}

    def idle(self, seconds: float) -> dict[str, Any]:
        cpu0, t0 = cpu_s(), time.perf_counter()
        time.sleep(seconds)
        secs = time.perf_counter() - t0
        return {"seconds": secs, "cores": (cpu_s() - cpu0) / secs, "rss_mb": rss_mb()}

    def steady(self, seconds: float, per_minute: float = 1.0,
               timeout: float = 120.0) -> dict[str, Any]:
        period = 60.0 / per_minute
        rng = random.Random(len(self.agents))
        start = time.perf_counter()
        due = [(start + rng.uniform(0, period), i) for i in range(len(self.agents))]
        heapq.heapify(due)
        sent: dict[tuple[int, int], float] = {}
        cpu0 = cpu_s()
        written = 0
        while due[0][0] < start + seconds:
            t, i = heapq.heappop(due)
            time.sleep(max(0.0, t - time.perf_counter()))
            now = time.perf_counter()
            n = self.agents[i].put("tasks", f"{self.cfgs[i].device_id}-{written:07d}",
                                   record(self.scopes[i], written)).n
            if self.pool is not None:
                self.daemons[i].wake()  # the pooled engines have no wake socket
            sent[(i, n)] = now
            written += 1
            heapq.heappush(due, (t + period, i))
        time.sleep(max(0.0, start + seconds - time.perf_counter()))
        secs = time.perf_counter() - start
        cpu = cpu_s() - cpu0
        with self._cond:
            self._cond.wait_for(lambda: all(k in self.acked for k in sent), timeout)
            lat = sorted((self.acked[k] - t) * 1000 for k, t in sent.items()
                         if k in self.acked)
        return {"seconds": secs, "written": written, "acked": len(lat),
                "cores": cpu / secs, "rss_mb": rss_mb(),
                "ack_p50_ms": lat[len(lat) // 2] if lat else None,
                "ack_p99_ms": lat[int(len(lat) * 0.99)] if lat else None,
                "pending": sum(a.sync.pending_count() for a in self.agents)}

    def stop(self) -> dict[str, Any]:
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda d: d.stop(drain_s=1.0), self.daemons))
        if self.pool is not None:
            self.pool.close()
        for agent in self.agents:  # a daemon given an agent leaves closing it to us
            agent.close()
        return {}


def main() -> int:
    return serve_commands(lambda _out: Host())


if __name__ == "__main__":
    sys.exit(main())
