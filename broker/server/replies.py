"""What the engine answers a change batch with, and what it keeps as dead letters.

Pure functions over the applier's `ChangeResult`s: the `ack` / `reject` messages for
the sender (PROTOCOL.md §7.4, §7.5), the delta states queued for fan-out, and the
dead-letter entries (one per refused message or batch with refusals, one per batch
whose stamps were re-stamped) that keep the raw payload for the operator.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker.server.applier import ChangeResult
from broker.server.fanout import Fanout
from broker.server.messages import ack_messages, dumps, reject_messages, rejection
from broker.server.store.base import DeadLetter
from schemas import codec
from schemas.codec import BadChange

REASON_CHARS = 1000


def letter(dev: str, topic: str, code: str, reason: str, payload: bytes,
           now: int, *, size: int | None = None) -> DeadLetter:
    """A dead letter for `payload` from `dev`'s `topic` (``up`` or ``status``); `size`
    when `payload` is only the start of what was received."""
    return DeadLetter(0, now, dev[:200], topic, code, reason[:REASON_CHARS], payload,
                      len(payload) if size is None else size)


def change_replies(dev: str, results: Sequence[ChangeResult], bad: Sequence[BadChange],
                   fan: Fanout) -> list[bytes]:
    """The ack and reject messages for one batch; queues its delta states on `fan`."""
    oks: list[tuple[bytes, bytes | None]] = []
    rs: list[int] = []
    rjs: list[bytes] = []
    for r in results:
        if r.ok:
            oks.append((dumps([r.n, r.scope, r.q]), None if r.fx is None else dumps(r.fx)))
            if r.restamped:
                rs.append(r.n)
            if r.delta is not None:
                fan.add(r.scope, dev, dumps(r.delta))
        else:
            rjs.append(rejection(r.n, r.code, r.reason, r.perm, r.rec))
    nameless = [b for b in bad if b.n is None]
    err = None
    if nameless:
        err = {"code": codec.INVALID,
               "reason": f"{len(nameless)} change(s) without a valid change number were "
                         f"ignored; first: {nameless[0].error.reason}"[:REASON_CHARS]}
    return ack_messages(oks, rs) + reject_messages(rjs, err)


def batch_letters(dev: str, results: Sequence[ChangeResult], bad: Sequence[BadChange],
                  payload: bytes, now: int) -> list[DeadLetter]:
    """Dead letters for a batch: its refusals (first ones named), its re-stamped changes."""
    out: list[DeadLetter] = []
    refused = [r for r in results if not r.ok and not r.duplicate]
    # A refused transaction: its cause first (the others only say `txn_aborted`).
    refused.sort(key=lambda r: r.code == codec.TXN_ABORTED)
    nameless = [b for b in bad if b.n is None]
    if refused or nameless:
        parts = [f"n={r.n} {r.code}: {r.reason}" for r in refused[:5]]
        parts += [b.error.reason for b in nameless[:5]]
        code = refused[0].code if refused else codec.INVALID
        out.append(letter(dev, "up", code,
                          f"{len(refused) + len(nameless)} of {len(results) + len(nameless)} "
                          "changes refused: " + "; ".join(parts), payload, now))
    skewed = [r for r in results if r.restamped]
    if skewed:
        ahead = max(r.restamped for r in skewed) / 1000
        out.append(letter(
            dev, "up", codec.CLOCK_SKEW,
            f"accepted after re-stamping with the server clock: changes "
            f"{', '.join(str(r.n) for r in skewed[:20])} were up to {ahead:.0f} s ahead; "
            "fix the device's time sync", payload, now))
    return out


__all__ = ["REASON_CHARS", "batch_letters", "change_replies", "letter"]
