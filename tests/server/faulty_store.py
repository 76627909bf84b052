"""Fault injection at the store boundary: a real store that fails on chosen calls.

`FaultyStore(store)` passes every call through to the real store, except that the calls
of `transact` / `read` named in `fail_transact` / `fail_read` (1-based counts of that
method's calls, or a predicate) raise the given exception *instead of* reaching the
store, the way a store whose disk or connection just failed does: nothing of that call
is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from broker.errors import StoreError
from broker.server.store.base import ReadTxn, Store, StoreInfo, WriteTxn

T = TypeVar("T")


class FaultyStore:
    """A Store proxy failing the chosen calls (see the module docstring)."""

    def __init__(self, store: Store) -> None:
        self.inner = store
        self.kind = store.kind
        self.transacts = 0
        self.reads = 0
        self.fail_transact: Callable[[int], BaseException | None] = lambda _n: None
        self.fail_read: Callable[[int], BaseException | None] = lambda _n: None
        self.injected = 0

    def fail_transacts(self, calls: set[int] | None, exc: BaseException | None = None) -> None:
        """Fail these transact calls (counted from the next one, 1-based); None: all."""
        start = self.transacts
        err = exc if exc is not None else StoreError("injected: disk gone")
        self.fail_transact = lambda n: err if calls is None or n - start in calls else None

    def fail_reads(self, calls: set[int] | None, exc: BaseException | None = None) -> None:
        """Fail these read calls (counted from the next one, 1-based); None: all."""
        start = self.reads
        err = exc if exc is not None else StoreError("injected: disk gone")
        self.fail_read = lambda n: err if calls is None or n - start in calls else None

    def heal(self) -> None:
        self.fail_transact = lambda _n: None
        self.fail_read = lambda _n: None

    def transact(self, fn: Callable[[WriteTxn], T]) -> T:
        self.transacts += 1
        err = self.fail_transact(self.transacts)
        if err is not None:
            self.injected += 1
            raise err
        return self.inner.transact(fn)

    def read(self) -> AbstractContextManager[ReadTxn]:
        self.reads += 1
        err = self.fail_read(self.reads)
        if err is not None:
            self.injected += 1
            raise err
        return self._read()

    @contextmanager
    def _read(self) -> Iterator[ReadTxn]:
        with self.inner.read() as txn:
            yield txn

    def info(self) -> StoreInfo:
        return self.inner.info()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
