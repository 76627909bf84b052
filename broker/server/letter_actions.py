"""The operator's actions on the server's dead letters: show, retry, discard.

They run in the operator's process (the CLI), next to a running server, on the same
store (LMDB allows several processes; PostgreSQL is shared anyway).

Retry means: the letter's stored raw payload goes through the server's normal intake
checks and merge once more, as if it had just arrived on the device's up topic, in ONE
store transaction:

1. decoded exactly as the engine decodes (`schemas.codec.decode_lenient`, the same
   payload limit); it must come from the device its topic named, the device must be
   registered, enabled and without a pending wipe;
2. a `changes` batch goes through `broker.server.applier` (the engine's per-change
   algorithm): change ids the server already has an outcome for get that outcome
   again, never a second application (exactly once in effect: a change applied
   before, or refused for good, stays so; fixing a change refused for good is the
   device's business: `waystation agent deadletters retry N` re-queues it as a new
   change);
3. each change applied now queues a notice, so the running server sends its delta to
   every online device of the scope at its next tick (offline ones catch up);
4. the letter is removed when every change got a final answer (applied, applied
   before, or refused for good, which is then remembered); it stays, and the retry
   reports why, when the message is still refused as a whole or a change got a
   transient refusal (e.g. a schema version the server does not run yet).

Letters that hold nothing to run again are refused with `LetterNotRetryable`: status
messages, a payload cut at 64 KiB when it was stored, `hello` and `catchup` requests
(a device repeats those on its own at every reconnect). Discard them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.errors import DeadLetterNotFound, LetterNotRetryable
from broker.server.applier import Applier, ChangeResult
from broker.server.schema_push import LiveSchema
from broker.server.store.base import DeadLetter, Notice, Store, WriteTxn
from schemas import codec
from schemas.codec import LenientChanges
from schemas.collection import Catalog
from schemas.errors import ProtocolError
from schemas.wire import UP_TYPES
from waystation.config import MergeConfig
from waystation.hlc import Clock
from waystation.rules import Rule


@dataclass(frozen=True, slots=True)
class ChangeAnswer:
    """What the retry made of one change of the batch."""

    n: int
    result: str
    """``applied`` (now), ``applied_before`` (an earlier delivery), ``refused`` (for
    good, now remembered), ``refused_before`` (refused for good earlier: the same
    answer again), ``refused_for_now`` (transient: the letter stays)."""
    code: str = ""
    reason: str = ""
    scope: str = ""
    q: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "result": self.result, "code": self.code, "reason": self.reason,
                "scope": self.scope, "version": self.q}


@dataclass(frozen=True, slots=True)
class RetryResult:
    """The outcome of retrying one dead letter."""

    letter_id: int
    device: str
    removed: bool
    """The letter was removed: every change has its final answer."""
    code: str = ""
    reason: str = ""
    """Set when the message as a whole is still refused (the letter stays)."""
    changes: tuple[ChangeAnswer, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.letter_id, "device": self.device, "removed": self.removed,
                "code": self.code, "reason": self.reason,
                "changes": [c.to_json() for c in self.changes]}


def get_letter(store: Store, lid: int) -> DeadLetter:
    """Letter `lid`; DeadLetterNotFound if none is kept under that id."""
    with store.read() as txn:
        letter = txn.get_dead_letter(lid)
    if letter is None:
        raise DeadLetterNotFound(
            f"no dead letter {lid} (it was retried, discarded, or dropped by the bounds; "
            "see `waystation server deadletters list`)")
    return letter


def discard(store: Store, lid: int) -> None:
    """Remove letter `lid` for good; DeadLetterNotFound if there is none."""
    if not store.transact(lambda txn: txn.delete_dead_letter(lid)):
        get_letter(store, lid)  # raises with the explanation
        raise DeadLetterNotFound(f"no dead letter {lid}")  # pragma: no cover - a race


def discard_device(store: Store, dev: str) -> int:
    """Remove every letter of device `dev`; how many."""
    return store.transact(lambda txn: txn.delete_dead_letters_of(dev))


def _answer(r: ChangeResult) -> ChangeAnswer:
    if r.ok:
        return ChangeAnswer(r.n, "applied_before" if r.duplicate else "applied",
                            scope=r.scope, q=r.q)
    result = ("refused_for_now" if not r.perm else
              "refused_before" if r.duplicate else "refused")
    return ChangeAnswer(r.n, result, r.code, r.reason)


def retry(store: Store, schema: Catalog | LiveSchema, config: MergeConfig, clock: Clock,
          lid: int, now_ms: Callable[[], int], rules: Sequence[Rule] = ()) -> RetryResult:
    """Run letter `lid` through intake and merge again (see the module docstring).

    With the server's `LiveSchema` (the CLI's), the change is judged as a running
    server judges it: against the live published version, upcast from the version it
    was written under; with a bare catalog, against that catalog alone."""
    letter = get_letter(store, lid)
    dev = letter.device
    if letter.topic != "up":
        raise LetterNotRetryable(
            f"dead letter {lid} is a {letter.topic} message: there is nothing in it to run "
            "again (the device publishes its status again itself); discard it")
    if letter.size > len(letter.raw):
        raise LetterNotRetryable(
            f"dead letter {lid} kept only the first {len(letter.raw)} of its {letter.size} "
            "bytes: it cannot be run again; discard it (the device still holds changes it "
            "had no answer for and sends them again)")
    try:
        msg = codec.decode_lenient(letter.raw, allowed=UP_TYPES,
                                   max_payload=config.max_payload_bytes)
    except ProtocolError as err:
        return RetryResult(lid, dev, False, err.code, err.reason)
    if not isinstance(msg, LenientChanges):
        kind = type(msg).__name__.lower()
        raise LetterNotRetryable(
            f"dead letter {lid} is a {kind} message: the device sends it again at its next "
            "reconnect, so there is nothing to run again; discard it")
    if msg.dev != dev:
        return RetryResult(lid, dev, False, codec.WRONG_DEVICE,
                           f"message says dev {msg.dev!r} but was published on the up topic "
                           f"of {dev!r}")
    count = len(msg.bad) + (len(msg.changes.ch) if msg.changes is not None else 0)
    if count > config.max_batch_changes:
        return RetryResult(lid, dev, False, codec.TOO_LARGE,
                           f"ch: {count} changes in one batch, this server takes at most "
                           f"{config.max_batch_changes} (merge.max_batch_changes)")
    if isinstance(schema, LiveSchema):
        applier = Applier(schema.catalog, config, clock, now_ms, rules)
        applier.chain = schema.chain
        applier.withdrawn = schema.withdrawn
    else:
        applier = Applier(schema, config, clock, now_ms, rules)

    def run(txn: WriteTxn) -> RetryResult:
        device = txn.get_device(dev)
        if device is None:
            return RetryResult(lid, dev, False, codec.UNKNOWN_DEVICE,
                               f"device {dev!r} is not registered: enrol it with "
                               f"`waystation device add {dev} --scope S` first")
        if device.blocked:
            why = "has a wipe pending" if device.wipe_pending else "is disabled"
            return RetryResult(lid, dev, False, codec.UNKNOWN_DEVICE,
                               f"device {dev!r} {why}: `waystation device enable {dev}` "
                               "first (a wipe must be done first)")
        changes = msg.changes.ch if msg.changes is not None else []
        results = applier.begin(txn).apply_batch(device, msg.sv, changes, msg.bad, msg.inc)
        for r in results:
            if r.ok and not r.duplicate and r.delta is not None:
                txn.add_notice(Notice(0, r.scope, r.q, r.delta))
        answers = tuple(_answer(r) for r in results)
        removed = all(a.result != "refused_for_now" for a in answers)
        if removed:
            txn.delete_dead_letter(lid)
        return RetryResult(lid, dev, removed, changes=answers)

    return store.transact(run)


__all__ = ["ChangeAnswer", "RetryResult", "discard", "discard_device", "get_letter", "retry"]
