"""A process that dies (kill -9 by its parent) in the middle of a transaction.

    python txn_crasher.py DATA_DIR READY_FILE

Commits one plain write (printed "before N"), then starts a transaction of four
operations across two collections; after all four were written inside the LMDB write
transaction and before its commit, it creates READY_FILE and waits to be killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from agent import transaction
from agent.api import Agent
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig


def main() -> None:
    data_dir, ready = sys.argv[1], Path(sys.argv[2])
    cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": data_dir,
                                      "scopes": ["route-42", "depot-7", "fleet"]})
    agent = Agent.open(cfg, load_catalog(example_catalog_path()))
    for bin_ in ("bin-a", "bin-b"):
        agent.put("inventory", bin_, {"depot": "depot-7", "sku": "A"})
    before = agent.put("tasks", "t-before", {"route": "route-42", "status": "open"})
    print("before", before.n, flush=True)

    def hang() -> None:
        ready.write_text("in the transaction")
        time.sleep(120)  # the parent kills this process with SIGKILL here

    transaction._before_commit = hang
    with agent.transaction() as tx:
        tx.put("tasks", "o-1", {"route": "route-42", "status": "ordered"})
        tx.put("tasks", "o-1:line-1", {"route": "route-42", "notes": "2 x A"})
        tx.increment("inventory", "bin-a", "stock", -2)
        tx.increment("inventory", "bin-b", "stock", 2)
    print("committed (must not happen)", flush=True)


if __name__ == "__main__":
    main()
