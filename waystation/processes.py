"""Which process wrote something (a merge server its liveness row, an agent its
heartbeat), so that a reader on the same host can tell at once whether that process has
ended, instead of waiting for what it wrote to go stale.

Why: a server killed or crashed stops writing its liveness row, and `server status` can
only call it gone once the row is `STALE_AFTER_S` (30 s) old; an operator who has just
seen it die and asks reads "running". On the server's own host the kernel knows better.

The identity is ``boot/pidns/pid/start``: the kernel's boot id (a reboot ends every
process), the PID namespace (a CLI in another container sees other processes under the
same numbers), the pid, and the process's start time in clock ticks since boot (a pid
reused by a later process has another). A CLI whose boot id or PID namespace differ
cannot tell, and leaves the verdict to the liveness row.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

PROC = Path("/proc")
_MAX_PID = 1 << 22
"""Linux's pid_max limit; a larger number in a row is not a pid of this kernel."""
_mine: dict[int, str] = {}


def this_process(proc: Path = PROC) -> str:
    """This process's identity, or "" where /proc does not tell (not Linux). Cached
    per pid: a forked child asks again."""
    pid = os.getpid()
    if proc == PROC and pid in _mine:
        return _mine[pid]
    here = _host(proc)
    start = _start_time(proc, pid)
    identity = "" if here is None or start is None else f"{here}/{pid}/{start[1]}"
    if proc == PROC:
        _mine.clear()
        _mine[pid] = identity
    return identity


def pid_alive(pid: int) -> bool:
    """Whether a process (or zombie) `pid` exists in this PID namespace. Asked of the
    kernel, not of /proc: a /proc mounted with `hidepid`, or a `ProtectProc=invisible`
    unit, hides other users' processes, and hidden is not ended."""
    if pid <= 0:
        return False  # kill(0 or -n, 0) would ask about a whole process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def has_ended(identity: str, proc: Path = PROC,
              exists: Callable[[int], bool] = pid_alive) -> bool | None:
    """True when the process `identity` names ran on this host and has ended; False when
    it still runs; None when this host cannot tell (another host, container or boot,
    no identity, or one it cannot read)."""
    parts = identity.split("/")
    here = _host(proc)
    if len(parts) != 4 or here is None or "/".join(parts[:2]) != here:
        return None
    pid_text, start_text = parts[2], parts[3]
    if not (pid_text.isdigit() and start_text.isdigit()) or not 0 < int(pid_text) < _MAX_PID:
        return None
    if not exists(int(pid_text)):
        return True
    now = _start_time(proc, int(pid_text))
    if now is None:
        return None  # it exists, but its /proc entry is hidden from us
    state, start = now
    # A zombie (killed, not yet reaped by its parent) has ended too; a pid with another
    # start time is a later process that was given the same number.
    return state in {"Z", "X", "x"} or start != start_text


def _host(proc: Path) -> str | None:
    """``boot/pidns`` of this process's view of the machine, or None."""
    try:
        boot = (proc / "sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink(proc / "self/ns/pid")
    except OSError:
        return None
    ns_id = "".join(c for c in ns if c.isdigit())
    if not boot or "/" in boot or not ns_id:
        return None
    return f"{boot}/{ns_id}"


def _start_time(proc: Path, pid: int) -> tuple[str, str] | None:
    """(state, start time in ticks since boot) of process `pid`, or None if none runs."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ... starttime ...": comm may hold spaces and parentheses,
    # so the fields are counted after its last ")"; starttime is field 22.
    rest = stat.rpartition(")")[2].split()
    if len(rest) < 20 or not rest[19].isdigit():
        return None
    return rest[0], rest[19]


__all__ = ["PROC", "has_ended", "pid_alive", "this_process"]
