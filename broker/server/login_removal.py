"""Deleting a removed device's broker login where the server changes logins itself
(`enrol.broker_kind = "rabbitmq"`: RabbitMQ keeps its own users; a password file is
edited by `device remove` at once, `broker.cli.logins`).

`device remove` queues the deletion in the transaction that unregisters the device (a
`LoginRemoval` row of its id, in a table of its own: `WriteTxn.put_login_removal`).
The running server carries it out like a rotation's switch (`rotation_files.advance`):
at each tick, in a thread of its own (`RabbitLogins.delete_many`: `rabbitmqctl` takes
seconds, even to find a node down), retried at every tick while it fails; a failure is
logged and noted on the row (again after `ERROR_REPEAT_MS`) for `server status` and
`device list`, with the command to run by hand; the row goes once the user is deleted.
Enrolling the id again drops a deletion still due (`registry.add_device`).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import structlog

from broker.server.rotation_files import ERROR_REPEAT_MS, BrokerLogins
from broker.server.rotation_rabbitmq import RabbitLogins
from broker.server.store.base import LoginRemoval, ReadTxn, Store, WriteTxn

log = structlog.get_logger(__name__)

MAX_PER_TICK = 100
"""Deletions started in one tick (one delete command each); the rest at the next ticks."""


def pending(txn: ReadTxn) -> list[LoginRemoval]:
    """The login deletions still due, oldest first."""
    return txn.login_removals()


def removal_doc(row: LoginRemoval) -> dict[str, Any]:
    """A deletion still due, for `server status` and `device list`."""
    return {"device": row.device, "queued_ms": row.queued_ms,
            "failing": None if not row.failed_ms else
            {"at_ms": row.failed_ms, "error": row.error, "hint": row.hint}}


class LoginRemovals:
    """The server's side: which deletions are due (read again when the registry
    generation moved: `device remove` bumps it) and their outcomes."""

    def __init__(self, logins: RabbitLogins) -> None:
        self.logins = logins
        self._generation = -1
        self._due: dict[str, LoginRemoval] = {}
        self._failing: dict[str, int] = {}
        """Device -> when its failure was last logged and noted."""

    def advance(self, store: Store, now: int) -> int:
        """Carry out the deletions due now; returns how many were done."""
        with store.read() as txn:
            gen = txn.registry_generation()
            if gen != self._generation:
                self._due = {row.device: row for row in pending(txn)}
                self._generation = gen
        if not self._due:
            return 0
        batch = list(self._due)[:MAX_PER_TICK]
        outcome = self.logins.delete_many(batch)
        done = 0
        for dev in batch:
            if dev in outcome and outcome[dev] is None:
                continue  # under way in its thread
            error = outcome.get(dev)
            row = self._due[dev]
            if error is None:
                if store.transact(partial(_forget, row=row)):
                    log.info("device_login_removed", dev=dev, where="rabbitmq")
                    done += 1
                del self._due[dev]
                self._failing.pop(dev, None)
            elif now - self._failing.get(dev, -ERROR_REPEAT_MS) >= ERROR_REPEAT_MS:
                self._failing[dev] = now
                hint = self.logins.delete_hint(dev)
                log.error("device_login_removal_failed", dev=dev, error=error, hint=hint)
                self._due[dev] = dataclasses.replace(row, failed_ms=now, error=error, hint=hint)
                store.transact(partial(_note, row=self._due[dev]))
        return done


def _same(txn: ReadTxn, row: LoginRemoval) -> bool:
    """`row` is still the removal due for its id: not enrolled again (which dropped it),
    nor enrolled and removed again (a removal of its own)."""
    current = txn.get_login_removal(row.device)
    return current is not None and current.id == row.id


def _forget(txn: WriteTxn, row: LoginRemoval) -> bool:
    """Drop the deletion done; False when it is no longer there (the id was enrolled
    again meanwhile)."""
    if not _same(txn, row):
        return False
    return txn.delete_login_removal(row.device)


def _note(txn: WriteTxn, row: LoginRemoval) -> None:
    if _same(txn, row):
        txn.put_login_removal(row)


def login_removals(logins: BrokerLogins) -> LoginRemovals | None:
    """The server's deletions for `logins`; None where `device remove` deletes the login
    itself (a password file)."""
    return LoginRemovals(logins) if isinstance(logins, RabbitLogins) else None


__all__ = ["LoginRemovals", "login_removals", "pending", "removal_doc"]
