"""A writer process for the multi-process tests.

    python agent_writer.py DATA_DIR PREFIX COUNT [--go FILE]
    python agent_writer.py DATA_DIR PREFIX COUNT --threads T

Writes COUNT records (COUNT 0: forever) and prints each returned change number on its own
line, flushed, so the parent knows exactly which writes returned. With --go it waits for
FILE to exist before writing (so two writers start together). With --threads, T threads
write at once (their writes share commits: agent.groupcommit), each COUNT records, and
each line is "n largest-group-so-far".
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from agent.api import Agent
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig


def main() -> None:
    data_dir, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    go = Path(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--go" else None
    cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": data_dir,
                                      "scopes": ["route-42", "depot-7", "fleet"]})
    agent = Agent.open(cfg, load_catalog(example_catalog_path()))
    print("ready", flush=True)
    if len(sys.argv) > 5 and sys.argv[4] == "--threads":
        _threads(agent, prefix, count, int(sys.argv[5]))
        return
    if go is not None:
        deadline = time.monotonic() + 30
        while not go.exists():
            if time.monotonic() > deadline:
                raise SystemExit("no go signal")
            time.sleep(0.001)
    i = 0
    while count == 0 or i < count:
        result = agent.put("tasks", f"{prefix}-{i}", {"route": "route-42", "notes": f"w{i}"})
        print(result.n, flush=True)
        i += 1
    agent.close()


def _threads(agent: Agent, prefix: str, count: int, threads: int) -> None:
    out = threading.Lock()

    def writer(t: int) -> None:
        i = 0
        while count == 0 or i < count:
            result = agent.put("tasks", f"{prefix}-{t}-{i}",
                               {"route": "route-42", "notes": f"w{t}-{i}"})
            with out:
                print(result.n, agent.store.group_stats.largest, flush=True)
            i += 1

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    agent.close()


if __name__ == "__main__":
    main()
