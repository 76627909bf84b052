"""`waystation.processes`: which process a merge server (or an agent) is, and whether it
has ended, as far as this host can tell (on a fake /proc for every case, and on the real
one with a real child process killed by SIGKILL)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.server.process_identity import ended_servers, pid_of, running_twin
from broker.server.store.rows import ServerRow
from waystation.processes import has_ended, pid_alive, this_process
from waystation.processes import has_ended as verdict

BOOT = "0b7e1c6a-5d4f-4e3a-9c2b-1a2b3c4d5e6f"
NS = "pid:[4026531836]"


def fake_proc(root: Path, procs: dict[int, tuple[str, str]], *, boot: str = BOOT,
              ns: str = NS) -> Path:
    """A /proc with a boot id, this process's PID namespace and `procs` pid -> (state,
    start ticks)."""
    (root / "sys/kernel/random").mkdir(parents=True)
    (root / "sys/kernel/random/boot_id").write_text(boot + "\n")
    (root / "self/ns").mkdir(parents=True)
    (root / "self/ns/pid").symlink_to(ns)
    for pid, (state, start) in procs.items():
        (root / str(pid)).mkdir()
        # a comm with spaces and a ")" of its own, as a hostile process name can be
        rest = [state] + ["0"] * 18 + [start] + ["0"] * 30
        (root / str(pid) / "stat").write_text(f"{pid} (way station) x) " + " ".join(rest))
    return root


def listed(proc: Path) -> Callable[[int], bool]:
    """The fake /proc's processes as the kernel's answer to "does pid exist?"."""
    return lambda pid: (proc / str(pid)).is_dir()


def ident(pid: int, start: str, boot: str = BOOT, ns: str = "4026531836") -> str:
    return f"{boot}/{ns}/{pid}/{start}"


def test_verdicts_on_a_fake_proc(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {100: ("S", "5000"), 101: ("Z", "6000"), 102: ("R", "7000")})

    def has_ended(identity: str, exists: Callable[[int], bool] | None = None) -> bool | None:
        return verdict(identity, proc, exists or listed(proc))

    assert has_ended(ident(100, "5000")) is False          # runs
    assert has_ended(ident(102, "7000")) is False
    assert has_ended(ident(103, "5000")) is True           # no such process
    assert has_ended(ident(101, "6000")) is True           # a zombie has ended
    assert has_ended(ident(100, "4999")) is True           # pid reused by another
    # hidden from us (hidepid, ProtectProc=invisible) is not ended: cannot tell
    assert has_ended(ident(104, "5000"), exists=lambda pid: True) is None
    # this host cannot tell: another boot, another PID namespace (a container), no
    # identity, or one that does not parse
    assert has_ended(ident(103, "5000", boot="another-boot")) is None
    assert has_ended(ident(103, "5000", ns="4026532000")) is None
    for bad in ["", "x", f"{BOOT}/4026531836/../etc/5000", f"{BOOT}/4026531836/0/5",
                f"{BOOT}/4026531836/-1/5", f"{BOOT}/4026531836/99999999999/5",
                f"{BOOT}/4026531836/100/5000/extra", f"{BOOT}/4026531836/100/ 5000"]:
        assert has_ended(bad) is None, bad


def test_pid_alive_asks_the_kernel_and_never_about_a_group() -> None:
    assert pid_alive(os.getpid())
    assert not pid_alive(0) and not pid_alive(-1)  # kill(0, 0) would be a process group


def test_no_proc_cannot_tell(tmp_path: Path) -> None:
    assert this_process(tmp_path) == ""
    assert has_ended(ident(1, "1"), tmp_path) is None


@given(st.text(max_size=80))
def test_any_identity_string_gets_a_verdict_or_none(text: str) -> None:
    """Whatever a store holds (a row is data, an old or damaged one too), never raises."""
    assert has_ended(text) in (True, False, None)


def test_ended_servers_names_only_unclean_ends_it_can_verify(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {100: ("S", "5000")})
    rows = [ServerRow("alive", "g", "v", 1, 2, proc=ident(100, "5000")),
            ServerRow("killed", "g", "v", 1, 2, proc=ident(101, "5000")),
            ServerRow("stopped", "g", "v", 1, 2, stopped_ms=2, proc=ident(101, "5000")),
            ServerRow("elsewhere", "g", "v", 1, 2, proc=ident(101, "5000", boot="b")),
            ServerRow("old-release", "g", "v", 1, 2)]
    assert ended_servers(rows, proc, listed(proc)) == frozenset({"killed"})


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_real_process_runs_then_is_killed() -> None:
    assert has_ended(this_process()) is False
    child = subprocess.Popen(
        [sys.executable, "-c", "from waystation.processes import this_process;"
         "import sys,time; print(this_process(), flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert child.stdout is not None
        identity = child.stdout.readline().strip()
        assert identity.split("/")[2] == str(child.pid)
        assert has_ended(identity) is False
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        assert has_ended(identity) is True
    finally:
        child.kill()
        child.wait(10)


def test_running_twin_is_only_a_live_other_process_of_that_id(tmp_path: Path) -> None:
    """The row `server run` refuses to start over: same id, not stopped, its process
    alive on this host and not this very one."""
    proc = fake_proc(tmp_path, {100: ("S", "5000"), 102: ("S", "7000")})
    alive = ServerRow("server-1", "g", "v", 1, 2, proc=ident(100, "5000"))
    assert running_twin([alive], "server-1", proc, listed(proc), me="x") == alive
    assert running_twin([alive], "server-2", proc, listed(proc), me="x") is None
    assert running_twin([alive], "server-1", proc, listed(proc),
                        me=ident(100, "5000")) is None  # this process itself
    for row in (dataclasses.replace(alive, stopped_ms=2),  # stopped cleanly
                dataclasses.replace(alive, proc=ident(101, "5000")),  # crashed
                dataclasses.replace(alive, proc=ident(102, "5000")),  # pid reused
                dataclasses.replace(alive, proc=ident(100, "5000", boot="b")),  # elsewhere
                dataclasses.replace(alive, proc="")):  # an earlier release
        assert running_twin([row], "server-1", proc, listed(proc), me="x") is None
    assert pid_of(alive.proc) == 100 and pid_of("") is None
