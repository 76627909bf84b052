"""A device on a GPRS/EDGE link: does it still drain its outbox and catch up, and what
does it spend on the link? The agent's broker connection goes through
tests/slow_relay.py (a userspace relay: rate each way, round trip, stalls), on the
embedded broker and an LMDB merge server, with the agent's default sync timings.

    .venv/bin/python -m bench.slow_link [--quick] [--rate 32000] [--rtt 0.6]   # ~6 min

Scenarios: (a) 300 pending changes of ~300 B drained; (b) a fresh device catching up
2,000 records (several 192 KiB pages); (c) as (b) with the link stalling 5 s every 20 s.
Records are hex digests (little redundancy: compression does not hide their size).
Raw limit, through the same relay in the same run: plain paho moving the same number of
bytes (QoS 1, one message per 192 KiB) the same way. The ratio time / raw is the figure.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.common import print_table, versions, write_json
from tests.e2e.fleet import SERVER_USER, Fleet
from tests.slow_relay import SlowRelay

PAGE = 192 * 1024
PREFIX = "waystation"
SYNC_DEFAULTS = {"ack_timeout_s": 10.0, "gap_timeout_s": 5.0, "backoff_initial_s": 0.5,
                 "backoff_max_s": 60.0, "status_interval_s": 30.0}
"""The defaults (the fleet's test agents get short timings; a van gets these)."""


def _fields(i: int) -> dict[str, Any]:
    digest = hashlib.sha256(str(i).encode()).hexdigest()
    return {"depot": "depot-7", "name": digest * 3, "sku": digest[::-1]}


def _client(cid: str, user: str, password: str, port: int) -> paho.Client:
    c = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=cid,
                    clean_session=True, protocol=MQTTProtocolVersion.MQTTv311)
    c.username_pw_set(user, password)
    c.connect("127.0.0.1", port, keepalive=120)
    c.loop_start()
    return c


def raw(fleet: Fleet, relay: SlowRelay, dev: str, nbytes: int, up: bool) -> float:
    """Seconds plain paho takes to move `nbytes` through the relay (QoS 1, messages of
    at most 192 KiB): up, device -> broker (until the last PUBACK); down, broker ->
    device (until the last message is in)."""
    count = max(1, -(-nbytes // PAGE))
    sizes = [nbytes // count] * count
    got = threading.Event()
    received: list[int] = []
    device = _client(f"{dev}", dev, fleet.passwords[dev], relay.port)
    if up:
        start = time.monotonic()
        infos = [device.publish(f"{PREFIX}/{dev}/status", b"x" * n, qos=1) for n in sizes]
        for info in infos:
            info.wait_for_publish(600)
        took = time.monotonic() - start
    else:
        def on_message(c: Any, u: Any, msg: Any) -> None:
            received.append(len(msg.payload))
            if len(received) == count:
                got.set()
        subscribed = threading.Event()
        device.on_subscribe = lambda *a: subscribed.set()
        device.on_message = on_message
        device.subscribe(f"{PREFIX}/{dev}/down", 1)
        subscribed.wait(30)
        server = _client("raw-server", SERVER_USER, fleet.server_password, fleet.port)
        start = time.monotonic()
        for n in sizes:
            server.publish(f"{PREFIX}/{dev}/down", b"x" * n, qos=1)
        got.wait(600)
        took = time.monotonic() - start
        server.loop_stop()
        server.disconnect()
    device.loop_stop()
    device.disconnect()
    return took


def scenario(*, name: str, changes: int, records: int, rate: int, rtt: float,
             stall_every: float, stall: float, timeout: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="slowlink-"))
    with Fleet(root, "embedded") as fleet:
        fleet.start()
        fleet.add_device("van-1", ["depot-7"], sync=SYNC_DEFAULTS)
        if records:
            fleet.add_device("feeder", ["depot-7"])
            feeder = fleet.agent("feeder")
            for i in range(records):
                feeder.put("inventory", f"sku-{i}", _fields(i))
            fleet.start_agent("feeder")
            fleet.wait_drained("feeder", timeout=300)
            fleet.stop_agent("feeder")
        van = fleet.agent("van-1")
        for i in range(changes):
            van.put("inventory", f"van-{i}", _fields(100_000 + i))
        with SlowRelay(fleet.port, rate_bps=rate, rtt_s=rtt, stall_every_s=stall_every,
                       stall_s=stall) as relay:
            fleet.edit_agent_config("van-1", lambda d: d["mqtt"].update(
                host="127.0.0.1", port=relay.port))
            start = time.monotonic()
            fleet.start_agent("van-1", wait=False)
            done = False
            while time.monotonic() - start < timeout:
                if fleet.pending("van-1") == 0 and (not records or not fleet.mismatches("van-1")):
                    done = True
                    break
                time.sleep(0.5)
            took = time.monotonic() - start
            log = fleet.agents["van-1"]
            row = {
                "scenario": name, "done": done, "seconds": round(took, 1),
                "bytes_up": relay.bytes_up, "bytes_down": relay.bytes_down,
                "connections": relay.connections,
                "catchup_retries": len(log.events("catchup_retry")),
                "deaf_reconnects": len(log.events("link_deaf")),
            }
            fleet.stop_agent("van-1")
            # The raw limit: the bytes the agent moved the busy way, by plain paho.
            up = changes > 0
            moved = relay.bytes_up if up else relay.bytes_down
            row["raw_seconds"] = round(raw(fleet, relay, "van-1", moved, up), 1)
            row["ratio"] = round(took / row["raw_seconds"], 2) if row["raw_seconds"] else None
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a tenth of the records")
    ap.add_argument("--rate", type=int, default=32_000, help="bits per second each way")
    ap.add_argument("--rtt", type=float, default=0.6)
    ap.add_argument("--only", choices=["a", "b", "c"], nargs="*", help="these scenarios")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up a scenario after")
    ap.add_argument("--out", default="slow_link", help="results/NAME.json (e.g. -before)")
    args = ap.parse_args()
    scale = 10 if args.quick else 1
    only = set(args.only or "abc")
    common = {"rate": args.rate, "rtt": args.rtt, "timeout": args.timeout}
    changes, records = 300 // scale, 2000 // scale
    plans = {
        "a": dict(name=f"a: {changes} changes up", changes=changes, records=0,
                  stall_every=0, stall=0),
        "b": dict(name=f"b: catch-up {records} records", changes=0, records=records,
                  stall_every=0, stall=0),
        "c": dict(name="c: as b, 5 s stall every 20 s", changes=0, records=records,
                  stall_every=20, stall=5),
    }
    rows = [scenario(**plan, **common) for key, plan in plans.items()  # type: ignore[arg-type]
            if key in only]
    keys = ["scenario", "done", "seconds", "raw_seconds", "ratio", "bytes_up", "bytes_down",
            "connections", "catchup_retries", "deaf_reconnects"]
    print_table(f"Slow link: {args.rate / 1000:g} kbit/s each way, RTT {args.rtt:g} s",
                keys, [[r[k] for k in keys] for r in rows])
    write_json(args.out + ("-quick" if args.quick else ""),
               {"versions": versions(), "rate_bps": args.rate, "rtt_s": args.rtt,
                "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
