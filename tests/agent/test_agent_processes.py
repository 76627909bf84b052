"""Several processes on one store: gapless n, monotonic stamps, kill -9, cross-process watch."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.api import Agent
from schemas.collection import Catalog
from tests.agent.agentkit import make_cfg
from waystation.hlc import Stamp

WRITER = Path(__file__).with_name("agent_writer.py")


def start_writer(data_dir: Path, prefix: str, count: int, go: Path | None = None,
                 ) -> subprocess.Popen[str]:
    args = [sys.executable, str(WRITER), str(data_dir), prefix, str(count)]
    if go is not None:
        args += ["--go", str(go)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"writer did not start: {line!r} {err}")
    return proc


def test_two_processes_writing_at_once_get_gapless_n(tmp_path: Path, catalog: Catalog) -> None:
    """2 processes x 200 writes: n is exactly 1..400 and stamps increase with n."""
    go = tmp_path / "go"
    writers = [start_writer(tmp_path, name, 200, go) for name in ("a", "b")]
    go.touch()
    printed: list[list[int]] = []
    for proc in writers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        printed.append([int(line) for line in out.split()])
    assert sorted(printed[0] + printed[1]) == list(range(1, 401))
    for ns in printed:
        assert ns == sorted(ns)
    assert printed[0] and printed[1]
    with Agent.open(make_cfg(tmp_path), catalog) as ag:
        entries = ag.pending()
        assert [e["ch"]["n"] for e in entries] == list(range(1, 401))
        stamps = [Stamp.from_time_part(e["ch"]["h"], "van-1") for e in entries]
        assert all(a < b for a, b in itertools.pairwise(stamps))
        assert len(ag.list("tasks")) == 400
        assert ag.status().pending == 400


def test_kill_9_loses_nothing_that_returned(tmp_path: Path, catalog: Catalog) -> None:
    """A writer killed with SIGKILL mid-stream: every n it printed is in outbox and view."""
    total_printed: list[int] = []
    for round_ in range(3):
        proc = start_writer(tmp_path, f"r{round_}", 0)
        assert proc.stdout is not None
        mine: list[int] = []
        while len(mine) < 60 + 37 * round_:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "writer died"
            mine.append(int(line))
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
        mine += [int(line) for line in rest.split()]
        assert proc.returncode == -signal.SIGKILL
        total_printed += mine
        with Agent.open(make_cfg(tmp_path), catalog) as ag:
            numbers = [e["ch"]["n"] for e in ag.pending()]
            assert numbers == list(range(1, len(numbers) + 1)), "gapless after the crash"
            assert set(total_printed) <= set(numbers)
            by_n = {e["ch"]["n"]: e["ch"]["k"] for e in ag.pending()}
            for n in mine:
                record = ag.get("tasks", by_n[n])
                assert record is not None and record.pending == 1
            assert ag.status().pending == len(numbers)


def test_watch_sees_writes_of_another_process(tmp_path: Path, catalog: Catalog) -> None:
    """watch in one process yields the writes another process makes."""
    with Agent.open(make_cfg(tmp_path), catalog) as ag:
        since = ag.feed_position()
        proc = start_writer(tmp_path, "w", 5)
        seen: list[str] = []
        deadline = time.monotonic() + 60
        for event in ag.watch("tasks", since=since, timeout=60):
            seen.append(event.key)
            if len(seen) == 5 or time.monotonic() > deadline:
                break
        proc.communicate(timeout=30)
        assert seen == [f"w-{i}" for i in range(5)]
