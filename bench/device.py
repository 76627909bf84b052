"""One benchmark device: the agent and its sync daemon in this process, driven by JSON lines.

    python -m bench.device      (started by bench.fleet.DeviceProc; not for people)

Commands (one JSON object per line on stdin, one answer per line on stdout):

    init {config}              open the agent store (AgentConfig as a dict); no daemon yet
    write {count, start}       `count` local puts of ~300-byte task records
    start {wait}               start the daemon; wait for "connected", "catchup" (its first
                               catch-up complete) or "drained" (outbox empty)
    drain                      wait until the outbox is empty
    online_write {count, start} puts while the daemon runs, then wait until all are acked
    latency {samples, gap_s}   one put at a time, each until its ack applied (with each
                               put's perf_counter start time, "t0")
    paced {count, gap_s}       a put every gap_s without waiting for acks, then all acks:
                               each put's start time ("t0") and put-to-ack ms
    prepare {count, start}     build the records of puts start..start+count now, so that
                               the CPU of a later online_write/paced is the agent's only
    stats                      RSS, store size, daemon counters, pending
    stop                       stop the daemon, close, exit

Every time is `time.perf_counter()` (CLOCK_MONOTONIC), comparable across processes.
Acks are timestamped inside the daemon's engine thread, right after `apply_ack`
committed (a wrapper around `Sync.apply_ack`), so no polling adds to any measurement.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import serve_commands

_WORD_TEXT = (
    "left parcel with neighbour signed by driver gate code side entrance canal locked "
    "after call ahead next time door bell broken second floor back office reception "
    "closed lunch fragile handle with care cold chain keep upright returned damaged box "
    "missing items customer not home card in letterbox pallet jack needed loading dock "
    "north south east west yard blue van parked behind building ask for manager deliver "
    "before noon after three invoice attached cash on delivery paid online reference "
    "order number stairs lift out of order dog in garden use rear gate contact security "
    "desk weekend only"
)
_WORDS = _WORD_TEXT.split()
_NAMES = ("Hendrikse Bakery", "Cafe de Jaren", "Van Dam Hardware", "De Vries & Zn",
          "Bloemenhuis Jansen", "Kaashandel Smit", "Apotheek Mulder", "Fietsen Bakker",
          "Visser Logistics", "Meijer Interiors", "Brouwer Optiek", "De Boer Groothandel")
_STREETS = ("Keizersgracht", "Prinsengracht", "Herengracht", "Damrak", "Rokin", "Overtoom",
            "Ferdinand Bolstraat", "Czaar Peterstraat", "Javastraat", "Haarlemmerdijk")


def record(scope: str, i: int) -> dict[str, Any]:
    """A ~300-byte task record (its fields as JSON), different for every `i`: names,
    addresses and free-text notes drawn at random (seeded by `i`), so compression sees
    text about as repetitive as a real fleet's, not one record copied."""
    rng = random.Random(i)
    notes = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 28)))
    return {"route": scope, "customer": f"{rng.choice(_NAMES)} #{rng.randint(1, 99_999)}",
            "address": f"{rng.choice(_STREETS)} {rng.randint(1, 999)}, "
                       f"{rng.randint(1011, 1109)} {rng.choice('ABCDEFGHJKLMNPRSTVWXZ')}"
                       f"{rng.choice('ABCDEFGHJKLMNPRSTVWXZ')} Amsterdam",
            "status": rng.choice(("out", "delivered", "failed", "pending")),
            "eta": 1_764_000_000_000 + i * 60_000 + rng.randint(0, 59_999),
            "notes": notes[:1].upper() + notes[1:] + "."}


def record_high_entropy(scope: str, i: int) -> dict[str, Any]:
    """The same fields and about the same size as `record`, but every text drawn from
    random letters and digits (seeded by `i`): data compression can do little with it,
    unlike `record`'s 91-word vocabulary. The worst case for bytes per change."""
    rng = random.Random(i)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

    def text(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    return {"route": scope, "customer": f"{text(14)} #{rng.randint(1, 99_999)}",
            "address": f"{text(12)} {rng.randint(1, 999)}, {rng.randint(1011, 1109)} "
                       f"{text(2).upper()} {text(9)}",
            "status": rng.choice(("out", "delivered", "failed", "pending")),
            "eta": 1_764_000_000_000 + i * 60_000 + rng.randint(0, 59_999),
            "notes": text(rng.randint(140, 190))}


RECORDS = {"text": record, "random": record_high_entropy}
"""Record generators by name: `text` (a fleet's repetitive text, the default) and
`random` (high entropy)."""


class Device:
    def __init__(self, out: Any) -> None:
        self.out = out
        self.agent: Any = None
        self.daemon: Any = None
        self.cfg: Any = None
        self.catalog: Any = None
        self.scope = ""
        self._cond = threading.Condition()
        self.acked_at: dict[int, float] = {}
        self.drained_at: float | None = None
        self.catchup_at: float | None = None
        self.payload_up = 0
        self.payload_down = 0
        self.messages_up = 0
        self.messages_down = 0
        self.last_pub = 0.0
        self.last_recv = 0.0
        self.trace: dict[int, tuple[float, float]] = {}
        self._prepared: dict[int, dict[str, Any]] = {}

    def _record(self, i: int) -> dict[str, Any]:
        """Record `i`: prepared beforehand (`prepare`), or built now."""
        rec = self._prepared.pop(i, None)
        return rec if rec is not None else record(self.scope, i)

    # ---------------------------------------------------------------- commands

    def init(self, config: dict[str, Any]) -> dict[str, Any]:
        import agent.daemon  # noqa: F401  (imported now, so `start` times connecting only)
        from agent.api import Agent
        from schemas.collection import load_catalog
        from waystation.config import AgentConfig
        from waystation.logs import configure_logging

        self.cfg = AgentConfig.model_validate(config)
        configure_logging(self.cfg.log)
        self.catalog = load_catalog(self.cfg.schema_path())
        self.agent = Agent.open(self.cfg, self.catalog)
        self.scope = self.cfg.scopes[0]
        return {"pending": self.agent.sync.pending_count(), "pid": os.getpid()}

    def write(self, count: int, start: int = 0) -> dict[str, Any]:
        t0 = time.perf_counter()
        for i in range(start, start + count):
            self.agent.put("tasks", f"{self.cfg.device_id}-{i:07d}", record(self.scope, i))
        t1 = time.perf_counter()
        return {"t0": t0, "t1": t1, "secs": t1 - t0, "puts_per_s": count / (t1 - t0),
                "pending": self.agent.sync.pending_count()}

    def start(self, wait: str = "catchup", timeout: float = 600.0) -> dict[str, Any]:
        from agent.daemon import AgentDaemon

        self.daemon = AgentDaemon(self.cfg, self.catalog, agent=self.agent)
        self._hook()
        t0 = time.perf_counter()
        self.daemon.start()
        out: dict[str, Any] = {"t0": t0}
        if not self.daemon.link.wait_connected(timeout):
            raise TimeoutError("no connection")
        out["t_connected"] = time.perf_counter()
        if wait in ("catchup", "drained"):
            with self._cond:
                if not self._cond.wait_for(lambda: self.catchup_at is not None, timeout):
                    raise TimeoutError("catch-up did not complete")
            out["t_catchup"] = self.catchup_at
        if wait == "drained":
            out.update(self.drain(timeout))
        return out

    def drain(self, timeout: float = 600.0) -> dict[str, Any]:
        with self._cond:
            if self.agent.sync.pending_count() and not self._cond.wait_for(
                    lambda: self.drained_at is not None, timeout):
                raise TimeoutError(f"{self.agent.sync.pending_count()} still pending")
            return {"t_drained": self.drained_at or time.perf_counter(),
                    "stats": self._daemon_stats()}

    def prepare(self, count: int, start: int = 0) -> dict[str, Any]:
        self._prepared.update((i, record(self.scope, i)) for i in range(start, start + count))
        return {"prepared": len(self._prepared)}

    def online_write(self, count: int, start: int = 0, timeout: float = 600.0
                     ) -> dict[str, Any]:
        with self._cond:
            self.drained_at = None
        t0 = time.perf_counter()
        for i in range(start, start + count):
            self.agent.put("tasks", f"{self.cfg.device_id}-{i:07d}", self._record(i))
        t_written = time.perf_counter()
        out = self.drain(timeout)
        return {"t0": t0, "t_written": t_written, **out}

    def latency(self, samples: int, gap_s: float = 0.02, start: int = 0,
                timeout: float = 30.0) -> dict[str, Any]:
        totals: list[float] = []
        puts: list[float] = []
        starts: list[float] = []
        parts: dict[str, list[float]] = {"wake_to_publish": [], "publish_to_ack_received": [],
                                         "ack_received_to_applied": []}
        for j in range(samples):
            time.sleep(gap_s)
            i = start + j
            t0 = time.perf_counter()
            starts.append(t0)
            result = self.agent.put("tasks", f"{self.cfg.device_id}-lat-{i:07d}",
                                    record(self.scope, i))
            t_put = time.perf_counter()
            n = result.n
            with self._cond:
                if not self._cond.wait_for(lambda n=n: n in self.acked_at, timeout):
                    raise TimeoutError(f"change {n} not acked")
                t1 = self.acked_at[n]
            totals.append((t1 - t0) * 1000)
            puts.append((t_put - t0) * 1000)
            pub, recv = self.trace[n]
            parts["wake_to_publish"].append((pub - t_put) * 1000)
            parts["publish_to_ack_received"].append((recv - pub) * 1000)
            parts["ack_received_to_applied"].append((t1 - recv) * 1000)
        return {"ms": totals, "put_ms": puts, "parts_ms": parts, "t0": starts,
                "stats": self._daemon_stats()}

    def paced(self, count: int, gap_s: float = 0.02, start: int = 0,
              timeout: float = 120.0) -> dict[str, Any]:
        """A put every `gap_s` whatever the acks do (an app writing at its own pace);
        then wait for every ack. Each put's start time and put-to-ack ms."""
        starts: list[float] = []
        numbers: list[int] = []
        for j in range(count):
            i = start + j
            t0 = time.perf_counter()
            starts.append(t0)
            numbers.append(self.agent.put("tasks", f"{self.cfg.device_id}-pace-{i:07d}",
                                          self._record(i)).n)
            time.sleep(max(0.0, t0 + gap_s - time.perf_counter()))
        with self._cond:
            if not self._cond.wait_for(lambda: all(n in self.acked_at for n in numbers),
                                       timeout):
                raise TimeoutError("paced puts not all acked")
            ms = [(self.acked_at[n] - t0) * 1000 for n, t0 in zip(numbers, starts,
                                                                  strict=True)]
        return {"ms": ms, "t0": starts, "stats": self._daemon_stats()}

    def stats(self) -> dict[str, Any]:
        from waystation.convergence import device_records

        mem: dict[str, int] = {}
        with open("/proc/self/status") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    mem[name] = int(value.split()[0]) * 1024
        env_dir = Path(self.cfg.data_dir) / "agent.lmdb"
        records = len(device_records(self.agent, ["tasks"]))
        return {"mem": mem, "data_mdb": (env_dir / "data.mdb").stat().st_size,
                "used_bytes": self.agent.store.used_bytes(), "records": records,
                "pending": self.agent.sync.pending_count(),
                "wire": {"payload_up": self.payload_up, "payload_down": self.payload_down,
                         "messages_up": self.messages_up,
                         "messages_down": self.messages_down},
                "stats": self._daemon_stats()}

    def threads(self) -> dict[str, Any]:
        """Native thread id -> thread name (for CPU per thread: bench.live_sync)."""
        return {"threads": {str(t.native_id): t.name for t in threading.enumerate()
                            if t.native_id is not None}}

    def reset_wire(self) -> dict[str, Any]:
        self.payload_up = self.payload_down = self.messages_up = self.messages_down = 0
        return {}

    def stop(self) -> dict[str, Any]:
        if self.daemon is not None:
            self.daemon.stop(drain_s=1.0)
        else:
            self.agent.close()
        return {}

    # ---------------------------------------------------------------- hooks

    def _hook(self) -> None:
        """Timestamp acks and catch-up completion in the daemon's engine thread, and
        count MQTT payload bytes in both directions."""
        sync = self.daemon.sync
        apply_ack = sync.apply_ack
        apply_checkpoint = sync.apply_checkpoint
        pending_count = sync.pending_count

        def ack_hook(msg: Any) -> Any:
            result = apply_ack(msg)
            now = time.perf_counter()
            with self._cond:
                for n in result.applied:
                    self.acked_at[n] = now
                    self.trace[n] = (self.last_pub, self.last_recv)
                if result.applied and pending_count() == 0:
                    self.drained_at = now
                self._cond.notify_all()
            return result

        def checkpoint_hook(msg: Any) -> Any:
            result = apply_checkpoint(msg)
            now = time.perf_counter()
            if not result.behind:
                with self._cond:
                    if self.catchup_at is None:
                        self.catchup_at = now
                    self._cond.notify_all()
            return result

        sync.apply_ack = ack_hook
        sync.apply_checkpoint = checkpoint_hook
        link = self.daemon.link
        publish = link.publish
        on_message = link._on_message_cb

        def publish_hook(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
            ok = publish(topic, payload, qos=qos, retain=retain)
            if ok:
                self.last_pub = time.perf_counter()
                self.payload_up += len(payload)
                self.messages_up += 1
            return ok

        def message_hook(topic: str, payload: bytes) -> Any:
            self.last_recv = time.perf_counter()
            self.payload_down += len(payload)
            self.messages_down += 1
            return on_message(topic, payload)

        link.publish = publish_hook
        link._on_message_cb = message_hook

    def _daemon_stats(self) -> dict[str, Any]:
        if self.daemon is None:
            return {}
        st = self.daemon.stats
        return {"batches_sent": st.batches_sent, "changes_sent": st.changes_sent,
                "resent": st.resent, "acked": st.acked, "pages": st.pages,
                "connects": st.connects, "catchups": st.catchups, "deltas": st.deltas}


def main() -> int:
    return serve_commands(Device)


if __name__ == "__main__":
    sys.exit(main())
