"""Raw limits, measured in the same run as Waystation: plain paho-mqtt and plain LMDB.

MQTT (through the broker under test, before the merge server is started so nothing else
listens on the topics): a "device" client publishes QoS-1 messages on its up topic; an
echo client in ANOTHER process (`python -m bench.raw echo ...`, as the merge server is a
process of its own), logged in as the server user, republishes each one QoS 1 on the
device's down topic; the device counts what comes back. Both set TCP_NODELAY, as
MqttLink, Mosquitto and the embedded broker do.

- pipelined: the device publishes N messages as fast as paho lets it, many in flight;
  msg/s = N / time until the last echo arrived (best of paho in-flight windows 100 and 0
  = unlimited, the two settings DESIGN.md measured fastest).
- one at a time: publish, wait for the echo, pause, repeat: p50/p99 round trip.

LMDB (a fresh environment next to the agents' data): one ~300-byte put per commit opened
the way the agent opens its store (sync on, metasync off: AGENT_LMDB_FLAGS), with the
extra meta-page flush (LMDB's default) and without fsync, and 100 puts per synced commit;
the synced commit's own p50 is the "synced LMDB commit" of the latency target.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import lmdb
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.common import percentile
from bench.fleet import PREFIX, RAW_DEVICE, REPO, SERVER_USER, Fleet

PAYLOAD = b"x" * 300


def _client(client_id: str, user: str, password: str, inflight: int) -> paho.Client:
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=True, protocol=MQTTProtocolVersion.MQTTv311)
    client.username_pw_set(user, password)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)

    def nodelay(c: Any, u: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    client.on_socket_open = nodelay
    return client


def _connect(client: paho.Client, port: int, topic: str) -> None:
    subscribed = threading.Event()
    client.on_subscribe = lambda c, u, mid, rc, p: subscribed.set()
    client.on_connect = lambda c, u, f, r, p: c.subscribe(topic, 1)
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    if not subscribed.wait(10):
        raise TimeoutError(f"no SUBACK for {topic}")


def echo_main(argv: list[str]) -> int:
    """The echo process: every message on {prefix}/+/up goes back on .../down."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--password", required=True)
    args = parser.parse_args(argv)
    client = _client("bench-echo", SERVER_USER, args.password, 0)

    def on_message(c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        c.publish(msg.topic[:-2] + "down", msg.payload, qos=1)

    client.on_message = on_message
    _connect(client, args.port, f"{PREFIX}/+/up")
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    client.disconnect()
    client.loop_stop()
    return 0


class Echo:
    """The echo client in its own process."""

    def __init__(self, fleet: Fleet, port: int | None = None) -> None:
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.raw", "echo", "--port", str(port or fleet.port),
             f"--password={fleet.passwords[SERVER_USER]}"],  # (it may start with "-")
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("echo process did not start")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


class Device:
    """The publishing side, in this process."""

    def __init__(self, fleet: Fleet, inflight: int) -> None:
        self.client = _client(RAW_DEVICE, RAW_DEVICE, fleet.passwords[RAW_DEVICE], inflight)
        self.received = 0
        self.cond = threading.Condition()
        self.last: float = 0.0

        def on_message(c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
            with self.cond:
                self.received += 1
                self.last = time.perf_counter()
                self.cond.notify_all()

        self.client.on_message = on_message
        _connect(self.client, fleet.port, f"{PREFIX}/{RAW_DEVICE}/down")
        self.up = f"{PREFIX}/{RAW_DEVICE}/up"

    def pipelined(self, count: int) -> float:
        with self.cond:
            self.received = 0
        start = time.perf_counter()
        for _ in range(count):
            self.client.publish(self.up, PAYLOAD, qos=1)
        with self.cond:
            if not self.cond.wait_for(lambda: self.received >= count, 120):
                raise TimeoutError(f"pipelined: {self.received}/{count} echoes")
            return count / (self.last - start)

    def round_trips(self, samples: int, gap_s: float) -> list[float]:
        out = []
        for _ in range(samples):
            time.sleep(gap_s)
            with self.cond:
                target = self.received + 1
            start = time.perf_counter()
            self.client.publish(self.up, PAYLOAD, qos=1)
            with self.cond:
                if not self.cond.wait_for(lambda t=target: self.received >= t, 10):
                    raise TimeoutError("round trip")
                out.append((self.last - start) * 1000)
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mqtt_limits(fleet: Fleet, *, quick: bool, rtt_samples: int, gap_s: float,
                echo_port: int | None = None) -> dict[str, Any]:
    """Raw QoS-1 round trips through `fleet`'s broker (call before the server starts).
    `echo_port`: the echo client connects there instead of `fleet.port` (another node
    of a cluster, as a merge server may consume on another node than the device's)."""
    count = 5000 if quick else 20000
    echo = Echo(fleet, echo_port)
    try:
        rates: dict[str, float] = {}
        for inflight in (100, 0):
            dev = Device(fleet, inflight)
            try:
                dev.pipelined(min(2000, count))  # warm-up
                rates[str(inflight)] = max(dev.pipelined(count) for _ in range(2))
            finally:
                dev.close()
        dev = Device(fleet, 100)
        try:
            dev.round_trips(20, gap_s)  # warm-up
            rtt = dev.round_trips(rtt_samples, gap_s)
        finally:
            dev.close()
    finally:
        echo.close()
    return {"pipelined_msg_s": max(rates.values()), "pipelined_by_inflight": rates,
            "pipelined_count": count, "payload_bytes": len(PAYLOAD),
            "rtt_ms_p50": percentile(rtt, 50), "rtt_ms_p99": percentile(rtt, 99),
            "rtt_samples": len(rtt), "rtt_gap_s": gap_s}


# How agent/store.py opens the device's LMDB environment: fsync at every commit, but
# the meta page is not flushed separately (metasync off: one fsync per commit, not two).
# The raw "synced" baseline writes the same way, so the ratio compares like with like;
# tests/test_bench_raw.py checks these flags against agent/store.py.
AGENT_LMDB_FLAGS = {"sync": True, "metasync": False}


def lmdb_limits(directory: Path, *, quick: bool) -> dict[str, Any]:
    """Plain LMDB puts of ~300-byte values in `directory` (the agents' disk).

    `synced` writes as the agent does (AGENT_LMDB_FLAGS); `synced_metasync` adds the
    separate meta-page flush (LMDB's default), `nosync` skips fsync altogether."""
    count = 1000 if quick else 3000
    value = b"v" * 300
    out: dict[str, Any] = {"value_bytes": len(value), "agent_flags": AGENT_LMDB_FLAGS}
    variants = (("synced", AGENT_LMDB_FLAGS),
                ("synced_metasync", {"sync": True, "metasync": True}),
                ("nosync", {"sync": False, "metasync": False}))
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for name, flags in variants:
            env = lmdb.open(str(Path(tmp) / name), map_size=1 << 30, **flags)
            times = []
            start = time.perf_counter()
            for i in range(count):
                t = time.perf_counter()
                with env.begin(write=True) as txn:
                    txn.put(i.to_bytes(8, "big"), value)
                times.append(time.perf_counter() - t)
            out[f"{name}_puts_s"] = count / (time.perf_counter() - start)
            out[f"{name}_commit_ms_p50"] = percentile(times, 50) * 1000
            out[f"{name}_commit_ms_p99"] = percentile(times, 99) * 1000
            env.close()
        env = lmdb.open(str(Path(tmp) / "batched"), map_size=1 << 30, **AGENT_LMDB_FLAGS)
        batches = count // 10
        start = time.perf_counter()
        for b in range(batches):
            with env.begin(write=True) as txn:
                for i in range(100):
                    txn.put((b * 100 + i).to_bytes(8, "big"), value)
        out["synced_100_per_commit_puts_s"] = batches * 100 / (time.perf_counter() - start)
        env.close()
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["echo"]:
        sys.exit(echo_main(sys.argv[2:]))
    sys.exit("usage: python -m bench.raw echo --port P --password PW")
