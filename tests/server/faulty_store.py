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
from typing import Any, TypeVar, cast

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
        self.txn_faults: dict[str, Callable[..., BaseException | None]] = {}
        """Read-transaction method name -> given its arguments, the exception to raise
        instead of calling it (or None to call it)."""

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
            yield cast(ReadTxn, _FaultyTxn(self, txn)) if self.txn_faults else txn

    def info(self) -> StoreInfo:
        return self.inner.info()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _FaultyTxn:
    """A read transaction whose methods named in `store.txn_faults` may raise."""

    def __init__(self, store: FaultyStore, txn: ReadTxn) -> None:
        self._store, self._txn = store, txn

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._txn, name)
        fault = self._store.txn_faults.get(name)
        if fault is None:
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            err = fault(*args, **kwargs)
            if err is not None:
                self._store.injected += 1
                raise err
            return method(*args, **kwargs)

        return call
