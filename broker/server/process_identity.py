"""The merge servers whose process has ended, as far as this host can tell
(`waystation.processes`), for the operator's `server status` (`broker.server.liveness`),
and the one still running under the id a starting server would take (`running_twin`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from broker.server.store.rows import ServerRow
from waystation.processes import PROC, has_ended, pid_alive, this_process


def ended_servers(rows: Iterable[ServerRow], proc: Path = PROC,
                  exists: Callable[[int], bool] = pid_alive) -> frozenset[str]:
    """The ids of the servers among `rows` whose process has verifiably ended on this
    host without a clean stop (for `broker.server.liveness`)."""
    return frozenset(r.id for r in rows if not r.stopped_ms and r.proc
                     and has_ended(r.proc, proc, exists) is True)


def running_twin(rows: Iterable[ServerRow], server_id: str, proc: Path = PROC,
                 exists: Callable[[int], bool] = pid_alive,
                 me: str | None = None) -> ServerRow | None:
    """The row of another process on this host that runs as merge server `server_id`
    now, else None. Why: a second `server run` under the same id takes the same MQTT
    client id, and the broker then drops each of the two for the other, again and
    again, while both write the same liveness row. A server that stopped cleanly,
    crashed (its process ended) or runs on another host (this host cannot tell) is no
    twin; nor is this very process (an in-process restart, the demo)."""
    mine = this_process(proc) if me is None else me
    for row in rows:
        if (row.id == server_id and not row.stopped_ms and row.proc and row.proc != mine
                and has_ended(row.proc, proc, exists) is False):
            return row
    return None


def pid_of(identity: str) -> int | None:
    """The pid in a process identity (`waystation.processes`), else None."""
    parts = identity.split("/")
    return int(parts[2]) if len(parts) == 4 and parts[2].isdigit() else None


__all__ = ["ended_servers", "pid_of", "running_twin"]
