"""CPU cost of the agent's sync policy on the daemon's hot path (a benchmark, not a test).

    .venv/bin/python -m bench.policy [--rounds N]

The daemon asks its `agent.policy.gate.Gate` before every batch, and once per engine
loop turn. Measured, as CPU time per call (`time.process_time`, best of N rounds):

- gate.cached: `Gate.decide()` within its 1 s cache (what almost every call costs);
- gate.fresh: `Gate.decide()` recomputed (3 windows, a metered file probe and a battery
  file probe, both within their interval);
- raw.monotonic: one `time.monotonic()` call, the floor of any cached answer;
- raw.put: one synced LMDB put of 300 bytes (what a local write costs at the least),
  to set the policy's cost beside the work it gates.

The figures are printed and written to `bench/results/policy.json` (machine, versions and
time inside).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lmdb

from agent.policy.gate import Gate
from bench.common import write_json
from waystation.config.policy import PolicyConfig


def _per_call(fn: Callable[[], object], calls: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.policy")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "metered").write_text("metered\n")
        (root / "battery").write_text("55 discharging\n")
        cfg = PolicyConfig.model_validate({
            "windows": ["Mon-Fri 22:00-06:00", "Sat,Sun 00:00-24:00", "* 12:00-12:30"],
            "metered": {"file": str(root / "metered"), "daily_bytes": 10**9},
            "battery": {"file": str(root / "battery"), "min_percent": 20}})
        gate = Gate(cfg)
        gate.decide()
        cached = _per_call(gate.decide, 200_000, args.rounds)
        fresh_gate = Gate(cfg, mono=iter(range(0, 10**9, 2)).__next__)  # every call fresh
        fresh = _per_call(fresh_gate.decide, 5_000, args.rounds)
        mono = _per_call(time.monotonic, 200_000, args.rounds)
        env = lmdb.open(str(root / "raw"), map_size=1 << 28, sync=True)
        value = b"x" * 300
        counter = iter(range(10**9))

        def put() -> None:
            with env.begin(write=True) as txn:
                txn.put(next(counter).to_bytes(8, "big"), value)

        raw_put = _per_call(put, 500, args.rounds)
        env.close()
    print("| path | CPU µs per call | x raw.monotonic | x raw synced put |")
    print("| --- | ---: | ---: | ---: |")
    rows = []
    for name, us in (("gate.cached", cached), ("gate.fresh", fresh),
                     ("raw.monotonic", mono), ("raw.put (synced, 300 B)", raw_put)):
        print(f"| {name} | {us:.2f} | {us / mono:.1f} | {us / raw_put:.3f} |")
        rows.append({"path": name, "cpu_us": us, "x_monotonic": us / mono,
                     "x_synced_put": us / raw_put})
    write_json("policy", {"rounds": args.rounds, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
