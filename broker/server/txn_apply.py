"""A device transaction applied all or none (PROTOCOL.md §7.2.1, §10.5).

Inside the caller's store transaction (the engine's group transaction, on LMDB or
PostgreSQL alike): every change of the transaction is planned first
(`TxnApplier.plan`: checks, rules, merge, record limit; nothing written), each seeing
the records as the earlier ones leave them; only when all of them pass are they written,
in order. When one is refused, nothing of the transaction is written: that change gets
its own code, every other one `txn_aborted` with a reason naming the change and its
code, all remembered (a resend gets the same answers). When one is refused for now
(transient: `schema_version`, `server_error`), all of them are, and the device sends the
whole transaction again later.

Changes of the transaction the server already has an outcome for (a resend) are
answered from their outcomes; the others are planned as one unit.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.server.applier import ChangeResult, Planned, Refusal, TxnApplier
from broker.server.identity import change_digest
from broker.server.store.base import DeviceRow
from broker.server.txn_units import Unit, units
from schemas import codec
from schemas.wire import Change

_MISSING = object()


def apply_changes(ta: TxnApplier, device: DeviceRow, sv: int, changes: Sequence[Change],
                  ns: str, missing: int = 0) -> list[ChangeResult]:
    """Apply a batch's valid changes, unit by unit (`txn_units.units`), in order."""
    results: list[ChangeResult] = []
    for unit in units([ch.tx for ch in changes], missing):
        members = [changes[i] for i in unit.at]
        if unit.tx is None:
            results.append(ta.apply_one(device, sv, members[0], ns))
        elif unit.problem:
            results.extend(_refuse_all(ta, device, ns, members, unit))
        else:
            results.extend(apply_transaction(ta, device, sv, members, ns, unit.tx))
    return results


def _refuse_all(ta: TxnApplier, device: DeviceRow, ns: str, members: Sequence[Change],
                unit: Unit) -> list[ChangeResult]:
    out: list[ChangeResult] = []
    for ch in members:
        prior = ta.txn.get_outcome(ns, ch.n)
        if prior is not None:
            out.append(ta.apply_one(device, 0, ch, ns))  # answered from its outcome
            continue
        out.append(ta._refuse(device, ns, ch, change_digest(ch), codec.INVALID,
                              f"tx: {unit.problem}; no change of the transaction was "
                              "applied"))
    return out


def apply_transaction(ta: TxnApplier, device: DeviceRow, sv: int,
                      members: Sequence[Change], ns: str, tx: int) -> list[ChangeResult]:
    """Apply one transaction's changes all or none (see module docstring)."""
    results: dict[int, ChangeResult] = {}
    fresh: list[tuple[Change, str]] = []
    for ch in members:
        if ta.txn.get_outcome(ns, ch.n) is not None:
            results[ch.n] = ta.apply_one(device, sv, ch, ns)  # a resend: its outcome
        else:
            fresh.append((ch, change_digest(ch)))
    saved: dict[tuple[str, str], object] = {}
    bump: dict[str, int] = {}
    plans: list[tuple[Planned, str]] = []
    failed: tuple[Change, str, Refusal | ChangeResult] | None = None
    records = ta._records
    for ch, digest in fresh:
        key = (ch.c, ch.k)
        if key not in saved:
            saved[key] = records.get(key, _MISSING)
        plan = ta.plan(device, sv, ch, bump)
        if isinstance(plan, Planned):
            plans.append((plan, digest))
            records[key] = plan.new  # the next change of the transaction sees it
            bump[ch.s] = bump.get(ch.s, 0) + 1
            continue
        failed = (ch, digest, plan)
        break
    if failed is None:
        for plan, digest in plans:
            results[plan.ch.n] = ta.write(plan, ns, digest)
        return [results[ch.n] for ch in members]
    for key, value in saved.items():  # forget what the planned changes would have done
        if value is _MISSING:
            records.pop(key, None)
        else:
            records[key] = value  # type: ignore[assignment]
    bad, bad_digest, why = failed
    who = f"{device.id}:{bad.n}"
    if isinstance(why, Refusal):
        results[bad.n] = ta._refuse(device, ns, bad, bad_digest, why.code, why.reason,
                                    show=why.show)
        reason = (f"transaction {device.id}:{tx} was rejected as a whole: change {who} was "
                  f"refused ({why.code}: {why.reason[:500]}); none of its changes was "
                  "applied")
        for ch, digest in fresh:
            if ch.n != bad.n:
                results[ch.n] = ta._refuse(device, ns, ch, digest, codec.TXN_ABORTED, reason)
    else:
        results[bad.n] = why
        for ch, _ in fresh:
            if ch.n != bad.n:
                ta.stats.transient += 1
                results[ch.n] = ChangeResult(
                    ch.n, code=why.code, perm=False,
                    reason=f"transaction {device.id}:{tx} waits as a whole: change {who}: "
                           f"{why.reason[:500]}")
    return [results[ch.n] for ch in members]


__all__ = ["apply_changes", "apply_transaction"]
