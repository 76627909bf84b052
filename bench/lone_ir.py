"""Instructions per lone change, by phase, counted by valgrind (a benchmark, not a test).

    .venv/bin/python -m bench.lone_ir [--changes 300] [--name NAME]

CPU time moves with the load on a shared machine (±20 % between repeats here, more while
other work runs); instruction counts do not. This runs `bench.cpu`'s lone path (one
change at a time through the daemon's engine, a link that only collects what is
published, the store in /dev/shm) under `valgrind --tool=callgrind` three times, once
per phase: the app's `put()`, the daemon's turn for the write's wake (scan, encode,
publish), its turn for the ack (decode, apply, commit). The measured phase runs inside a
ctypes callback and `--toggle-collect=ffi_call*` counts only inside it: start-up, the
other phases and the test harness (building the ack) are not counted. The daemon runs
as it does with its wake socket open (a turn without news does not scan the outbox).

`--tree DIR` counts the code of another checkout instead (e.g. `git archive` of the
commit before a change, unpacked in DIR), with this benchmark's procedure.

Needs valgrind (`apt-get install valgrind`); ~2-5 minutes per phase.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PHASES = ("put", "wake", "ack")
_WARM = 30


def run_phase(phase: str, changes: int) -> None:
    """The lone loop, `phase` inside a ctypes callback (run under valgrind by `main`)."""
    from agent.api import Agent
    from agent.daemon import AgentDaemon
    from bench.cpu import CATALOG, SCOPE
    from bench.device import record
    from schemas import codec, wire
    from waystation.config import AgentConfig

    data = Path(tempfile.mkdtemp(dir="/dev/shm"))
    cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": str(data),
                                      "scopes": [SCOPE],
                                      "mqtt": {"host": "127.0.0.1", "port": 1,
                                               "password": "unused"}})
    sent: list[bytes] = []
    callback = ctypes.CFUNCTYPE(None)
    with Agent.open(cfg, CATALOG) as agent:
        daemon = AgentDaemon(cfg, CATALOG, agent=agent)

        def publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
            sent.append(payload)
            return True

        daemon.link.publish = publish  # type: ignore[method-assign]
        daemon._connected = daemon._answered = True
        daemon.sync.server_caps = frozenset(daemon.sync.offered)
        daemon._wake_sock = object()  # type: ignore[assignment]  # as while running
        recs = [record(SCOPE, j) for j in range(changes + _WARM)]
        state: dict[str, Any] = {"j": 0, "ack": b"", "q": 0}

        def put() -> None:
            j = state["j"]
            agent.put("tasks", f"l-{j:07d}", recs[j])

        def wake() -> None:
            daemon._handle(("wake",))
            daemon._pump(time.monotonic())

        def ack() -> None:
            daemon._handle(("msg", daemon.down_topic, state["ack"]))
            daemon._pump(time.monotonic())

        steps = {"put": put, "wake": wake, "ack": ack}
        counted = callback(steps[phase])
        for j in range(changes + _WARM):
            state["j"] = j
            for name, step in steps.items():
                if name == "ack":
                    msg = codec.decode(sent.pop())
                    assert isinstance(msg, wire.Changes)
                    ok = []
                    for ch in msg.ch:
                        state["q"] += 1
                        ok.append([ch.n, SCOPE, state["q"]])
                    state["ack"] = codec.encode_dict({"type": "ack", "v": 1, "ok": ok},
                                                     zdict=daemon._zdict())
                (counted if name == phase and j >= _WARM else step)()
        assert agent.sync.pending_count() == 0


_OTHER_TREE = (
    "import runpy, sys; tree, here = sys.argv[1], sys.argv[2]; del sys.argv[1:3]; "
    # the editable install maps the packages to this checkout: drop it, import from tree
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
    "sys.path.insert(0, tree); sys.argv[0] = here; runpy.run_path(here, run_name='__main__')")


def count(phase: str, changes: int, tree: str | None = None) -> int:
    """Instructions of `changes` runs of `phase` (valgrind callgrind), of this checkout's
    code or of the one in `tree`."""
    run = ([sys.executable, "-m", "bench.lone_ir"] if tree is None else
           [sys.executable, "-c", _OTHER_TREE, tree, __file__])
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", "--toggle-collect=ffi_call*",
             f"--callgrind-out-file={tmp}/cg.out", *run,
             "--phase", phase, "--changes", str(changes)],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
            check=True)
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from valgrind: {proc.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--phase", choices=PHASES, help="(internal: run one phase)")
    parser.add_argument("--name", help="also write bench/results/NAME.json")
    parser.add_argument("--tree", help="count the agent code of this checkout instead")
    args = parser.parse_args()
    if args.phase:
        run_phase(args.phase, args.changes)
        return
    from bench.common import write_json

    per_change = {phase: count(phase, args.changes, args.tree) / args.changes
                  for phase in PHASES}
    per_change["daemon"] = per_change["wake"] + per_change["ack"]
    per_change["total"] = per_change["put"] + per_change["daemon"]
    for phase, value in per_change.items():
        print(f"{phase:7s} {value:12,.0f} instructions/change")
    if args.name:
        write_json(args.name, {"instructions_per_change": per_change,
                               "changes": args.changes, "store": "/dev/shm",
                               "tree": args.tree or "this checkout"})


if __name__ == "__main__":
    main()
