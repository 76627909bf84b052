"""The server's merge of one change into one record (docs/PROTOCOL.md §5, §6).

Pure functions, no I/O. The store loads a `RecordState` (`from_json`), allocates the
scope sequence `q` for the change, calls `apply_change`, and in the same transaction
stores the new state (`to_json`), the conflict-log entries and the change's outcome.
`to_rec` turns a state into the wire record state of §6 for acks, deltas and pages.

State model (every field keeps the sequence `q` at which its state last changed):

- `Register` (lww and manual fields): the current `Version` (value, stamp, writer,
  change number) and, for manual fields, the open conflict's candidates `cf` (one per
  device, sorted by stamp) and the sequence `cfq` at which the conflict last changed.
- `Counter`: the total of every distinct increment.
- `SetField`: member -> {add-tag (change id) -> stamp} of the live tags, and
  member -> {tags ever removed}, so a remove that arrives before its add still wins.
- `RecordState`: collection, key, scope, version `q`, fields, the newest delete
  (`xh` stamp, `xq` sequence, `xby` device, `xn` change number) and `wh`, the newest
  stamp of any non-delete write. The record is deleted iff `xh >= wh`.

Invariant: every register value, manual candidate and set tag stored has a stamp later
than `xh` (a delete drops what it hides; a later write stamped before the delete is
dropped on arrival), except the scope field, which a delete never hides (it equals the
record's scope forever). So what is stored is what is visible, unless the record as a
whole is deleted. Counters keep their totals through deletes (an increment is never
lost).

Concurrency: a change C from device `dev` with base `b` *saw* a stored version W iff
W was written by `dev` or `b >= q(W)`. Writes of an equal value (JSON equality that
tells 1, 1.0 and true apart) never make a conflict-log entry and never open a manual
conflict: nothing is lost.

Field states are never mutated once stored in a `RecordState`: `apply_change` copies
the field dict and replaces the states it touches (copy-on-write), so the record passed
in is left exactly as it was, and a rejected change returns it unchanged.
"""

from __future__ import annotations

from waystation.merge.apply import apply_change
from waystation.merge.checks import check_change
from waystation.merge.records import delta_rec, fx_rec, resolve, to_rec
from waystation.merge.state import (
    FORMAT_VERSION,
    ConflictEntry,
    ConflictKind,
    Counter,
    FieldState,
    Outcome,
    RecordState,
    Register,
    Rejection,
    SetField,
    Version,
    latest_stamp,
)
from waystation.merge.storage import from_json, live_values, to_json

__all__ = [
    "FORMAT_VERSION",
    "ConflictEntry",
    "ConflictKind",
    "Counter",
    "FieldState",
    "Outcome",
    "RecordState",
    "Register",
    "Rejection",
    "SetField",
    "Version",
    "apply_change",
    "check_change",
    "delta_rec",
    "from_json",
    "fx_rec",
    "latest_stamp",
    "live_values",
    "resolve",
    "to_json",
    "to_rec",
]
