"""What a device's `hello` changes in the store: commands done, commands still due,
and the store incarnation it announces (PROTOCOL.md §2, §8, §10.2).

Runs inside the engine's group transaction; the device-row updates go into `upd`,
which the engine writes with the rest of the round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import structlog

from broker.server.cert_issue import note_hello as note_cert
from broker.server.registry import deliverable
from broker.server.rotation import Rotation, on_hello, scrubbed
from broker.server.store.base import CommandRow, DeviceRow, WriteTxn
from schemas.wire import Hello

log = structlog.get_logger(__name__)


def hello_commands(txn: WriteTxn, hello: Hello, caps: Sequence[str], device: DeviceRow | None,
                   now: int, upd: dict[str, Any]) -> list[CommandRow]:
    """Record the commands `hello` reports done; return those still pending that the
    agreed features (`caps`) let reach the device (a wipe first: nothing else reaches a
    device before its wipe)."""
    done = set(hello.done)
    pending: list[CommandRow] = []
    for cmd in txn.commands(hello.dev):
        if cmd.done_ms:
            continue
        if cmd.id in done:
            args = scrubbed(cmd.args) if cmd.cmd == "creds" else cmd.args
            txn.put_command(dataclasses.replace(cmd, done_ms=now, args=args))
            if device is not None and cmd.id == device.wipe_id:
                upd["wipe_done_ms"] = now
                log.warning("device_wiped", dev=hello.dev, command=cmd.id)
        elif deliverable(cmd, caps):
            pending.append(cmd)
    pending.sort(key=lambda c: c.cmd != "wipe")
    _note_rotation(txn, hello, done, now, upd)
    note_cert(txn, hello.dev, done, hello.crt, hello.cexp, now, upd)
    return pending


def _note_rotation(txn: WriteTxn, hello: Hello, done: set[str], now: int,
                   upd: dict[str, Any]) -> None:
    """The device stored its new broker password (command done) or logged in with it
    (`hello.cred`): the server's tick then switches or retires (`broker.server.rotation`).
    Read from the transaction: the operator may have started a rotation since."""
    row = txn.get_device(hello.dev)
    rot = None if row is None else Rotation.from_json(row.rot)
    if rot is None:
        return
    moved = on_hello(rot, done, hello.cred, now)
    if moved != rot:
        upd["rot"] = moved.to_json()
        log.info("password_rotation", dev=hello.dev, rotation=rot.id, stage=moved.stage,
                 login_with_new=bool(moved.login))


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
