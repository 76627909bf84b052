"""What one up message does inside the group's store transaction (`engine_txn`).

    apply_message(txn, inc, ta, upd, now, enrol, counters)

`inc` is a message that passed parsing from a registered device; `upd` collects the
fields of that device's registry row the transaction writes at its end (shared by all
its messages of the group, so a `hello` earlier in the group is seen by the changes
after it). Results land on `inc` (`results`, `commands`, `answer`, or `error` for a
refused certificate request); replies are built after the commit (`Engine._replies`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from broker.server.applier import TxnApplier
from broker.server.cert_issue import csr_round
from broker.server.cert_renewal import Refused
from broker.server.hello_round import hello_commands, note_incarnation
from broker.server.incoming import Incoming, held_back
from broker.server.store.base import WriteTxn
from schemas import codec
from schemas.codec import LenientChanges
from schemas.wire import Catchup, Hello
from waystation.config.server import EnrolConfig


def apply_message(txn: WriteTxn, inc: Incoming, ta: TxnApplier, upd: dict[str, Any],
                  now: int, enrol: EnrolConfig, counters: Counter[str]) -> None:
    """Apply `inc` (from `inc.device`, which is not None) in `txn`; see module docstring."""
    device = inc.device
    if device is None:  # parse_up found no registered device: nothing to apply
        return
    if inc.kind == "changes":
        if "caps" in upd:  # a hello earlier in this group agreed them
            device = dataclasses.replace(device, caps=upd["caps"])
        lc: LenientChanges = inc.msg
        changes = lc.changes.ch if lc.changes is not None else []
        if inc.blocked:
            inc.results = held_back(changes, lc.bad, inc.blocked)
            counters["held_back"] += len(inc.results)
        else:
            inc.results = ta.apply_batch(device, lc.sv, changes, lc.bad, lc.inc)
            if any(r.ok for r in inc.results):
                upd["synced_ms"] = now
    elif inc.kind == "hello":
        hello: Hello = inc.msg
        inc.commands = hello_commands(txn, hello, inc.caps, device, now, upd)
        upd.update(agent=hello.agent, sv=hello.sv, z=hello.z, caps=inc.caps)
        note_incarnation(device, hello, now, upd)
        if hello.cp is not None:
            upd.update(cp={s: v for s, v in hello.cp.items() if s in device.scopes},
                       cp_ms=now)
    elif inc.kind == "csr":
        try:
            inc.answer = csr_round(txn, inc.msg, device, enrol, now, upd)
        except Refused as exc:
            inc.error = (codec.INVALID, str(exc))
    elif inc.kind == "catchup" and not inc.blocked:
        req: Catchup = inc.msg
        upd.update(cp={s: v for s, v in req.cp.items() if s in device.scopes}, cp_ms=now)


__all__ = ["apply_message"]
