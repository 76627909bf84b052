"""The merge servers whose process has ended, as far as this host can tell
(`waystation.processes`), for the operator's `server status` (`broker.server.liveness`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from broker.server.store.rows import ServerRow
from waystation.processes import PROC, has_ended, pid_alive


def ended_servers(rows: Iterable[ServerRow], proc: Path = PROC,
                  exists: Callable[[int], bool] = pid_alive) -> frozenset[str]:
    """The ids of the servers among `rows` whose process has verifiably ended on this
    host without a clean stop (for `broker.server.liveness`)."""
    return frozenset(r.id for r in rows if not r.stopped_ms and r.proc
                     and has_ended(r.proc, proc, exists) is True)


__all__ = ["ended_servers"]
