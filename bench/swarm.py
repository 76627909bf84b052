"""Thousands of protocol-level devices in one process, on ONE network thread (bench.scale).

    python -m bench.swarm     (started by bench.scale; commands on stdin, see serve_commands)

Each device is a real MQTT client of its own (own client id, login, persistent session,
last will, `down` subscription) speaking docs/PROTOCOL.md v1 as bench.simdevices does,
but all of a process's devices share one selector loop instead of a paho thread each,
so one process holds thousands of connections at the cost of their sockets. The outbox
is in memory (no LMDB): the benchmark measures the back end.

    init {port, devices: [{dev, password, scope}]}
    connect {raw}    connect every device at once. raw: plain clean-session MQTT connect +
                     subscribe only (the broker's own limit); else status, hello, catch-up,
                     until the `checkpoint`. Answers when all are done, with times.
    disconnect       close every connection (no status: the will fires)
    steady {seconds, per_minute}   each device writes `per_minute` changes a minute at a
                     random phase; answers after `seconds` + the last acks, with latencies
"""

from __future__ import annotations

import heapq
import random
import selectors
import socket
import sys
import time
import zlib
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.common import serve_commands
from bench.device import record

PREFIX = "waystation"


def _stamp() -> str:
    return f"{time.time_ns() // 1_000_000:012x}0000"


class Dev:
    """One device: its paho client (driven by the Swarm's loop) and its protocol state."""

    def __init__(self, swarm: Swarm, spec: dict[str, Any], raw: bool) -> None:
        self.swarm = swarm
        self.dev: str = spec["dev"]
        self.scope: str = spec["scope"]
        self.raw = raw
        self.n = 0
        self.sent: dict[int, float] = {}
        self.done_at: float | None = None
        c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=self.dev,
                        clean_session=raw, protocol=MQTTProtocolVersion.MQTTv311)
        c.username_pw_set(self.dev, spec["password"])
        if not raw:
            c.will_set(f"{PREFIX}/{self.dev}/status", self._status(False), qos=1, retain=True)
        c.max_inflight_messages_set(0)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_socket_register_write = lambda cl, u, s: swarm.want_write.add(self)
        c.on_socket_unregister_write = lambda cl, u, s: swarm.want_write.discard(self)
        self.c = c

    def _status(self, on: bool) -> bytes:
        return orjson.dumps({"type": "status", "v": 1, "dev": self.dev, "on": on,
                             "agent": "bench-swarm/1", "sv": 1})

    def _on_connect(self, c: paho.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.swarm.errors.append(f"{self.dev}: {rc}")
            return
        c.subscribe(f"{PREFIX}/{self.dev}/down", 1)

    def _on_subscribe(self, c: paho.Client, u: Any, mid: int, rc: Any, props: Any) -> None:
        if self.raw:
            self._done()
            return
        up = f"{PREFIX}/{self.dev}/up"
        c.publish(f"{PREFIX}/{self.dev}/status", self._status(True), qos=1, retain=True)
        c.publish(up, orjson.dumps({"type": "hello", "v": 1, "dev": self.dev,
                                    "agent": "bench-swarm/1", "sv": 1, "z": True}), qos=1)
        c.publish(up, orjson.dumps({"type": "catchup", "v": 1, "dev": self.dev, "req": "c",
                                    "cp": {self.scope: 0}}), qos=1)

    def _done(self) -> None:
        if self.done_at is None:
            self.done_at = time.perf_counter()
            self.swarm.done += 1

    def _on_message(self, c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        payload = msg.payload
        if payload[:1] == b"x":
            payload = zlib.decompress(payload)
        doc = orjson.loads(payload)
        kind = doc.get("type")
        if kind == "checkpoint":
            self._done()
        elif kind == "ack":
            now = time.perf_counter()
            for n, _s, _q in doc.get("ok", ()):
                sent = self.sent.pop(n, None)
                if sent is not None:
                    self.swarm.latencies.append(now - sent)
        elif kind == "delta":
            self.swarm.deltas += len(doc.get("d", ()))
        elif kind == "reject":
            self.swarm.errors.append(f"{self.dev}: {doc}")

    def write(self, now: float) -> None:
        self.n += 1
        ch = {"n": self.n, "h": _stamp(), "c": "tasks", "k": f"{self.dev}-{self.n}",
              "s": self.scope, "b": 0, "op": "put",
              "f": record(self.scope, hash(self.dev) % 100_000 + self.n)}
        data = orjson.dumps({"type": "changes", "v": 1, "dev": self.dev, "sv": 1, "ch": [ch]})
        self.c.publish(f"{PREFIX}/{self.dev}/up", data, qos=1)
        self.sent[self.n] = now


class Swarm:
    def __init__(self) -> None:
        self.port = 0
        self.specs: list[dict[str, Any]] = []
        self.devs: list[Dev] = []
        self.sel = selectors.DefaultSelector()
        self.want_write: set[Dev] = set()
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.deltas = 0
        self.done = 0

    def init(self, port: int, devices: list[dict[str, Any]]) -> dict[str, Any]:
        self.port, self.specs = port, devices
        return {"devices": len(devices)}

    def _pump(self, until: float) -> None:
        last_misc = 0.0
        while True:
            now = time.monotonic()
            if now >= until:
                return
            for dev in list(self.want_write):
                dev.c.loop_write()
            for key, _ in self.sel.select(timeout=min(0.01, until - now)):
                dev: Dev = key.data
                dev.c.loop_read()
            if now - last_misc > 1.0:
                last_misc = now
                for dev in self.devs:
                    dev.c.loop_misc()

    def connect(self, raw: bool = False, timeout: float = 300.0) -> dict[str, Any]:
        # A fresh selector: sockets of an earlier round that paho closed itself (a
        # failed connection) stay registered under their descriptor number, which a
        # new socket may reuse ("already registered").
        self.sel.close()
        self.sel = selectors.DefaultSelector()
        self.devs = [Dev(self, spec, raw) for spec in self.specs]
        self.done = 0
        t0 = time.perf_counter()
        for dev in self.devs:
            try:
                dev.c.connect("127.0.0.1", self.port, keepalive=60)
            except OSError as exc:
                self.errors.append(f"{dev.dev}: connect: {exc}")
                continue
            sock = dev.c.socket()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sel.register(sock, selectors.EVENT_READ, dev)
            self._pump(time.monotonic())  # service what is already readable
        t_connected = time.perf_counter()
        deadline = time.monotonic() + timeout
        while self.done < len(self.devs) and time.monotonic() < deadline:
            self._pump(time.monotonic() + 0.2)
        times = sorted(d.done_at - t0 for d in self.devs if d.done_at is not None)
        return {"t0": t0, "connect_calls_s": t_connected - t0, "done": self.done,
                "last_s": times[-1] if times else None,
                "p50_s": times[len(times) // 2] if times else None,
                "errors": self.errors[:5], "error_count": len(self.errors)}

    def disconnect(self) -> dict[str, Any]:
        for dev in self.devs:
            sock = dev.c.socket()
            if sock is not None:
                self.sel.unregister(sock)
                sock.close()
        self.devs, self.want_write = [], set()
        return {}

    def steady(self, seconds: float, per_minute: float = 1.0) -> dict[str, Any]:
        period = 60.0 / per_minute
        rng = random.Random(len(self.devs))
        start = time.perf_counter()
        due = [(start + rng.uniform(0, period), i) for i in range(len(self.devs))]
        heapq.heapify(due)
        self.latencies.clear()
        written = 0
        end = start + seconds
        while time.perf_counter() < end:
            now = time.perf_counter()
            while due[0][0] <= now:
                t, i = heapq.heappop(due)
                self.devs[i].write(now)
                written += 1
                heapq.heappush(due, (t + period, i))
            self._pump(time.monotonic() + 0.05)
        drain_until = time.monotonic() + 60
        while any(d.sent for d in self.devs) and time.monotonic() < drain_until:
            self._pump(time.monotonic() + 0.2)
        lat = sorted(self.latencies)
        return {"written": written, "acked": len(lat),
                "unacked": sum(len(d.sent) for d in self.devs), "deltas": self.deltas,
                "p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
                "p99_ms": lat[int(len(lat) * 0.99)] * 1000 if lat else None,
                "errors": self.errors[:5], "error_count": len(self.errors)}

    def stop(self) -> dict[str, Any]:
        self.disconnect()
        return {}


def main() -> int:
    return serve_commands(lambda _out: Swarm())


if __name__ == "__main__":
    sys.exit(main())
