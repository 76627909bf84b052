"""A process that dies (kill -9 by its parent) while taking a schema version.

    python schema_crasher.py DATA_DIR READY_FILE

Opens the device's store on version 2 of the test schema (tests/schema_versions.py)
with a record from the server and a pending write, both with `notes`; then takes
version 3 (`notes` renamed `note`): once the records were rewritten inside the LMDB
write transaction and before its commit, it creates READY_FILE and waits to be killed.
"""

from __future__ import annotations

import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from agent.api import Agent
from agent.core import Work
from schemas import wire
from schemas.collection import parse_catalog
from tests.agent.agentkit import make_cfg, rec
from tests.schema_versions import V2, V3


def main() -> None:
    data_dir, ready = Path(sys.argv[1]), Path(sys.argv[2])
    agent = Agent.open(make_cfg(data_dir), parse_catalog(tomllib.loads(V2), "v2"))
    agent.sync.apply_delta(wire.Delta(d=[rec("t-1", 1, {"route": "route-42", "notes": "gate"})]))
    agent.put("tasks", "t-2", {"route": "route-42", "notes": "mine"})
    agent.sync.apply_welcome(wire.Welcome(caps=["schema", "schema_push"], sv=3, sv_min=1))

    def hang(self: Work, *args: Any) -> None:
        ready.write_text("records rewritten, not committed")
        time.sleep(120)  # the parent kills this process with SIGKILL here

    Work.refresh_view = hang  # type: ignore[method-assign]
    agent.sync.take_schema(wire.SchemaPush(sv=3, text=V3))
    print("committed", flush=True)


if __name__ == "__main__":
    main()
