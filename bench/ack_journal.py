"""What the journal of acked changes (agent.journal) costs on the ack path.

    .venv/bin/python -m bench.ack_journal [DIR]

Applies the same acks to two agents, one with the journal (the default window and cap)
and one without (`sync.acked_journal_days = 0`), and prints the CPU time (process time:
the commit's wait for the disk is not in it, and is the same with or without) per acked
change for acks of 1 and of 500 changes, the journal's bytes per change, and how long
the restore's resync takes to move the whole journal back into the outbox. DIR defaults to a
temporary directory (/dev/shm shows the CPU cost without the disk).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from agent.api import Agent
from schemas import wire
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig

SCOPE = "route-42"
ROUNDS = 7


def _agent(root: Path, name: str, days: float) -> Agent:
    cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": root / name,
                                      "scopes": [SCOPE],
                                      "sync": {"acked_journal_days": days}})
    return Agent.open(cfg, load_catalog(example_catalog_path()))


def _us_per_change(ag: Agent, ack_size: int, acks: int) -> float:
    """Write `ack_size * acks` changes, then time applying them in acks of `ack_size`."""
    first = ag.status().next_n
    for i in range(ack_size * acks):  # not timed: only the acks are
        ag.put("tasks", f"t-{first + i}", {"route": SCOPE, "status": "out",
                                           "notes": "left at the door " * 4})
    msgs = [wire.Ack(ok=[(n, SCOPE, n) for n in range(base, base + ack_size)])
            for base in range(first, first + ack_size * acks, ack_size)]
    start = time.process_time()
    for msg in msgs:
        ag.sync.apply_ack(msg)
    return (time.process_time() - start) * 1e6 / (ack_size * acks)


def main(root: Path) -> None:
    on, off = _agent(root, "on", 7), _agent(root, "off", 0)
    try:
        for size, acks in ((1, 100), (500, 2)):
            _us_per_change(on, size, acks)  # warm up
            _us_per_change(off, size, acks)
            with_j: list[float] = []
            without: list[float] = []
            for _ in range(ROUNDS):  # interleaved: a busy machine slows both alike
                with_j.append(_us_per_change(on, size, acks))
                without.append(_us_per_change(off, size, acks))
            print(f"ack of {size:>3} change(s): {statistics.median(without):7.1f} µs CPU per "
                  f"change without the journal, {statistics.median(with_j):7.1f} with it")
        held = on.status().journal
        print(f"journal: {held['changes']} changes, {held['bytes'] / held['changes']:.0f} "
              "bytes per change")
        # The restore's resync: every journaled change back into the outbox, in one
        # transaction with the resync itself (wall time, durable commit included).
        start = time.perf_counter()
        on.sync.execute_command(wire.Command(id="r-1", cmd="resync", args={
            "why": "restore", "seqs": {SCOPE: 0}}))
        took = time.perf_counter() - start
        print(f"replay of {held['changes']} changes: {took * 1000:.0f} ms "
              f"({took * 1e6 / held['changes']:.0f} µs per change)")
    finally:
        on.close()
        off.close()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
