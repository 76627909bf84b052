"""What a device's `hello` changes in the store: commands done, commands still due,
and the store incarnation it announces (PROTOCOL.md §2, §8, §10.2).

Runs inside the engine's group transaction; the device-row updates go into `upd`,
which the engine writes with the rest of the round.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import structlog

from broker.server.caps import agreed
from broker.server.registry import deliverable
from broker.server.store.base import CommandRow, DeviceRow, WriteTxn
from schemas.wire import Hello

log = structlog.get_logger(__name__)


def hello_commands(txn: WriteTxn, hello: Hello, device: DeviceRow | None, now: int,
                   upd: dict[str, Any]) -> list[CommandRow]:
    """Record the commands `hello` reports done; return those still pending (a wipe
    first: nothing else reaches a device before its wipe)."""
    done = set(hello.done)
    caps = agreed(hello.caps or ())
    pending: list[CommandRow] = []
    for cmd in txn.commands(hello.dev):
        if cmd.done_ms:
            continue
        if cmd.id in done:
            txn.put_command(dataclasses.replace(cmd, done_ms=now))
            if device is not None and cmd.id == device.wipe_id:
                upd["wipe_done_ms"] = now
                log.warning("device_wiped", dev=hello.dev, command=cmd.id)
        elif deliverable(cmd, caps):
            pending.append(cmd)
    pending.sort(key=lambda c: c.cmd != "wipe")
    return pending


def note_incarnation(device: DeviceRow, hello: Hello, now: int,
                     upd: dict[str, Any]) -> None:
    """Note the store incarnation a hello announces (PROTOCOL.md §2, §10.2)."""
    inc = hello.inc or ""
    if inc == device.inc:
        return
    upd.update(inc=inc, inc_ms=now, incs=device.incs + 1)
    if device.incs == 0:
        log.info("device_incarnation", dev=device.id, inc=inc or "legacy")
        return
    # A re-imaged device, a restored backup, a new data_dir: the new store numbers
    # its changes from scratch in its own namespace (nothing is deduplicated across
    # incarnations) and catches up from its own checkpoints.
    log.warning("device_store_recreated", dev=device.id, inc=inc or "legacy",
                previous=device.inc or "legacy", incarnations=device.incs + 1)
    upd.update(cp={}, cp_ms=0)


__all__ = ["hello_commands", "note_incarnation"]
