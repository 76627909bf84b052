"""Simulated devices for the fleet benchmarks: many protocol-level devices in one process.

    python -m bench.simdevices     (started by bench.servers.SimProc; not for people)

What a simulated device is. Each one is a real MQTT client of its own: its own client
id, broker login and password (checked by Mosquitto against the production ACL), its own
persistent session, last will and `down` subscription. It speaks docs/PROTOCOL.md
version 1 exactly as the agent does on the wire - status (retained), `hello`,
`catchup` (it waits for the `checkpoint`), then `changes` batches built like the agent's
(at most 500 changes and 128 KiB of JSON per batch, zlib-compressed at level 6 over 512
bytes, at most 5,000 changes in flight, the next batch sent as soon as an answer made
room for a whole one); it keeps every change until the SERVER acks it (a PUBACK is not
enough), resends unacked changes after the ack timeout, and records permanent
rejections. What it leaves out is the agent's local store: the outbox is a list in
memory, built before the clock starts, and an ack only marks changes done (no LMDB
commit, no base, no view). So the devices cost the machine almost nothing and the
benchmark measures the back end (broker, servers, database) - on a real fleet every
device has its own CPU. bench/servers.py cross-checks with real agent processes.

Several devices share one process (one paho network thread each). Commands, one JSON
object per line on stdin, one answer per line on stdout:

    init {port, devices: [{dev, password, scopes, depot}], changes, ...}
                       build every outbox (changes spread over the device's scopes; see
                       `build_outbox`); no network yet
    connect            connect every device: status, hello, catch-up until checkpoint
    go {timeout}       every device drains its outbox at once; answers when every
                       change of every device is acked (or permanently rejected), with
                       timings and what the acks said (per scope: the q of each change)
    stop               status offline, disconnect, exit

Times are `time.perf_counter()` (CLOCK_MONOTONIC), comparable across processes.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import socket
import sys
import threading
import time
import traceback
import zlib
from typing import Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.common import serve_commands
from bench.device import record

PREFIX = "waystation"
SCHEMA_VERSION = 1          # schemas/examples/fleet.toml
BATCH_MAX_CHANGES = 500     # the agent's defaults (waystation.config.SyncConfig)
BATCH_MAX_BYTES = 131072
MAX_INFLIGHT_CHANGES = 5000
COMPRESS_OVER = 512
COMPRESS_LEVEL = 6
TALLY_EVERY = 10            # every 10th change of a route increments its tally counter
_ENVELOPE = 64


class Stamper:
    """PROTOCOL.md §4: hybrid logical clock, time part as 16 hex digits."""

    def __init__(self) -> None:
        self.w = 0
        self.c = 0

    def next(self) -> str:
        now = time.time_ns() // 1_000_000
        if now > self.w:
            self.w, self.c = now, 0
        elif self.c < 0xFFFF:
            self.c += 1
        else:
            self.w, self.c = self.w + 1, 0
        return f"{self.w:012x}{self.c:04x}"


def build_outbox(dev: str, seed: int, scopes: list[str], depot: str | None, count: int,
                 depot_every: int) -> tuple[list[dict[str, Any]], dict[tuple[str, str], int]]:
    """`count` changes n = 1..count, round-robin over the device's `scopes`:

    - mostly a new delivery task (`tasks`, ~300 bytes of fields, bench.device.record);
    - every TALLY_EVERY-th change of a route: an increment (1-5) of that route's tally
      record (`tasks/<scope>-tally`, counter field `attempts`);
    - with a shared `depot` scope, every `depot_every`-th change: an increment (1-5) of
      the depot's stock (`inventory/stock-<depot>`, counter `stock`), a record every
      device of the depot increments.

    Returns the changes and the expected counter totals {(collection, key): sum}.
    """
    clock = Stamper()
    out: list[dict[str, Any]] = []
    totals: dict[tuple[str, str], int] = {}
    for i in range(count):
        n = i + 1
        stamp = clock.next()
        inc = 1 + (seed + i) % 5
        if depot is not None and depot_every and n % depot_every == 0:
            key = ("inventory", f"stock-{depot}")
            ch = {"n": n, "h": stamp, "c": key[0], "k": key[1], "s": depot, "b": 0,
                  "op": "put", "f": {"depot": depot}, "i": {"stock": inc}}
            totals[key] = totals.get(key, 0) + inc
        else:
            scope = scopes[i % len(scopes)]
            if (i // len(scopes)) % TALLY_EVERY == TALLY_EVERY - 1:
                key = ("tasks", f"{scope}-tally")
                ch = {"n": n, "h": stamp, "c": key[0], "k": key[1], "s": scope, "b": 0,
                      "op": "put", "f": {"route": scope}, "i": {"attempts": inc}}
                totals[key] = totals.get(key, 0) + inc
            else:
                ch = {"n": n, "h": stamp, "c": "tasks", "k": f"{dev}-{n:07d}", "s": scope,
                      "b": 0, "op": "put", "f": record(scope, seed * 1_000_003 + i)}
        out.append(ch)
    return out, totals


def encode(dev: str, changes: list[dict[str, Any]]) -> bytes:
    """A `changes` message (§7.2), compressed as the agent does (§3)."""
    data = orjson.dumps({"type": "changes", "v": 1, "dev": dev, "sv": SCHEMA_VERSION,
                         "ch": changes})
    if len(data) > COMPRESS_OVER:
        packed = zlib.compress(data, COMPRESS_LEVEL)
        if len(packed) < len(data):
            return packed
    return data


def batches(changes: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Split n = 1..len into consecutive (first index, end index) runs as the agent's
    `next_batch` does: at most BATCH_MAX_CHANGES and BATCH_MAX_BYTES of JSON each."""
    out: list[tuple[int, int]] = []
    start, size = 0, _ENVELOPE
    for i, ch in enumerate(changes):
        cost = len(orjson.dumps(ch)) + 1
        if i > start and (size + cost > BATCH_MAX_BYTES or i - start >= BATCH_MAX_CHANGES):
            out.append((start, i))
            start, size = i, _ENVELOPE
        size += cost
    if start < len(changes):
        out.append((start, len(changes)))
    return out


class SimDevice:
    """One protocol-level device (see the module docstring)."""

    def __init__(self, spec: dict[str, Any], port: int, changes: int, seed: int,
                 depot_every: int, ack_timeout_s: float, done: threading.Semaphore) -> None:
        self.dev: str = spec["dev"]
        self.scopes: list[str] = list(spec["scopes"])
        self.depot: str | None = spec.get("depot")
        self.port = port
        self.ack_timeout_s = ack_timeout_s
        self._done_sem = done
        self.outbox, self.totals = build_outbox(self.dev, seed, self.scopes, self.depot,
                                                changes, depot_every)
        self.runs = batches(self.outbox)
        self.payloads = [encode(self.dev, self.outbox[a:b]) for a, b in self.runs]
        self._starts = [a for a, _ in self.runs]
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.caught_up = threading.Event()
        self.acked: dict[int, tuple[str, int]] = {}
        self.rejected: dict[int, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []
        self.remaining = [b - a for a, b in self.runs]
        self.sent_at: list[float] = [0.0] * len(self.runs)
        self.next_batch = 0
        self.inflight = 0
        self.dup_acks = 0
        self.resent = 0
        self.deltas = 0
        self.messages_up = 0
        self.bytes_up = 0
        self.messages_down = 0
        self.bytes_down = 0
        self.t_done: float | None = None
        self.finished = False
        self.up = f"{PREFIX}/{self.dev}/up"
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=self.dev, clean_session=False,
                             protocol=MQTTProtocolVersion.MQTTv311)
        client.username_pw_set(self.dev, spec["password"])
        client.will_set(f"{PREFIX}/{self.dev}/status", self._status(False), qos=1, retain=True)
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.on_socket_open = _nodelay
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    # ---------------------------------------------------------------- session

    def _status(self, on: bool) -> bytes:
        return orjson.dumps({"type": "status", "v": 1, "dev": self.dev, "on": on,
                             "agent": "bench-simdevice/1", "sv": SCHEMA_VERSION})

    def connect(self) -> None:
        self.client.connect("127.0.0.1", self.port, keepalive=60)
        self.client.loop_start()

    def _on_connect(self, c: paho.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        c.subscribe(f"{PREFIX}/{self.dev}/down", 1)

    def _on_subscribe(self, c: paho.Client, u: Any, mid: int, rc: Any, props: Any) -> None:
        c.publish(f"{PREFIX}/{self.dev}/status", self._status(True), qos=1, retain=True)
        c.publish(self.up, orjson.dumps({"type": "hello", "v": 1, "dev": self.dev,
                                         "agent": "bench-simdevice/1", "sv": SCHEMA_VERSION,
                                         "z": True}), qos=1)
        cp = dict.fromkeys(self.scopes + ([self.depot] if self.depot else []), 0)
        c.publish(self.up, orjson.dumps({"type": "catchup", "v": 1, "dev": self.dev,
                                         "req": "c-1", "cp": cp}), qos=1)
        self.connected.set()

    def disconnect(self) -> None:
        info = self.client.publish(f"{PREFIX}/{self.dev}/status", self._status(False), qos=1,
                                   retain=True)
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()

    # ---------------------------------------------------------------- sending

    def go(self) -> None:
        with self.lock:
            self._fill(time.perf_counter())

    def _fill(self, now: float) -> None:
        """Send batches while a whole one fits in the in-flight window (lock held)."""
        while self.next_batch < len(self.runs):
            b = self.next_batch
            size = self.runs[b][1] - self.runs[b][0]
            if self.inflight and self.inflight + size > MAX_INFLIGHT_CHANGES:
                break
            self._publish(self.payloads[b])
            self.sent_at[b] = now
            self.inflight += size
            self.next_batch += 1

    def _publish(self, payload: bytes) -> None:
        self.client.publish(self.up, payload, qos=1)
        self.messages_up += 1
        self.bytes_up += len(payload)

    def resend_due(self, now: float) -> None:
        """Resend the unacked changes of every batch sent more than ack_timeout_s ago."""
        with self.lock:
            for b in range(self.next_batch):
                if self.remaining[b] and now - self.sent_at[b] > self.ack_timeout_s:
                    a, e = self.runs[b]
                    todo = [ch for ch in self.outbox[a:e]
                            if ch["n"] not in self.acked and ch["n"] not in self.rejected]
                    if todo:
                        self._publish(encode(self.dev, todo))
                        self.resent += len(todo)
                    self.sent_at[b] = now

    # ---------------------------------------------------------------- receiving

    def _on_message(self, c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        payload = msg.payload
        self.messages_down += 1
        self.bytes_down += len(payload)
        if payload[:1] == b"x":
            payload = zlib.decompress(payload)
        doc = orjson.loads(payload)
        kind = doc.get("type")
        if kind == "ack":
            self._settle([(int(n), (s, int(q))) for n, s, q in doc.get("ok", ())], {})
        elif kind == "reject":
            if doc.get("err"):
                self.errors.append(doc["err"])
            perm = {int(r["n"]): r for r in doc.get("rj", ()) if r.get("perm")}
            self._settle([], perm)
        elif kind == "checkpoint":
            self.caught_up.set()
        elif kind == "delta":
            self.deltas += len(doc.get("d", ()))

    def _settle(self, acks: list[tuple[int, tuple[str, int]]],
                perm: dict[int, dict[str, Any]]) -> None:
        now = time.perf_counter()
        with self.lock:
            for n, where in acks:
                if n in self.acked or n in self.rejected:
                    self.dup_acks += 1
                    continue
                self.acked[n] = where
                self._done_one(n)
            for n, rej in perm.items():
                if n in self.acked or n in self.rejected:
                    continue
                self.rejected[n] = rej
                self._done_one(n)
            if not self.finished and len(self.acked) + len(self.rejected) == len(self.outbox):
                self.finished = True
                self.t_done = now
                self._done_sem.release()
            self._fill(now)

    def _done_one(self, n: int) -> None:
        b = bisect.bisect_right(self._starts, n - 1) - 1
        self.remaining[b] -= 1
        self.inflight -= 1

    # ---------------------------------------------------------------- report

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {"dev": self.dev, "t_done": self.t_done, "changes": len(self.outbox),
                    "acked": len(self.acked), "rejected": list(self.rejected.values())[:5],
                    "rejected_count": len(self.rejected), "errors": self.errors[:5],
                    "dup_acks": self.dup_acks, "resent": self.resent, "deltas": self.deltas,
                    "batches": len(self.runs), "messages_up": self.messages_up,
                    "bytes_up": self.bytes_up, "messages_down": self.messages_down,
                    "bytes_down": self.bytes_down}


def _nodelay(c: Any, u: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Host:
    """The devices of this process and the command loop's handlers."""

    def __init__(self) -> None:
        self.devices: list[SimDevice] = []
        self._done = threading.Semaphore(0)
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def init(self, port: int, devices: list[dict[str, Any]], changes: int,
             depot_every: int = 0, ack_timeout_s: float = 30.0) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.devices = [SimDevice(spec, port, changes, spec["seed"], depot_every, ack_timeout_s,
                                  self._done) for spec in devices]
        return {"pid": os.getpid(), "build_s": time.perf_counter() - t0,
                "batches": sum(len(d.runs) for d in self.devices),
                "payload_bytes": sum(len(p) for d in self.devices for p in d.payloads)}

    def connect(self, timeout: float = 60.0) -> dict[str, Any]:
        t0 = time.perf_counter()
        for dev in self.devices:
            dev.connect()
        deadline = time.monotonic() + timeout
        for dev in self.devices:
            if not dev.caught_up.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{dev.dev}: no checkpoint (connected: "
                                   f"{dev.connected.is_set()})")
        self._timer = threading.Thread(target=self._resender, daemon=True)
        self._timer.start()
        return {"connect_s": time.perf_counter() - t0}

    def _resender(self) -> None:
        while not self._stop.wait(0.5):
            now = time.perf_counter()
            for dev in self.devices:
                dev.resend_due(now)

    def go(self, timeout: float = 600.0) -> dict[str, Any]:
        t_go = time.perf_counter()
        for dev in self.devices:
            dev.go()
        deadline = time.monotonic() + timeout
        finished = 0
        while finished < len(self.devices):
            if not self._done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
            finished += 1
        reports = [dev.report() for dev in self.devices]
        q_by_scope: dict[str, list[int]] = {}
        count_by_scope: dict[str, int] = {}
        totals: dict[str, int] = {}
        new_records = 0  # task puts: each creates a record of its own
        for dev in self.devices:
            with dev.lock:
                for scope, q in dev.acked.values():
                    q_by_scope.setdefault(scope, []).append(q)
            for ch in dev.outbox:
                count_by_scope[ch["s"]] = count_by_scope.get(ch["s"], 0) + 1
                new_records += "i" not in ch
            for (c, k), v in dev.totals.items():
                key = f"{c}/{k}"
                totals[key] = totals.get(key, 0) + v
        return {"t_go": t_go, "timed_out": finished < len(self.devices), "devices": reports,
                "q_by_scope": q_by_scope, "count_by_scope": count_by_scope, "totals": totals,
                "new_records": new_records}

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        for dev in self.devices:
            try:
                dev.disconnect()
            except Exception:
                traceback.print_exc()
        return {}


def main() -> int:
    return serve_commands(lambda _out: Host())


if __name__ == "__main__":
    sys.exit(main())
