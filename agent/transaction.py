"""Multi-record transactions on the device (`Agent.transaction`, docs/TRANSACTIONS.md).

    with agent.transaction() as tx:
        tx.put("orders", "o-7", {"route": "route-42", "status": "open"})
        tx.put("order_lines", "o-7:1", {"route": "route-42", "sku": "A", "qty": 2})
        tx.get("orders", "o-7")          # sees the block's own writes
    tx.results                           # one WriteResult per operation

The block only records the operations (each one's input is checked at once, so a
mistake raises where it was made). Leaving the block without an exception writes them
ALL in ONE durable LMDB transaction (`Store.write`): every change, view, index entry
and feed event of every operation commits together or, on any error or a crash before
the commit, none of them. An exception inside the block writes nothing.

A read inside the block (`tx.get`) runs the operations so far in a write transaction
that is then aborted: it sees exactly what the commit would write, from the store as it
is now, and leaves nothing behind.

On the wire (PROTOCOL.md §7.2 `tx`): when the transaction made two or more changes, each
of its outbox entries carries ``"x": [first n, count]``; the sender keeps them in one
`changes` message and, with a server that negotiated the `txn` capability, marks them so
the server applies them all or none. The entries of one transaction have consecutive
change numbers and one priority, so they drain together and in the order they were made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson

from agent import validate
from agent.core import Work
from agent.errors import BadRequest, WriteRefused
from agent.idempotency import Once
from agent.models import Record, WriteResult
from agent.store import n_key, record_key

if TYPE_CHECKING:
    from agent.api import Agent

MAX_TXN_OPS = 100
"""Operations in one transaction, at most (a transaction is sent as one unit: it must
fit one `changes` message of any server that takes 100 changes per batch or more)."""
MAX_TXN_BYTES = 128 * 1024
"""The transaction's changes as JSON, at most (the default `batch_max_bytes`; the
server's `max_payload_bytes` is 256 KiB by default)."""

_before_commit: Callable[[], None] | None = None
"""Test hook (crash tests only): called inside the LMDB write transaction after every
operation was written and before the commit."""


class TransactionError(RuntimeError):
    """The transaction object was used wrongly (after its block, or twice)."""


class _Peek(Exception):  # a control-flow signal, not an error
    """Carries a read out of a write transaction that must be aborted."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


Op = Callable[[Work], WriteResult]


class Transaction:
    """The operations of one `with agent.transaction() as tx:` block."""

    def __init__(self, agent: Agent, priority: int = 0, once: Once | None = None) -> None:
        self._agent = agent
        self._once = once
        self._priority = validate.priority(priority)
        self._ops: list[Op] = []
        self._state = "new"  # new -> open -> committed | aborted
        self.results: list[WriteResult] = []
        """One result per operation, once the block committed."""
        self.failed_at: int | None = None
        """The index of the operation that aborted the commit (None: none did)."""

    # ------------------------------------------------------------- the block

    def __enter__(self) -> Transaction:
        if self._state != "new":
            raise TransactionError("a transaction runs once: start a new one with "
                                   "agent.transaction()")
        self._state = "open"
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None:
            self._state = "aborted"
            self._ops.clear()
            return
        self.commit()

    def commit(self) -> list[WriteResult]:
        """Write every operation in one durable transaction (the block's end does it)."""
        self._check_open()
        self._state = "committed"
        ops, self._ops = self._ops, []
        if not ops:
            return []

        def run(work: Work) -> list[WriteResult]:
            results: list[WriteResult] = []
            for index, op in enumerate(ops):
                self.failed_at = index
                results.append(op(work))
            self.failed_at = None
            mark(work, results)
            if _before_commit is not None:
                _before_commit()
            return results

        agent = self._agent
        self.results = agent._commit(run, self._once)
        if any(r.state == "pending" for r in self.results):
            agent._poke()
        return self.results

    @property
    def changes(self) -> list[str]:
        """The change ids the committed transaction made, in order."""
        return [r.change_id for r in self.results if r.change_id is not None]

    # ------------------------------------------------------------ operations

    def put(self, collection: str, key: str, fields: Mapping[str, Any]) -> None:
        """Set lww/manual fields (creating the record: include its scope field)."""
        self._add(self._agent._put_op(collection, key, fields, self._priority))

    def delete(self, collection: str, key: str) -> None:
        self._add(self._agent._delete_op(collection, key, self._priority))

    def increment(self, collection: str, key: str, field: str, amount: int | float) -> None:
        self._add(self._agent._increment_op(collection, key, field, amount, self._priority))

    def add(self, collection: str, key: str, field: str, members: Sequence[str]) -> None:
        self._add(self._agent._add_op(collection, key, field, members, self._priority))

    def remove(self, collection: str, key: str, field: str, members: Sequence[str]) -> None:
        self._add(self._agent._remove_op(collection, key, field, members, self._priority))

    def get(self, collection: str, key: str, *, include_deleted: bool = False) -> Record | None:
        """The record as the commit would leave it (this block's writes included)."""
        self._check_open()
        agent = self._agent
        spec = agent._read_spec(collection)
        try:
            key = validate.record_key(spec, key)
        except WriteRefused as exc:
            raise BadRequest(exc.code, str(exc)) from None
        ops = list(self._ops)
        rk = record_key(spec.name, key)

        def run(work: Work) -> None:
            for op in ops:
                op(work)
            raise _Peek(work.load_view(rk, spec.name, key))

        try:
            agent._commit(run)
        except _Peek as peek:
            state = peek.value
        else:  # pragma: no cover - run always raises
            raise AssertionError("unreachable")
        if state is None or (state.x and not include_deleted):
            return None
        from agent.api import _record  # agent.api imports this module

        return _record(state)

    def _add(self, op: Op) -> None:
        self._check_open()
        if len(self._ops) >= MAX_TXN_OPS:
            raise WriteRefused("transaction_too_large",
                               f"a transaction holds at most {MAX_TXN_OPS} operations: "
                               "split the work into several transactions")
        self._ops.append(op)

    def _check_open(self) -> None:
        if self._state != "open":
            raise TransactionError(
                "use the transaction inside its block: `with agent.transaction() as tx:` "
                f"(this one is {self._state})")


def mark(work: Work, results: Sequence[WriteResult]) -> None:
    """Mark the outbox entries of one transaction's changes as one unit, and refuse a
    transaction too large to travel as one (the whole transaction aborts)."""
    numbers = [r.n for r in results if r.n is not None]
    size = 0
    entries: list[tuple[int, dict[str, Any]]] = []
    for n in numbers:
        entry = work.outbox_entry(n)
        if entry is None:  # pragma: no cover - written just now in this transaction
            raise RuntimeError(f"outbox entry {n} vanished inside its transaction")
        size += len(orjson.dumps(entry["ch"])) + 1
        entries.append((n, entry))
    if size > MAX_TXN_BYTES:
        raise WriteRefused("transaction_too_large",
                           f"the transaction's changes are {size} bytes as JSON, over the "
                           f"{MAX_TXN_BYTES}-byte limit of one transaction: split it")
    if len(entries) < 2:
        return  # a single change is a unit anyway: it stays a plain change
    marker = [numbers[0], len(numbers)]
    for n, entry in entries:
        entry["x"] = marker
        work.tx.put("outbox", n_key(n), entry)


__all__ = ["MAX_TXN_BYTES", "MAX_TXN_OPS", "Transaction", "TransactionError", "mark"]
