"""One device flooding the merge server (issue 8 §3): memory and the other devices' latency.

    .venv/bin/python -m bench.flood [--quick] [--broker mosquitto|embedded] [--keep]
                                    [--server-src DIR] [--label NAME]

Each part a process of its own (bench/fleet.py): the broker (Mosquitto from
deploy/mosquitto/mosquitto.conf, or the embedded amqtt broker), `waystation server run`
(LMDB store, default settings, metrics on), a well-behaved device (bench/device.py: the
agent and its daemon), and the flooding devices as plain paho clients in this process.

1. Raw limits through the same broker, before the server starts (bench/raw.py): QoS-1
   round trips one at a time (p50/p99) and pipelined; and the same oversized flood as
   in 3 delivered to a plain paho subscriber (logged in as the server) that only counts:
   how fast the broker hands the flood to one consumer.
2. The server starts; the good device connects and measures its ack latency on an idle
   link (one ~300-byte put every 20 ms, put() to ack applied).
3. Oversized flood: one enrolled device publishes 8,000 payloads of 257 KiB (each over
   the protocol's 256 KiB, under Mosquitto's max_packet_size, so each reaches the
   server and is refused `too_large`), QoS 1, 100 in flight. Server RSS before (VmRSS),
   peak (VmHWM, the kernel's high-water mark, restarted at the start of this phase)
   and after (VmRSS once the server handled or refused everything and sat idle for
   5 s); the broker's peak too.
4. Fuzz burst: another device publishes 10,000 fuzzed messages (random bytes, broken
   and truncated JSON, wrong types, 5,001-level nesting, huge numbers, zlib bombs,
   unknown types, forged device ids, changes to scopes it may not write) as fast as
   the broker takes them, while the good device goes on writing a put every 20 ms (at
   its own pace, not waiting for acks): its put-to-ack p50/p99/max over the puts
   started while the burst was being handled (from its first publish until the server
   had taken it all).

`--server-src DIR` runs the server (only the server) from another source tree, e.g. a
`git worktree` of an older commit, for a before/after comparison in one session.
Absolute figures depend on the host (and on what else runs on it: "other load").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.common import median, percentile, print_table, write_json
from bench.fleet import (
    PREFIX,
    SERVER_USER,
    Fleet,
    LoadMeter,
    find_mosquitto,
    machine_text,
    proc_memory,
    wait_for,
    workdir,
)
from bench.raw import mqtt_limits

GOOD, FLOODER, FUZZER = "good-1", "flood-1", "fuzz-1"
DEVICES = {GOOD: ["route-1"], FLOODER: ["flood"], FUZZER: ["fuzz"]}
OVERSIZED_BYTES = 257 * 1024
GAP_S = 0.02
MB = 1024 * 1024
IN = 'waystation_server_messages_total{direction="in"}'
INBOX = "waystation_server_inbox_messages"
INTAKE = "waystation_server_intake_messages_total"
WAITING = 'waystation_server_intake_bytes{state="waiting"}'


# ------------------------------------------------------------------ flooding clients

class Publisher:
    """A plain paho device client publishing QoS 1 with at most `window` unacked."""

    def __init__(self, fleet: Fleet, dev: str, window: int = 200) -> None:
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=dev, clean_session=True,
                             protocol=MQTTProtocolVersion.MQTTv311)
        client.username_pw_set(dev, fleet.passwords[dev])
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        self.slots = threading.Semaphore(window)
        self.acked = 0
        self.lock = threading.Lock()

        def on_publish(c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
            with self.lock:
                self.acked += 1
            self.slots.release()

        connected = threading.Event()
        client.on_publish = on_publish
        client.on_connect = lambda c, u, f, r, p: connected.set()
        client.connect("127.0.0.1", fleet.port, keepalive=60)
        client.loop_start()
        if not connected.wait(15):
            raise TimeoutError(f"{dev} did not connect")
        self.client, self.topic = client, f"{PREFIX}/{dev}/up"

    def publish_all(self, payloads: Any, timeout: float = 900) -> float:
        """Publish everything (the broker's PUBACK for each); seconds it took."""
        start = time.perf_counter()
        count = 0
        for payload in payloads:
            if not self.slots.acquire(timeout=timeout):
                raise TimeoutError("no PUBACK from the broker")
            self.client.publish(self.topic, payload, qos=1)
            count += 1
        wait_for(lambda: self.acked >= count, timeout, "PUBACKs of the flood")
        return time.perf_counter() - start

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def oversized(count: int) -> Any:
    head = f'{{"type":"changes","v":1,"dev":"{FLOODER}","sv":1,"ch":[],"pad":"'.encode()
    for i in range(count):
        yield head + bytes([97 + i % 26]) * (OVERSIZED_BYTES - len(head) - 2) + b'"}'


def fuzzed(count: int, seed: int = 8) -> list[bytes]:
    """Bad messages of every kind the protocol names (and valid ones it must refuse)."""
    rng = random.Random(seed)
    good = {"type": "changes", "v": 1, "dev": FUZZER, "sv": 1,
            "ch": [{"n": 1, "h": "0190000000000000", "c": "tasks", "k": "k", "s": "fuzz",
                    "op": "put", "f": {"route": "fuzz", "status": "x"}}]}
    text = json.dumps(good).encode()

    def one(i: int) -> bytes:
        kind = i % 12
        if kind == 0:
            return rng.randbytes(rng.randint(1, 2000))
        if kind == 1:
            return text[:rng.randint(1, len(text) - 1)]
        if kind == 2:
            return json.dumps({**good, "ch": "nope"}).encode()
        if kind == 3:
            return b'{"type":"hello","v":1,"x":' + b"[" * 5001 + b"]" * 5001 + b"}"
        if kind == 4:
            return text.replace(b'"n": 1', b'"n": 123456789012345678901234567890')
        if kind == 5:
            return zlib.compress(b'{"a":"' + b"x" * (2 * MB) + b'"}')
        if kind == 6:
            return json.dumps({**good, "type": f"t{rng.randint(0, 99)}"}).encode()
        if kind == 7:
            return json.dumps({**good, "dev": "good-1"}).encode()
        if kind == 8:  # a change to a scope it may not write: refused and remembered
            ch = {**good["ch"][0], "n": rng.randint(1, 2**40), "s": "route-1",  # type: ignore[index]
                  "f": {"route": "route-1"}}
            return json.dumps({**good, "ch": [ch]}).encode()
        if kind == 9:
            raw = bytearray(text)
            for _ in range(rng.randint(1, 8)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            return bytes(raw)
        if kind == 10:
            return json.dumps({**good, "v": rng.choice(["1", 2, 1.0, True, None])}).encode()
        return b"NaN"
    return [one(i) for i in range(count)]


# ------------------------------------------------------------------ measuring

def raw_flood(fleet: Fleet, count: int) -> dict[str, Any]:
    """The oversized flood delivered to a plain paho subscriber (the server's login)."""
    sub = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="raw-sub",
                      clean_session=True, protocol=MQTTProtocolVersion.MQTTv311)
    sub.username_pw_set(SERVER_USER, fleet.passwords[SERVER_USER])
    got = {"n": 0, "last": 0.0}
    ready = threading.Event()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        got["n"] += 1
        got["last"] = time.perf_counter()

    sub.on_message = on_message
    sub.on_subscribe = lambda c, u, mid, rc, p: ready.set()
    sub.on_connect = lambda c, u, f, r, p: c.subscribe(f"{PREFIX}/{FLOODER}/up", 1)
    sub.connect("127.0.0.1", fleet.port)
    sub.loop_start()
    assert ready.wait(15)
    pub = Publisher(fleet, FLOODER)
    start = time.perf_counter()
    try:
        pub.publish_all(oversized(count))
        wait_for(lambda: got["n"] >= count, 600, "the raw subscriber receiving the flood")
    finally:
        pub.close()
        sub.disconnect()
        sub.loop_stop()
    secs = got["last"] - start
    return {"messages": count, "seconds": secs, "msg_s": count / secs,
            "mb_s": count * OVERSIZED_BYTES / MB / secs}


def settle(fleet: Fleet, before: dict[str, float], count: int, timeout: float = 900
           ) -> float:
    """Wait until the server has taken `count` more messages and has nothing waiting
    (intake metrics; an older server without them: messages in and its inbox)."""
    start = time.perf_counter()

    def taken(m: dict[str, float]) -> float:
        if any(k.startswith(INTAKE) for k in m):
            return sum(v - before.get(k, 0.0) for k, v in m.items() if k.startswith(INTAKE))
        return m.get(IN, 0.0) - before.get(IN, 0.0)

    def done() -> bool:
        m = fleet.scrape()
        return taken(m) >= count and m.get(WAITING, m.get(INBOX, 0.0)) == 0
    wait_for(done, timeout, f"the server taking {count} messages")
    return time.perf_counter() - start


def reset_peak(pid: int) -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) of `pid` from now (root, or owner)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def flood_phase(fleet: Fleet, count: int) -> dict[str, Any]:
    assert fleet.server is not None and fleet.broker is not None
    server, broker = fleet.server.pid, fleet.broker.pid
    # Peaks of this phase only (not the raw phase's, nor the server's start).
    peaks_reset = reset_peak(server) and reset_peak(broker)
    mem0, broker0 = proc_memory(server), proc_memory(broker)
    before = fleet.scrape()
    pub = Publisher(fleet, FLOODER)
    try:
        publish_s = pub.publish_all(oversized(count))
    finally:
        pub.close()
    handled_s = settle(fleet, before, count)
    time.sleep(5)
    mem1, broker1 = proc_memory(server), proc_memory(broker)
    return {"messages": count, "payload_bytes": OVERSIZED_BYTES, "publish_s": publish_s,
            "peaks_of_this_phase_only": peaks_reset,
            "handled_s_after_publish": handled_s,
            "server_rss_before_mb": mem0["VmRSS"] / MB, "server_peak_mb": mem1["VmHWM"] / MB,
            "server_rss_after_mb": mem1["VmRSS"] / MB,
            "broker_rss_before_mb": broker0["VmRSS"] / MB,
            "broker_peak_mb": broker1["VmHWM"] / MB, "broker_rss_after_mb": broker1["VmRSS"] / MB,
            "metrics": _interesting(fleet.scrape())}


def fuzz_phase(fleet: Fleet, good: Any, count: int, samples: int) -> dict[str, Any]:
    messages = fuzzed(count)
    before = fleet.scrape()
    window: dict[str, float] = {}
    pub = Publisher(fleet, FUZZER)

    def burst() -> None:
        window["start"] = time.perf_counter()
        window["publish_s"] = pub.publish_all(messages)
        window["handled_s"] = settle(fleet, before, count)
        window["end"] = time.perf_counter()

    thread = threading.Thread(target=burst)
    try:
        good.send("paced", count=samples, gap_s=GAP_S, start=50_000)
        thread.start()
        res = good.recv()
        thread.join(900)
    finally:
        pub.close()
    if "error" in res:
        raise RuntimeError(res["error"])
    during = [ms for t0, ms in zip(res["t0"], res["ms"], strict=True)
              if window.get("start", 0) <= t0 <= window.get("end", float("inf"))]
    return {"messages": count, "publish_s": window.get("publish_s"),
            "handled_s": window.get("end", 0) - window.get("start", 0),
            "samples_total": len(res["ms"]), "samples_during": len(during),
            "during_ms": {"p50": percentile(during, 50), "p99": percentile(during, 99),
                          "max": max(during, default=float("nan"))},
            "all_ms": {"p50": percentile(res["ms"], 50), "p99": percentile(res["ms"], 99),
                       "max": max(res["ms"])},
            "metrics": _interesting(fleet.scrape())}


def _interesting(m: dict[str, float]) -> dict[str, float]:
    keys = ("intake", "dead_letters", "messages_total", "changes_total", "groups")
    return {k: v for k, v in m.items() if any(w in k for w in keys)}


def run_broker(kind: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    flood_n = 1000 if args.quick else 8000
    fuzz_n = 2000 if args.quick else 10_000
    meter = LoadMeter()
    with Fleet(kind, tmp / kind, DEVICES) as fleet:
        fleet.start_broker()
        raw = mqtt_limits(fleet, quick=True, rtt_samples=200, gap_s=GAP_S)
        raw["flood"] = raw_flood(fleet, flood_n)
        if args.server_src:
            os.environ["PYTHONPATH"] = str(Path(args.server_src).resolve())
        try:
            fleet.start_server()
        finally:
            os.environ.pop("PYTHONPATH", None)
        good = fleet.device(GOOD)
        good.call("start", wait="catchup")
        good.call("latency", samples=20, gap_s=GAP_S)  # warm-up
        idle = good.call("latency", samples=200, gap_s=GAP_S, start=1000)["ms"]
        flood = flood_phase(fleet, flood_n)
        fuzz = fuzz_phase(fleet, good, fuzz_n, samples=1000 if not args.quick else 250)
        store = fleet.open_server_store()
        try:
            with store.read() as txn:
                stats = getattr(txn, "dead_letter_stats", None)
                letters = stats().to_json() if stats else {"count": txn.counts()["dead_letters"]}
        finally:
            store.close()
    return {"broker": kind, "server": args.label, "raw": raw,
            "idle_ms": {"p50": median(idle), "p99": percentile(idle, 99)},
            "flood": flood, "fuzz": fuzz, "dead_letters": letters, "load": meter.result()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--broker", choices=("embedded", "mosquitto"), action="append")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--server-src", help="run the server from this source tree")
    parser.add_argument("--label", default="this tree", help="name of the server code")
    parser.add_argument("--out", default="flood", help="result name (bench/results/NAME.json)")
    args = parser.parse_args(argv)
    kinds = args.broker or (["mosquitto"] if find_mosquitto() else ["embedded"])
    print(machine_text(), flush=True)
    runs = []
    with workdir("flood", keep=args.keep) as tmp:
        for kind in kinds:
            runs.append(run_broker(kind, tmp, args))
    print_table("Oversized flood: one device, 257 KiB payloads (server RSS in MB)",
                ["broker", "server", "messages", "publish s", "RSS before", "peak", "after",
                 "broker peak", "raw: plain subscriber MB/s"],
                [[r["broker"], r["server"], r["flood"]["messages"], r["flood"]["publish_s"],
                  r["flood"]["server_rss_before_mb"], r["flood"]["server_peak_mb"],
                  r["flood"]["server_rss_after_mb"], r["flood"]["broker_peak_mb"],
                  r["raw"]["flood"]["mb_s"]] for r in runs])
    print_table("Fuzz burst from one device while another writes (good device ack ms)",
                ["broker", "server", "fuzzed", "burst handled s", "puts during", "p50", "p99",
                 "max", "idle p50", "idle p99", "raw RTT p50", "raw RTT p99"],
                [[r["broker"], r["server"], r["fuzz"]["messages"], r["fuzz"]["handled_s"],
                  r["fuzz"]["samples_during"], r["fuzz"]["during_ms"]["p50"],
                  r["fuzz"]["during_ms"]["p99"], r["fuzz"]["during_ms"]["max"],
                  r["idle_ms"]["p50"], r["idle_ms"]["p99"], r["raw"]["rtt_ms_p50"],
                  r["raw"]["rtt_ms_p99"]] for r in runs])
    write_json(args.out, {"machine_text": machine_text(), "quick": args.quick, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
