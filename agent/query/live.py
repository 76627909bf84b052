"""Live queries: a query's first page, kept up to date from the store's feed.

    live = agent.live_query("tasks", where={"route": "route-42", "status": "out"},
                            order_by="eta")
    for update in live.updates(timeout=60):      # LiveUpdate: initial first, then diffs
        show(update.keys, update.entered, update.changed, update.left)
    live.close()

    sub = agent.subscribe(query, on_update)      # the same on a thread of its own
    sub.stop()

Every write to the store, from any process (an app, the sync daemon applying an ack, a
rejection, a delta, a catch-up page, a snapshot), appends feed events naming the records
it changed. `LiveQuery.poll` reads the events after its position and evaluates only the
records they name: when one of them is in the current result, or matches the query now,
the query runs again (one page through its index, in the same read snapshot as the feed
position) and the difference is returned. A wipe, a resync, or events pruned before they
were read make it run again unconditionally. Nothing is kept in memory but the current
page, which `limit` bounds.

`poll()` never blocks, so the HTTP API can drive it from its own loop (e.g. an SSE
stream) and the iterator and the thread below are thin loops around it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from agent.models import Record
from agent.query.errors import QueryError
from agent.query.logs import event
from agent.query.model import LiveUpdate, Query
from agent.query.service import Queries, view_matches
from agent.store import n_key, record_key

if TYPE_CHECKING:
    from agent.core import Core, Work

FEED_BATCH = 1000
"""Feed events read per poll (more are read by the next one)."""
_FULL_KINDS = frozenset({"reset", "wiped"})


class LiveQuery:
    """A query's first page and its changes (see the module docstring)."""

    def __init__(self, core: Core | Callable[[], Core], query: Query) -> None:
        if query.after is not None:
            raise QueryError("a live query follows the first page: leave out `after`")
        # The agent's current store: a remote wipe replaces it under a running query.
        if callable(core):
            self._current: Callable[[], Core] = core
        else:
            fixed = core
            self._current = lambda: fixed
        self._core = self._current()
        self._queries = Queries(self._core)
        self.query = query
        self._queries.spec(query.collection)
        self._closed = False
        self._rows: dict[str, Record] = {}
        self._keys: list[str] = []
        self._pos = 0
        self._initial: LiveUpdate | None = self._core.read(self._start)

    def _start(self, work: Work) -> LiveUpdate:
        self._pos = _feed_position(work)
        self._load(work)
        return LiveUpdate(self._pos, True, list(self._keys), list(self._rows.values()))

    def _load(self, work: Work) -> None:
        page = self._queries.page_in(work, self.query)
        self._rows = {r.key: r for r in page.records}
        self._keys = [r.key for r in page.records]

    @property
    def position(self) -> int:
        """The feed position the current result reflects."""
        return self._pos

    @property
    def records(self) -> list[Record]:
        """The current result, in order."""
        return [self._rows[k] for k in self._keys]

    def poll(self) -> LiveUpdate | None:
        """The first result (on the first call), then the next change of the result,
        if the feed shows one; None when nothing changed. Never blocks."""
        if self._closed:
            return None
        if self._initial is not None:
            first, self._initial = self._initial, None
            return first
        core = self._current()
        if core is not self._core:  # the store was replaced: its feed starts afresh
            self._core, self._queries = core, Queries(core)
        return core.read(self._step)

    def _step(self, work: Work) -> LiveUpdate | None:
        c = self.query.collection
        end = _feed_position(work)
        full = end < self._pos  # the store was re-created: its feed started again
        touched: set[str] = set()
        last = self._pos
        if not full:
            first = True
            for raw, doc in work.tx.items("feed", start=n_key(self._pos + 1)):
                seq = int.from_bytes(raw, "big")
                if first and seq > self._pos + 1:
                    full = True  # events were pruned before this query read them
                first = False
                last = seq
                ec, ek, kind = doc[0], doc[1], doc[2]  # [collection, key, kind, ...]
                if kind in _FULL_KINDS or ec == "":
                    full = True
                elif ec == c:
                    touched.add(ek)
                if seq - self._pos >= FEED_BATCH:
                    break
            if last == self._pos:
                return None
        if not full and not touched:
            self._pos = last
            return None
        if not full and not self._relevant(work, touched):
            self._pos = last
            return None
        self._pos = end if full else last
        return self._diff(work)

    def _relevant(self, work: Work, touched: set[str]) -> bool:
        """Whether a touched record is in the result, or belongs in it now."""
        if any(k in self._rows for k in touched):
            return True
        p = self._queries.plan(work, self.query)
        c = self.query.collection
        return any(view_matches(p, work.load_view(record_key(c, k), c, k)) for k in touched)

    def _diff(self, work: Work) -> LiveUpdate | None:
        old_rows, old_keys = self._rows, self._keys
        self._load(work)
        entered = [self._rows[k] for k in self._keys if k not in old_rows]
        changed = [self._rows[k] for k in self._keys
                   if k in old_rows and old_rows[k] != self._rows[k]]
        left = [k for k in old_keys if k not in self._rows]
        if not entered and not changed and not left and old_keys == self._keys:
            return None
        return LiveUpdate(self._pos, False, list(self._keys), entered, changed, left)

    def updates(self, timeout: float | None = None, *,
                poll_s: float = 0.05) -> Iterator[LiveUpdate]:
        """Yield the first result, then each change, polling every `poll_s` seconds
        until `timeout` seconds have passed (None: until `close()`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed:
            update = self.poll()
            if update is not None:
                yield update
                continue
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                time.sleep(min(poll_s, left))
            else:
                time.sleep(poll_s)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> LiveQuery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Subscription:
    """A live query followed on a thread of its own; `callback` gets every update
    (the first result first). `stop()` ends it; an error ends it too and is kept in
    `error` (e.g. the index the query needs was removed from the schema)."""

    def __init__(self, live: LiveQuery, callback: Callable[[LiveUpdate], None], *,
                 poll_s: float = 0.05) -> None:
        self.live = live
        self.error: BaseException | None = None
        self._callback = callback
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="waystation-live-query",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                update = self.live.poll()
                if update is not None:
                    self._callback(update)
                    continue
                self._stop.wait(self._poll_s)
        except BaseException as exc:  # kept for the owner; the thread ends
            self.error = exc
            event("warning", "live_query_stopped", collection=self.live.query.collection,
                  error=str(exc))

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.live.close()
        if threading.current_thread() is not self._thread:
            with contextlib.suppress(RuntimeError):
                self._thread.join(timeout)


def _feed_position(work: Work) -> int:
    return int(work.tx.meta("ctr", [1, 0, 0, 0])[3])


__all__ = ["LiveQuery", "Subscription"]
