"""Footprint of a device: agent memory and disk with 100,000 records, bytes on the wire.

Memory and disk: the daemon process's RSS (split into anonymous memory and file-backed
pages, i.e. the LMDB map pages it touched) and the size of `data.mdb`
- idle: daemon started on an empty store;
- after draining 100,000 own changes (written offline, then synced);
- after downloading 100,000 records written by another device (catch-up).

Bytes on the wire per synced change, both directions, everything included: a small TCP
proxy between the agent and the broker counts the bytes each way (MQTT fixed headers,
topics, packet ids, PUBACKs in both directions, pings, the connect/hello/catch-up of a
session; TCP/IP headers are not counted), next to the MQTT payload bytes the agent
published and received. ~300-byte task records (JSON of the fields: 300 bytes on average,
251 to 359):
- bulk: 10,000 changes written offline, then sent batched (and compressed) on connect;
- single changes on an idle link: one put at a time, each waiting for its ack, 50 ms
  apart, after 5 to warm up; once with the default settings and once with
  `sync.compress_over_bytes = 128`. Agent and server agree to the compact encodings
  (`zd1`, `zd2`, `zd3`: every message compressed with a preset dictionary, the changes
  with the device's own last answered ones), so the threshold changes nothing here; a
  v1 device would send a lone change as plain JSON (below 512 bytes);
- download: a new device catching up 10,000 records (paged, compressed).
Reference (the "sync loop" issue): PouchDB replicating to a CouchDB-style server spends
~520 bytes per such document; the target is half of that, 260 bytes, or less.

    .venv/bin/python -m bench.footprint [--quick] [--broker mosquitto|embedded] [--keep]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench.common import print_table, write_json
from bench.fleet import (
    CountingProxy,
    DeviceProc,
    Fleet,
    copy_tree,
    find_mosquitto,
    machine_text,
    workdir,
)

POUCHDB_BYTES = 520
TARGET_BYTES = POUCHDB_BYTES // 2
RECORD_BYTES = 300


def devices() -> dict[str, list[str]]:
    return {"idle-1": ["route-idle"], "mem-writer": ["route-mem"],
            "mem-reader": ["route-mem"], "bulk-1": ["route-bulk"],
            "single-1": ["route-single"], "single-2": ["route-single2"],
            "down-1": ["route-bulk"]}


def _mem_row(what: str, stats: dict[str, Any]) -> dict[str, Any]:
    mem = stats["mem"]
    return {"what": what, "records": stats["records"], "rss": mem.get("VmRSS", 0),
            "rss_anon": mem.get("RssAnon", 0), "rss_file": mem.get("RssFile", 0),
            "peak_rss": mem.get("VmHWM", 0), "data_mdb": stats["data_mdb"],
            "used_bytes": stats["used_bytes"]}


def memory(fleet: Fleet, tmp: Path, size: int) -> list[dict[str, Any]]:
    rows = []
    dev = fleet.device("idle-1")
    dev.call("start", wait="catchup")
    rows.append(_mem_row("daemon idle, empty store", dev.call("stats")))
    fleet.close_device(dev)

    dev = fleet.device("mem-writer", copy_tree(tmp / "backlog-mem", tmp / "dev" / "mem-writer"))
    dev.call("start", wait="drained", timeout=1800)
    rows.append(_mem_row(f"after draining {size:,} own changes", dev.call("stats")))
    fleet.close_device(dev)

    dev = fleet.device("mem-reader")
    dev.call("start", wait="catchup", timeout=1800)
    rows.append(_mem_row(f"after downloading {size:,} records", dev.call("stats")))
    fleet.close_device(dev)
    return rows


def _wire_row(what: str, changes: int, proxy: CountingProxy, stats: dict[str, Any]
              ) -> dict[str, Any]:
    up, down = proxy.counts()
    wire = stats["wire"]
    return {"what": what, "changes": changes, "wire_up": up, "wire_down": down,
            "payload_up": wire["payload_up"], "payload_down": wire["payload_down"],
            "messages_up": wire["messages_up"], "messages_down": wire["messages_down"],
            "per_change": (up + down) / changes,
            "per_change_up": up / changes, "per_change_down": down / changes,
            "payload_per_change": (wire["payload_up"] + wire["payload_down"]) / changes,
            "verdict": "PASS" if (up + down) / changes <= TARGET_BYTES else "FAIL"}


def wire(fleet: Fleet, tmp: Path, bulk: int, singles: int) -> list[dict[str, Any]]:
    rows = []
    proxy = CountingProxy(fleet.port)
    try:
        # bulk: the whole session (connect, hello, catch-up, batches, acks, disconnect)
        dev = fleet.device("bulk-1", copy_tree(tmp / "backlog-bulk", tmp / "dev" / "bulk-1"),
                           port=proxy.port)
        proxy.reset()
        dev.call("start", wait="drained", timeout=1800)
        stats = dev.call("stats")
        fleet.close_device(dev)
        rows.append(_wire_row(f"bulk: {bulk:,} changes sent on connect (whole session)",
                              bulk, proxy, stats))

        for name, over in (("single-1", None), ("single-2", 128)):
            sync = {"compress_over_bytes": over} if over else None
            dev = fleet.device(name, port=proxy.port, sync=sync)
            dev.call("start", wait="catchup")
            dev.call("latency", samples=5, gap_s=0.05)
            proxy.reset()
            dev.call("reset_wire")
            dev.call("latency", samples=singles, gap_s=0.05, start=100)
            stats = dev.call("stats")
            fleet.close_device(dev)
            label = "default settings, zd3" if over is None else f"compress_over_bytes = {over}"
            rows.append(_wire_row(f"single changes on an idle link ({label})", singles, proxy,
                                  stats))

        dev = fleet.device("down-1", port=proxy.port)
        proxy.reset()
        dev.call("start", wait="catchup", timeout=1800)
        stats = dev.call("stats")
        fleet.close_device(dev)
        row = _wire_row(f"download: {bulk:,} records by catch-up (whole session)",
                        stats["records"], proxy, stats)
        rows.append(row)
    finally:
        proxy.close()
    return rows


def prepare(tmp: Path, sizes: dict[str, int]) -> None:
    fleet = Fleet("embedded", tmp, devices())
    procs = {name: DeviceProc(name, fleet.agent_config(name, tmp / f"backlog-{tag}", port=1),
                              tmp)
             for tag, name in (("mem", "mem-writer"), ("bulk", "bulk-1"))}
    try:
        for tag, name in (("mem", "mem-writer"), ("bulk", "bulk-1")):
            procs[name].send("write", count=sizes[tag])
        for proc in procs.values():
            proc.recv()
    finally:
        for proc in procs.values():
            proc.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 records, fewer samples")
    parser.add_argument("--broker", choices=("mosquitto", "embedded"), default=None)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    kind = args.broker or ("mosquitto" if find_mosquitto() else "embedded")
    sizes = ({"mem": 10_000, "bulk": 2_000, "singles": 50} if args.quick
             else {"mem": 100_000, "bulk": 10_000, "singles": 200})
    print(f"machine: {machine_text()}")
    with workdir("ws-bench-footprint-", args.keep) as tmp:
        print("writing the offline backlogs ...", flush=True)
        prepare(tmp, sizes)
        with Fleet(kind, tmp / kind, devices()) as fleet:
            fleet.start_broker()
            fleet.start_server()
            print(f"[{kind}] memory ...", flush=True)
            mem = memory(fleet, tmp, sizes["mem"])
            print(f"[{kind}] bytes on the wire ...", flush=True)
            wire_rows = wire(fleet, tmp, sizes["bulk"], sizes["singles"])
    print()
    mib = 1 << 20
    print_table(f"Agent daemon process memory and store size (through {kind})",
                ["state", "records", "RSS MiB", "anon MiB", "file-backed MiB", "peak RSS MiB",
                 "data.mdb MiB", "used in map MiB"],
                [[r["what"], r["records"], r["rss"] / mib, r["rss_anon"] / mib,
                  r["rss_file"] / mib, r["peak_rss"] / mib, r["data_mdb"] / mib,
                  r["used_bytes"] / mib] for r in mem])
    print_table(
        f"Bytes on the wire per synced change, ~{RECORD_BYTES}-byte records, both directions "
        f"(TCP payload via a proxy; PouchDB ~{POUCHDB_BYTES} B/doc, target <= {TARGET_BYTES})",
        ["traffic", "changes", "B/change total", "up", "down", "MQTT payload B/change",
         "messages up", "messages down", "verdict"],
        [[r["what"], r["changes"], r["per_change"], r["per_change_up"], r["per_change_down"],
          r["payload_per_change"], r["messages_up"], r["messages_down"], r["verdict"]]
         for r in wire_rows])
    write_json("footprint", {"quick": args.quick, "broker": kind, "sizes": sizes,
                             "machine_text": machine_text(), "record_json_bytes": RECORD_BYTES,
                             "pouchdb_bytes": POUCHDB_BYTES, "target_bytes": TARGET_BYTES,
                             "memory": mem, "wire": wire_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
