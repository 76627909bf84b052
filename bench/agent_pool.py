"""Many agent daemons' engines on ONE shared thread, for simulating devices (bench.agent_host).

`AgentDaemon` gives every device an engine thread that wakes at least every
`sync.poll_interval_s` (0.1 s) and every 0.25 s for its timers: right for one device on
its own CPU, but a thousand of them in one process spend cores on wake-ups and fight
over the GIL until connections time out. `PooledDaemon` is the same daemon (its own
Agent, LMDB store, Sync engine, MQTT link, and the daemon's own event handlers,
`_handle`, `_pump`, `_timers`) whose events are run by an `EnginePool` thread instead:

- an event the link hands over (connect, message, disconnect) or a local write
  (`wake()`) marks the daemon ready; the pool runs its queued events at once, then
  sends what its in-flight window allows - what the engine loop does per event;
- every `tick_s` the pool runs each daemon's timers and send pass (resend after the ack
  timeout, status repeat, catch-up retry, gap catch-up) - what the engine loop does
  every 0.25 s.

What differs from the product: no wake socket (writes in this process call `wake()`;
other processes' writes wait for the next tick) and timers at `tick_s` resolution. Each
device still has its paho network thread (MqttLink's own).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any

from agent.daemon import AgentDaemon

__all__ = ["EnginePool", "PooledDaemon"]


class _ReadyQueue(queue.SimpleQueue):  # type: ignore[type-arg]
    """The daemon's event queue; every put marks the daemon ready in its pool."""

    def __init__(self, pool: EnginePool, daemon: PooledDaemon) -> None:
        super().__init__()
        self._pool = pool
        self._daemon = daemon

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._pool.ready(self._daemon)


class EnginePool:
    """One thread running the engines of many PooledDaemons."""

    def __init__(self, tick_s: float = 0.25) -> None:
        self.tick_s = tick_s
        self._daemons: list[PooledDaemon] = []
        self._ready: set[PooledDaemon] = set()
        self._cond = threading.Condition()
        self._step = threading.Lock()  # held while a daemon's engine code runs
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine-pool", daemon=True)
        self.steps = 0
        self._thread.start()

    def add(self, daemon: PooledDaemon) -> None:
        with self._cond:
            self._daemons.append(daemon)
            self._ready.add(daemon)
            self._cond.notify()

    def remove(self, daemon: PooledDaemon) -> None:
        """After this returns the pool never runs `daemon`'s engine again."""
        with self._step, self._cond:
            with contextlib.suppress(ValueError):
                self._daemons.remove(daemon)
            self._ready.discard(daemon)

    def ready(self, daemon: PooledDaemon) -> None:
        with self._cond:
            self._ready.add(daemon)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(10)

    def _run(self) -> None:
        next_tick = time.monotonic() + self.tick_s
        while True:
            with self._cond:
                while not self._ready and not self._stop:
                    wait = next_tick - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stop:
                    return
                ready, self._ready = self._ready, set()
                tick = time.monotonic() >= next_tick
                everyone = list(self._daemons) if tick else []
            for daemon in ready:
                with self._step:
                    if daemon in self._daemons:
                        daemon.run_events()
            if tick:
                now = time.monotonic()
                for daemon in everyone:
                    with self._step:
                        if daemon in self._daemons:
                            daemon.run_timers(now)
                next_tick = now + self.tick_s
            self.steps += 1


class PooledDaemon(AgentDaemon):
    """An AgentDaemon whose engine runs in an EnginePool (see the module docstring)."""

    def __init__(self, *args: Any, pool: EnginePool, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._pool = pool
        self._events = _ReadyQueue(pool, self)  # the link's callbacks put here

    def start(self) -> None:
        self._pool.add(self)
        self.link.start()

    def run_events(self) -> None:
        """Everything queued, as the engine loop handles it (pool thread only)."""
        self._last_loop = time.monotonic()
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            self._handle(event)
            if event[0] == "msg" and self._inflight_room():
                self._pump(time.monotonic())
        self._pump(time.monotonic())

    def run_timers(self, now: float) -> None:
        self._last_loop = now
        self._timers(now)
        self._pump(now)

    def stop(self, *, drain_s: float = 5.0) -> None:
        """As AgentDaemon.stop: answers in flight for up to `drain_s`, offline status,
        clean disconnect. The engine leaves the pool first, so only this thread runs it."""
        self._pool.remove(self)
        self._stopping.set()
        self._drain_and_close(drain_s)
        self._stopped.set()
        self.link.stop(clean=True)
        with contextlib.suppress(Exception):
            self.sync.set_online(False)
            self.sync.record_link("offline", "stopped")
        if self._owns_agent:
            self.agent.close()
