"""`Agent.fetch` (a mixin of `agent.api.Agent`): bring records back from the server.

    result = agent.fetch("tasks", ["t-1", "t-2"], wait_s=10)
    result.records      # the records held now (fetched, or held already)
    result.waiting      # keys asked for and not answered yet (offline: they stay queued)
    result.missing      # keys the server does not hold for this device

Records evicted by retention (`agent.evict`) come back whole; so may records this
device never held, if they are in its scopes. The request is queued durably
(`agent.fetching`) and sent by the sync daemon as soon as it is connected to a server
that speaks the `fetch` capability (PROTOCOL.md §7.14), however long that takes;
`wait_s` only says how long this call waits for the answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agent import fetching, validate
from agent.core import Work
from agent.errors import BadRequest, WriteRefused
from agent.models import Record
from agent.store import record_key
from schemas.wire import MAX_FETCH_KEYS

T = TypeVar("T")
_POLL_S = 0.05


@dataclass(frozen=True)
class FetchResult:
    """What `Agent.fetch` found (see the module docstring)."""

    collection: str
    records: list[Record] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"collection": self.collection,
                "records": [r.to_dict() for r in self.records],
                "waiting": list(self.waiting), "missing": list(self.missing)}


class AgentFetch:
    """Provides `fetch` to `Agent` (which provides the rest)."""

    _commit: Callable[[Callable[[Work], Any]], Any]
    _read: Callable[[Callable[[Work], Any]], Any]
    _poke: Callable[..., None]
    get: Callable[..., Record | None]
    catalog: Any

    def fetch(self, collection: str, keys: Sequence[str], *,
              wait_s: float = 0.0) -> FetchResult:
        """Ask the server for these records (at most `MAX_FETCH_KEYS` keys) unless this
        device holds them, and wait up to `wait_s` seconds for the answer."""
        try:
            spec = validate.collection(self.catalog, collection)
            wanted = [validate.record_key(spec, k) for k in dict.fromkeys(keys)]
        except WriteRefused as exc:
            raise BadRequest(exc.code, str(exc)) from None
        if not wanted:
            raise BadRequest("invalid", "fetch needs at least one key")
        if len(wanted) > MAX_FETCH_KEYS:
            raise BadRequest("too_many", f"fetch takes at most {MAX_FETCH_KEYS} keys at a "
                                         f"time, got {len(wanted)}")
        if not (0 <= wait_s <= 300):
            raise BadRequest("invalid", "wait_s must be between 0 and 300 seconds")
        name = spec.name

        def ask(work: Work) -> int:
            absent = [record_key(name, k) for k in wanted
                      if not work.tx.has("view", record_key(name, k))]
            return fetching.enqueue(work, absent) if absent else 0

        if self._commit(ask):
            self._poke()
        deadline = time.monotonic() + wait_s
        while True:
            queued = self._read(lambda work: [k for k in wanted if work.tx.has(
                fetching.DB, record_key(name, k))])
            if not queued or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        records: list[Record] = []
        missing: list[str] = []
        for k in wanted:
            if k in queued:
                continue
            rec = self.get(name, k, include_deleted=True)
            if rec is None:
                missing.append(k)
            else:
                records.append(rec)
        return FetchResult(name, records, queued, missing)

    def evicted_keys(self, collection: str) -> list[str]:
        """Keys of the collection's records that retention evicted from this device (the
        server still holds them; `fetch` brings them back)."""
        try:
            spec = validate.collection(self.catalog, collection)
        except WriteRefused as exc:
            raise BadRequest(exc.code, str(exc)) from None
        prefix = spec.name.encode() + b"\0"

        def run(work: Work) -> list[str]:
            return [raw[len(prefix):].decode() for raw in work.tx.keys("evicted", prefix)]

        keys: list[str] = self._read(run)
        return keys


__all__ = ["AgentFetch", "FetchResult"]
