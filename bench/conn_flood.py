"""Connection and login floods against the embedded broker, with an honest client's
round trips measured meanwhile (fix 11 of `broker.embedded.amqtt_broker`).

    .venv/bin/python -m bench.conn_flood [--broker-src DIR] [--label NAME] [--out NAME]

Two phases, each on a fresh ``python -m broker.embedded`` with its default limits:

1. **idle flood**: a separate process opens 2,000 TCP connections from 127.0.0.1 that
   never send CONNECT and holds them; measured: the broker's file descriptors at their
   peak and once the flood settled, and whether a device from 127.0.0.2 logs in and gets
   a message round trip through the broker meanwhile (and how long that took).
2. **login flood**: one device's password hashed slowly (~0.1 s per check, as an
   operator's raised ``iterations`` would), then 2,000 wrong-password CONNECTs for it
   from 4 addresses (127.0.0.10-13, one attempt after the other per address); measured:
   an honest logged-in client's QoS 1 round trip (publish, receive it back) p50/p99/max
   while the flood runs, and how long the flood took (capped at 60 s: attempts answered).

`--broker-src DIR` runs the broker from another source tree (e.g. ``git archive main``
unpacked somewhere) for a before/after comparison in one session. Absolute figures
depend on the host; compare within one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import percentile, print_table, write_json
from bench.fleet import machine_text
from broker.embedded.passwords import write_hash_entry
from tests.broker.test_embedded_floods import (
    FLOODER,
    FdPeak,
    Pinger,
    _attempt,
    _fds,
    _slow_hash,
    _sync_once,
)
from tests.fixtures_brokers import PREFIX, SERVER_USER, USERS, BrokerProcess, start_embedded
from tests.helpers import RecordingClient

FLOOD = 2000
GUESSERS = 4
CAP_S = 60.0


def _broker(tmp: Path, name: str, src: str | None) -> BrokerProcess:
    if src:
        os.environ["PYTHONPATH"] = str(Path(src).resolve())
    try:
        return start_embedded(tmp / name)
    finally:
        os.environ.pop("PYTHONPATH", None)


def idle_flood(tmp: Path, src: str | None) -> dict[str, Any]:
    broker = _broker(tmp, "idle", src)
    try:
        server = RecordingClient(broker.port, "server-1", SERVER_USER, USERS[SERVER_USER])
        assert server.connect() == "Success"
        assert server.subscribe(f"{PREFIX}/+/up") == 1
        before = _fds(broker)
        with FdPeak(broker) as fds:
            start = time.monotonic()
            flooder = subprocess.Popen([sys.executable, "-c", FLOODER, str(broker.port),
                                        str(FLOOD), "128"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
            assert flooder.stdin is not None and flooder.stdout is not None
            flooder.stdout.readline()
            opened_s = time.monotonic() - start
            closed = int(flooder.stdout.readline().split()[1])
            held = _fds(broker)
            t0 = time.monotonic()
            try:
                _sync_once(broker, server, "127.0.0.2", 1)
                honest: Any = round(time.monotonic() - t0, 3)
            except AssertionError as exc:
                honest = f"failed: {exc}"[:80]
        flooder.stdin.close()
        flooder.wait(30)
        server.close()
        return {"fds_before": before, "fds_peak": fds.peak, "fds_held": held,
                "closed_at_once": closed, "flood_open_s": round(opened_s, 1),
                "honest_login_and_round_trip_s": honest}
    finally:
        broker.stop()


def login_flood(tmp: Path, src: str | None) -> dict[str, Any]:
    broker = _broker(tmp, "login", src)
    try:
        write_hash_entry(broker.password_file, "van-7", _slow_hash(USERS["van-7"], 0.1))
        pinger = Pinger(broker.port)
        quiet = [pinger.round_trip(i) for i in range(200)]
        answers: list[bytes] = []
        deadline = time.monotonic() + CAP_S

        def guess(source: str) -> None:
            for _ in range(FLOOD // GUESSERS):
                if time.monotonic() > deadline:
                    return
                try:
                    answers.append(_attempt(broker.port, source, "van-7", "guess"))
                except OSError:
                    answers.append(b"error")

        guessers = [threading.Thread(target=guess, args=(f"127.0.0.{10 + i}",), daemon=True)
                    for i in range(GUESSERS)]
        start = time.monotonic()
        for thread in guessers:
            thread.start()
        during: list[float] = []
        n = 1000
        while any(t.is_alive() for t in guessers):
            during.append(pinger.round_trip(n, timeout=CAP_S))
            n += 1
            time.sleep(0.005)
        took = time.monotonic() - start
        pinger.close()
        ms = [x * 1000 for x in during]
        return {"quiet_p99_ms": round(percentile([x * 1000 for x in quiet], 99), 2),
                "flood_p50_ms": round(percentile(ms, 50), 2),
                "flood_p99_ms": round(percentile(ms, 99), 2),
                "flood_max_ms": round(max(ms), 2), "round_trips": len(ms),
                "attempts_answered": len(answers), "flood_s": round(took, 1)}
    finally:
        broker.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker-src", help="run the broker from this source tree")
    parser.add_argument("--label", default="this tree", help="name of this run's broker")
    parser.add_argument("--out", default="conn_flood", help="result name")
    args = parser.parse_args(argv)
    print(machine_text(), flush=True)
    with tempfile.TemporaryDirectory(prefix="conn-flood-") as tmp:
        idle = idle_flood(Path(tmp), args.broker_src)
        login = login_flood(Path(tmp), args.broker_src)
    print_table(f"idle flood ({FLOOD} sockets from one address), broker: {args.label}",
                list(idle), [list(idle.values())])
    print_table(f"login flood ({FLOOD} wrong passwords, ~0.1 s hash), broker: {args.label}",
                list(login), [list(login.values())])
    write_json(args.out, {"machine_text": machine_text(), "label": args.label,
                          "idle": idle, "login": login})
    return 0


if __name__ == "__main__":
    sys.exit(main())


