"""A process that dies (kill -9 by its parent) inside an idempotent write's transaction:
after the increment was written and before its key was recorded and committed.

    python idem_crasher.py DATA_DIR READY_FILE

Creates bin-a (printed "before N"), then sends an increment of bin-a's stock with the
Idempotency-Key "move-1"; the answer is made inside the write transaction (it is
stored with the key): making it creates READY_FILE and waits to be killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from agent.api import Agent
from agent.idempotency import Once
from schemas.collection import example_catalog_path, load_catalog
from waystation.config import AgentConfig

KEY = Once(scope="app", key="move-1", method="POST",
           path="/v1/collections/inventory/records/bin-a/increment", body="b1",
           answer=lambda r: (202, r.to_dict()))


def main() -> None:
    data_dir, ready = sys.argv[1], Path(sys.argv[2])
    cfg = AgentConfig.model_validate({"device_id": "van-1", "data_dir": data_dir,
                                      "scopes": ["route-42", "depot-7", "fleet"]})
    agent = Agent.open(cfg, load_catalog(example_catalog_path()))
    before = agent.put("inventory", "bin-a", {"depot": "depot-7", "sku": "A"})
    print("before", before.n, flush=True)

    def hang(result: Any) -> tuple[int, Any]:
        ready.write_text("the increment is written, its key not yet")
        time.sleep(120)  # the parent kills this process with SIGKILL here
        return 202, result.to_dict()

    agent.increment("inventory", "bin-a", "stock", -2, once=Once(
        **{**KEY.__dict__, "answer": hang}))
    print("committed (must not happen)", flush=True)


if __name__ == "__main__":
    main()
