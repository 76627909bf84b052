"""A process for the index crash tests (run as a script; killed with SIGKILL by the test).

    python index_worker.py DATA_DIR write SEED       # writes, updates, deletes forever
    python index_worker.py DATA_DIR build BATCHES    # builds the extra index in batches of
                                                     # 40 and SIGKILLs itself after BATCHES

Prints "ready", then one line per committed operation (write) or batch (build), flushed.
The schema is the example one plus index ["status", "customer"] on tasks (EXTRA_INDEX).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import tomllib
from typing import Any

from agent.api import Agent
from agent.query.indexes import IndexDef
from schemas.collection import Catalog, example_catalog_path, parse_catalog
from waystation.config import AgentConfig

EXTRA_INDEX = ["status", "customer"]


def catalog(extra: bool) -> Catalog:
    data: dict[str, Any] = tomllib.loads(example_catalog_path().read_text())
    if extra:
        data["collections"]["tasks"]["indexes"].append(EXTRA_INDEX)
    return parse_catalog(data)


def config(data_dir: str) -> AgentConfig:
    return AgentConfig.model_validate({"device_id": "van-1", "data_dir": data_dir,
                                       "scopes": ["route-42", "depot-7", "fleet"]})


def write_forever(data_dir: str, seed: int) -> None:
    rng = random.Random(seed)
    agent = Agent.open(config(data_dir), catalog(extra=True))
    print("ready", flush=True)
    i = 0
    while True:
        key = f"w{rng.randrange(40)}"
        roll = rng.random()
        try:
            if roll < 0.6:
                agent.put("tasks", key, {"route": "route-42",
                                         "status": rng.choice(["out", "done", None]),
                                         "eta": rng.randrange(100),
                                         "customer": rng.choice(["Ann", "Bob", "Cy"])})
            elif roll < 0.75:
                agent.add("tasks", key, "labels", [rng.choice("xyz")])
            elif roll < 0.85:
                agent.remove("tasks", key, "labels", [rng.choice("xyz")])
            else:
                agent.delete("tasks", key)
        except Exception as exc:  # e.g. deleting a record not created yet
            if type(exc).__name__ != "WriteRefused":
                raise
        i += 1
        print(i, flush=True)


def build_then_die(data_dir: str, batches: int) -> None:
    agent = Agent.open(config(data_dir), catalog(extra=True), build_indexes=False)
    print("ready", flush=True)
    done = 0

    def progress(ix: IndexDef) -> None:
        nonlocal done
        done += 1
        print(f"{ix.name} {ix.state} {ix.done}", flush=True)
        if done >= batches:
            os.kill(os.getpid(), signal.SIGKILL)

    agent.build_indexes(batch=40, progress=progress)
    print("finished", flush=True)


if __name__ == "__main__":
    if sys.argv[2] == "write":
        write_forever(sys.argv[1], int(sys.argv[3]))
    else:
        build_then_die(sys.argv[1], int(sys.argv[3]))
