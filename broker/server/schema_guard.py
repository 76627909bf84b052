"""Merges, catch-ups and fetches run under the schema version live when they commit or
read (issue 10 §1): the window after `schema publish` / `rollback` closed.

The engine loads the registry, and the schema history with it, at a registry
generation. `schema publish` and `rollback` bump that generation in the transaction that
rewrites the stored records. So:

- a merge transaction reads the generation first, under the schema lock
  (`WriteTxn.guard_schema`: a shared PostgreSQL advisory lock that publish and rollback
  take exclusively; LMDB's single writer), and `check` aborts it when the generation
  moved; `transact_live` then reloads and runs it again: no group commits under a
  version that is no longer live, and no publish rewrites records under a merge in
  flight;
- a catch-up or fetch reads the generation in the same snapshot as the records
  (`catchup.answer_all(generation=...)`); `answer_live` reloads and reads again when it
  moved, so the down-projection for older devices matches the names read.

Deltas fanned out and acks come from the merge transaction itself, so they share its
version; notices (operator resolutions) are rewritten by the publish and drained only
from a snapshot at the loaded generation (`periodic.drain_notices`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

import structlog

from broker.errors import StoreError
from broker.server import catchup
from broker.server.messages import Compression, error_message
from broker.server.registry import RegistryMoved
from broker.server.store.base import DeviceRow, Store, WriteTxn
from schemas import codec
from schemas.wire import Catchup, Fetch

log = structlog.get_logger(__name__)
T = TypeVar("T")

SCHEMA_REDOS = 5
"""Times a group (or a catch-up read) runs again after finding the registry moved
under it before its messages are answered with a transient `server_error` (each run
follows a publish, rollback or registry change that committed meanwhile)."""


def check(txn: WriteTxn, loaded: int) -> None:
    """First thing in a merge transaction: `RegistryMoved` unless the store's
    generation is still `loaded` (and then stays so until this transaction commits)."""
    gen = txn.guard_schema()
    if gen != loaded:
        raise RegistryMoved(f"registry generation {gen}, loaded {loaded}")


def transact_live(store: Store, fn: Callable[[WriteTxn], T], reload: Callable[[], object],
                  counters: Counter[str]) -> T:
    """`store.transact(fn)`, reloading (`reload`) and running it again while `fn` finds
    the registry moved (`check`)."""
    for _ in range(SCHEMA_REDOS):
        try:
            return store.transact(fn)
        except RegistryMoved:
            counters["schema_redos"] += 1
            log.info("registry_moved_redo")
            reload()
    raise StoreError(f"the registry (or the schema) changed {SCHEMA_REDOS} times while "
                     "merging one group; the devices send their changes again")


def answer_live(store: Store, reqs: Sequence[tuple[DeviceRow, Catchup | Fetch]],
                compress_over: Callable[[str], Compression], generation: Callable[[], int],
                reload: Callable[[], object], counters: Counter[str]
                ) -> tuple[list[tuple[str, bytes]], int]:
    """`catchup.answer_all` from a snapshot at the loaded generation (reloading first
    when a publish committed since)."""
    for _ in range(SCHEMA_REDOS):
        try:
            return catchup.answer_all(store, reqs, compress_over, generation=generation())
        except RegistryMoved:
            counters["schema_redos"] += 1
            try:
                reload()
            except StoreError:
                log.exception("registry_refresh_failed")
    return [(device.id, error_message(codec.SERVER_ERROR, "the schema changed while "
                                      "answering; ask again later")) for device, _ in reqs], 0


__all__ = ["SCHEMA_REDOS", "answer_live", "check", "transact_live"]
