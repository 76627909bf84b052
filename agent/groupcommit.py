"""Group commit: writes of several threads that arrive together share one durable commit.

A durable commit costs two flushes to disk (agent.store: the data pages, then the meta
page), whatever it holds, and LMDB lets one write transaction run at a time. So while a
commit is under way, the writes that arrive queue up, and the next one to run takes
every write queued and runs them all in ONE LMDB transaction, each inside a nested
transaction of its own (an error, or a `fn` that raises, undoes that write alone), then
commits and flushes once for all of them. A write that arrives while nothing runs starts
at once: no write ever waits for company.

Who runs a group: the first writer to find nobody running becomes the *leader*; it takes
the queue, runs the group, and on its way out hands the lead to the oldest write that
queued meanwhile (which then runs the next group in its own thread). The leader lets the
next group begin before its own flush: the two flushes overlap on the disk instead of
taking turns. Every caller returns only once the commit holding its write was flushed
(when durable), so "a write that returned is durable" holds for each of them; nothing is
ever acknowledged from a group that failed to commit.

Pure coordination: the LMDB work is the `run_group` callable the store passes in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, eq=False)
class Job:
    """One caller's write: its function, whether it must be flushed, and its outcome."""

    fn: Callable[[Any], Any]
    durable: bool
    result: Any = None
    error: BaseException | None = None
    lead: bool = False
    """Set by the previous leader: this job's thread runs the next group."""
    done: threading.Event | None = None
    """Only a job that queued behind a running group waits (a lone write makes no
    Event: it runs its own group and is done when that returns)."""

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class GroupStats:
    """Counters for tests and benchmarks."""

    groups: int = 0
    writes: int = 0
    largest: int = 0


RunGroup = Callable[[list[Job]], Callable[[], None] | None]
"""Runs a group's writes in one transaction and commits, setting each job's result or
error; returns the flush to run after the lead was handed on (None: nothing to flush).
It must set an error on every job if the commit failed."""


class GroupCommit:
    """The queue and the lead of one store's writers (one instance per open store)."""

    def __init__(self, run_group: RunGroup, *, max_group: int = 256) -> None:
        self._run_group = run_group
        self._max_group = max_group
        self._lock = threading.Lock()
        self._queue: list[Job] = []
        self._leading = False
        self.stats = GroupStats()

    def submit(self, fn: Callable[[Any], Any], durable: bool) -> Any:
        """Run `fn(tx)` in a durable (or, `durable=False`, a replayable) commit and return
        its result, or raise what it raised (or the commit's error)."""
        job = Job(fn, durable)
        with self._lock:
            self._queue.append(job)
            lead = not self._leading
            if lead:
                self._leading = True
            else:
                job.done = threading.Event()
        if not lead:
            assert job.done is not None
            job.done.wait()
            if not job.lead:
                return job.outcome()
        # A leader's job is the first of its group (the queue is empty whenever nobody
        # leads, and the lead is handed to the oldest job queued): done when _lead is.
        self._lead()
        return job.outcome()

    def _lead(self) -> None:
        with self._lock:
            batch = self._queue[: self._max_group]
            del self._queue[: self._max_group]
        flush: Callable[[], None] | None = None
        self.stats.groups += 1  # only the leader counts: leaders run one at a time here
        self.stats.writes += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        try:
            flush = self._run_group(batch)
        except BaseException as exc:
            for job in batch:
                if job.error is None:
                    job.error = exc
            flush = None
        finally:
            self._hand_over()
        if flush is not None:
            try:
                flush()
            except BaseException as exc:
                for job in batch:
                    if job.durable:
                        job.error = exc
        for job in batch:
            if job.done is not None:
                job.done.set()

    def _hand_over(self) -> None:
        with self._lock:
            if self._queue:
                nxt = self._queue[0]
                nxt.lead = True
                assert nxt.done is not None  # it queued behind this group
                nxt.done.set()
            else:
                self._leading = False


__all__ = ["GroupCommit", "GroupStats", "Job", "RunGroup"]
