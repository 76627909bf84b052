"""Group commit (agent.groupcommit, Store.write): concurrent writers share one durable
commit, each write stays all-or-nothing on its own, a lone write never waits, and a
kill -9 in the middle of groups loses no write that returned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.api import Agent
from agent.groupcommit import GroupCommit, Job
from agent.store import Store, Tx
from schemas.collection import Catalog
from tests.agent.agentkit import make_cfg
from tests.helpers import wait_until

WRITER = Path(__file__).with_name("agent_writer.py")


# ------------------------------------------------------------ the coordination alone


class FakeStore:
    """A run_group that records its groups; each job's fn gets the group's list."""

    def __init__(self, hold: float = 0.0) -> None:
        self.groups: list[list[Job]] = []
        self.flushes = 0
        self.hold = hold
        self.running = 0
        self.overlap = False
        self.lock = threading.Lock()

    def run_group(self, jobs: list[Job]) -> Callable[[], None] | None:
        with self.lock:
            self.running += 1
            self.overlap |= self.running > 1
        try:
            self.groups.append(list(jobs))
            for job in jobs:
                try:
                    job.result = job.fn(jobs)
                except Exception as exc:
                    job.error = exc
            time.sleep(self.hold)
        finally:
            with self.lock:
                self.running -= 1
        return self.flush if any(j.durable for j in jobs) else None

    def flush(self) -> None:
        self.flushes += 1


@settings(max_examples=25, deadline=None)
@given(threads=st.integers(1, 6), per=st.integers(1, 15),
       fail=st.sets(st.integers(0, 89), max_size=10))
def test_every_write_runs_once_and_gets_its_own_outcome(threads: int, per: int,
                                                         fail: set[int]) -> None:
    store = FakeStore(hold=0.0005)
    gc = GroupCommit(store.run_group)
    outcomes: dict[int, Any] = {}

    def writer(t: int) -> None:
        for i in range(per):
            ident = t * per + i

            def fn(group: list[Job], ident: int = ident) -> int:
                if ident in fail:
                    raise ValueError(ident)
                return ident

            try:
                outcomes[ident] = gc.submit(fn, durable=True)
            except ValueError as exc:
                outcomes[ident] = exc

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    total = threads * per
    assert len(outcomes) == total
    for ident, got in outcomes.items():
        if ident in fail:
            assert isinstance(got, ValueError) and got.args == (ident,)
        else:
            assert got == ident
    ran = [job for group in store.groups for job in group]
    assert len(ran) == total, "every write ran in exactly one group"
    assert len({id(job) for job in ran}) == total
    assert not store.overlap, "one group at a time runs its transaction"
    assert gc.stats.writes == total and gc.stats.groups == len(store.groups)


def test_writes_that_arrive_during_a_commit_share_the_next_one() -> None:
    release = threading.Event()
    store = FakeStore()
    gc = GroupCommit(store.run_group)
    first = threading.Thread(target=gc.submit, args=(lambda g: release.wait(10), True))
    first.start()
    wait_until(lambda: store.groups, message="the first write runs alone, at once")
    results: list[int] = []
    others = [threading.Thread(target=lambda i=i: results.append(gc.submit(lambda g, i=i: i,
                                                                           True)))
              for i in range(3)]
    for w in others:
        w.start()
    wait_until(lambda: len(gc._queue) == 3, message="three writes queued")
    release.set()
    first.join(10)
    for w in others:
        w.join(10)
    assert sorted(results) == [0, 1, 2]
    assert [len(g) for g in store.groups] == [1, 3]
    assert store.flushes == 2


def test_a_lone_write_runs_at_once_in_its_own_thread() -> None:
    store = FakeStore()
    gc = GroupCommit(store.run_group)
    for _ in range(5):
        assert gc.submit(lambda g: threading.current_thread(), durable=False) \
            is threading.current_thread()
    assert [len(g) for g in store.groups] == [1] * 5
    assert store.flushes == 0, "replayable writes are not flushed"


def test_a_failing_commit_fails_every_write_of_the_group() -> None:
    def broken(jobs: list[Job]) -> None:
        raise OSError("disk on fire")

    gc = GroupCommit(broken)
    with pytest.raises(OSError, match="disk on fire"):
        gc.submit(lambda tx: 1, durable=True)
    # the lead was handed back: the next write runs (and fails) instead of hanging
    with pytest.raises(OSError):
        gc.submit(lambda tx: 1, durable=True)


def test_a_failing_flush_fails_the_durable_writes() -> None:
    def run(jobs: list[Job]) -> Callable[[], None]:
        for job in jobs:
            job.result = 1

        def flush() -> None:
            raise OSError("flush failed")

        return flush

    gc = GroupCommit(run)
    with pytest.raises(OSError, match="flush failed"):
        gc.submit(lambda tx: 1, durable=True)


# ------------------------------------------------------------------ on a real store


def _hold_lead(ag: Agent, release: threading.Event) -> threading.Thread:
    """A put whose transaction waits for `release`: the writes that come meanwhile
    queue for the next group."""
    started = threading.Event()

    def slow(tx: Tx) -> None:
        started.set()
        release.wait(10)
        tx.set_meta("probe", 1)

    th = threading.Thread(target=ag.store.write, args=(slow,))
    th.start()
    assert started.wait(10)
    return th


def test_concurrent_puts_share_a_commit_and_stay_gapless(tmp_path: Path,
                                                         catalog: Catalog) -> None:
    with Agent.open(make_cfg(tmp_path / "d"), catalog) as ag:
        release = threading.Event()
        holder = _hold_lead(ag, release)
        got: dict[str, int] = {}
        writers = [threading.Thread(target=lambda i=i: got.__setitem__(
            f"t-{i}", ag.put("tasks", f"t-{i}", {"route": "route-42", "notes": str(i)}).n))
            for i in range(4)]
        for w in writers:
            w.start()
        wait_until(lambda: len(ag.store._group._queue) == 4, message="four puts queued")
        release.set()
        holder.join(10)
        for w in writers:
            w.join(10)
        assert ag.store.group_stats.largest == 4
        assert sorted(got.values()) == [1, 2, 3, 4]
        entries = ag.pending()
        assert sorted(e["ch"]["n"] for e in entries) == [1, 2, 3, 4]
        for key, n in got.items():
            rec = ag.get("tasks", key)
            assert rec is not None and rec.pending == 1
            assert {e["ch"]["k"]: e["ch"]["n"] for e in entries}[key] == n
        assert len(ag.feed_after(0)) == 4


def test_a_write_that_fails_in_a_group_leaves_the_others(tmp_path: Path,
                                                         catalog: Catalog) -> None:
    with Agent.open(make_cfg(tmp_path / "d"), catalog) as ag:
        release = threading.Event()
        holder = _hold_lead(ag, release)
        errors: list[BaseException] = []

        def bad(tx: Tx) -> None:
            tx.set_meta("half", 1)  # written, then undone with its nested transaction
            raise ValueError("refused")

        def run_bad() -> None:
            try:
                ag.store.write(bad)
            except ValueError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=ag.put, args=("tasks", "ok-1",
                                                         {"route": "route-42"})),
                   threading.Thread(target=run_bad),
                   threading.Thread(target=ag.put, args=("tasks", "ok-2",
                                                         {"route": "route-42"}))]
        threads[0].start()
        wait_until(lambda: len(ag.store._group._queue) == 1)
        threads[1].start()
        wait_until(lambda: len(ag.store._group._queue) == 2)
        threads[2].start()
        wait_until(lambda: len(ag.store._group._queue) == 3)
        release.set()
        for th in (holder, *threads):
            th.join(10)
        assert ag.store.group_stats.largest == 3
        assert [str(e) for e in errors] == ["refused"]
        assert ag.store.read(lambda tx: tx.meta("half")) is None
        assert ag.get("tasks", "ok-1") is not None and ag.get("tasks", "ok-2") is not None
        assert [e["ch"]["n"] for e in ag.pending()] == [1, 2], "gapless: nothing lost a number"


def test_a_group_grows_the_map_and_runs_again(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s", map_size_mb=1, max_map_size_mb=64)
    try:
        release = threading.Event()
        started = threading.Event()

        def slow(tx: Tx) -> None:
            started.set()
            release.wait(10)

        holder = threading.Thread(target=store.write, args=(slow,))
        holder.start()
        assert started.wait(10)
        big = b"x" * 200_000
        calls: list[int] = []

        def fill(i: int) -> Callable[[Tx], int]:
            def fn(tx: Tx) -> int:
                calls.append(i)
                for j in range(4):
                    tx.put_raw("index", f"{i}-{j}".encode(), big)
                return i
            return fn

        results: list[int] = []
        ws = [threading.Thread(target=lambda i=i: results.append(store.write(fill(i))))
              for i in range(3)]
        for w in ws:
            w.start()
        wait_until(lambda: len(store._group._queue) == 3)
        release.set()
        for th in (holder, *ws):
            th.join(30)
        assert sorted(results) == [0, 1, 2]
        assert len(calls) > 3, "the group ran again after the map grew"
        assert store.map_size() > 1 << 20
        assert store.read(lambda tx: tx.count("index")) == 12
    finally:
        store.close()


def test_nested_write_from_inside_a_write_is_refused(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")
    try:
        with pytest.raises(RuntimeError, match="nested"):
            store.write(lambda tx: store.write(lambda inner: None))
        assert store.write(lambda tx: 7) == 7, "the store still works"
    finally:
        store.close()


def test_kill_9_in_the_middle_of_groups_loses_no_returned_write(tmp_path: Path,
                                                                catalog: Catalog) -> None:
    """4 threads writing at once (their puts grouped), the process killed with SIGKILL:
    every change number a thread saw returned is stored, and n stays gapless."""
    printed: list[int] = []
    grouped = 0
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, str(WRITER), str(tmp_path), f"r{round_}", "0",
                                 "--threads", "4"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        mine: list[int] = []
        while len(mine) < 150 + 41 * round_:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "writer died"
            n, largest = (int(x) for x in line.split())
            mine.append(n)
            grouped = max(grouped, largest)
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
        mine += [int(line.split()[0]) for line in rest.splitlines() if line.strip()]
        assert proc.returncode == -signal.SIGKILL
        printed += mine
        with Agent.open(make_cfg(tmp_path), catalog) as ag:
            entries = ag.pending()
            numbers = [e["ch"]["n"] for e in entries]
            assert numbers == list(range(1, len(numbers) + 1)), "gapless after the crash"
            assert set(printed) <= set(numbers), "a write that returned was lost"
            by_n = {e["ch"]["n"]: e["ch"]["k"] for e in entries}
            for n in mine:
                record = ag.get("tasks", by_n[n])
                assert record is not None and record.pending == 1
    assert grouped > 1, "the writers' puts were grouped (else this tests nothing new)"
