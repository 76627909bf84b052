"""The device registry: who may sync, in which scopes (used by the CLI and the engine).

Operator operations (`add_device`, `remove_device`, `set_enabled`, `set_scopes`,
`issue_command`) each run in one store transaction and bump the registry generation, so
a running server (another process) notices at its next batch or tick and reloads.

`Registry` is the engine's in-memory view: device rows and the scope -> devices index
used for fan-out, reloaded whenever the store's generation moves.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from broker.errors import DeviceExists, InvalidArgument, ServerError, UnknownDevice
from broker.server.store.base import (
    CommandRow,
    DeviceRow,
    LoginRemoval,
    ReadTxn,
    Store,
    WriteTxn,
)
from schemas.wire import ID_PATTERN

_ID_RE = re.compile(ID_PATTERN)
COMMANDS = ("wipe", "resync", "ping", "sync")


class RegistryMoved(ServerError):
    """A transaction (or read) found the registry generation -- and with it possibly the
    live schema version -- moved since the engine loaded it: reload and run it again.
    Never reaches an operator: the engine catches it."""


def check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidArgument(f"{value!r} is not a valid {kind}: use 1 to 64 letters, digits, "
                              "'_', '.' or '-', starting with a letter or digit")
    return value


def _scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for scope in scopes:
        check_id("scope", scope)
        if scope not in out:
            out.append(scope)
    if not out:
        raise InvalidArgument("a device needs at least one scope (--scope S)")
    return tuple(out)


def add_device(store: Store, dev: str, scopes: Sequence[str], now_ms: int) -> DeviceRow:
    """Register `dev` with `scopes`; DeviceExists if it is already registered."""
    check_id("device id", dev)
    row = DeviceRow(dev, _scopes(scopes), created_ms=now_ms)

    def fn(txn: WriteTxn) -> DeviceRow:
        if txn.get_device(dev) is not None:
            raise DeviceExists(f"device {dev!r} is already registered; remove it first or "
                               "pick another id")
        # A removal of an earlier device of this id still due must not delete this login.
        txn.delete_login_removal(dev)
        txn.put_device(row)
        txn.bump_registry()
        return row

    return store.transact(fn)


def remove_device(store: Store, dev: str, now_ms: int = 0, *,
                  remove_login: bool = False) -> DeviceRow:
    """Unregister `dev`: its changes are refused from now on (`unknown_device`).

    Its records stay. Its remembered change outcomes and commands are dropped, so a new
    device enrolled later under the same id starts afresh at change number 1. With
    `remove_login` (logins the server deletes itself: RabbitMQ) its broker login is
    queued for deletion in the same transaction (`broker.server.login_removal`).
    """
    def fn(txn: WriteTxn) -> DeviceRow:
        row = txn.get_device(dev)
        if row is None:
            raise UnknownDevice(f"device {dev!r} is not registered (see `waystation device "
                                "list`)")
        txn.delete_device(dev)
        txn.delete_outcomes(dev)
        txn.delete_commands(dev)
        if remove_login:
            txn.put_login_removal(LoginRemoval(
                dev, f"remove_login-{now_ms:x}-{secrets.token_hex(3)}", now_ms))
        txn.bump_registry()
        return row

    return store.transact(fn)


def _update(store: Store, dev: str, **changes: Any) -> DeviceRow:
    def fn(txn: WriteTxn) -> DeviceRow:
        row = txn.get_device(dev)
        if row is None:
            raise UnknownDevice(f"device {dev!r} is not registered (see `waystation device "
                                "list`)")
        data = row.to_json()
        data.update(changes)
        new = DeviceRow.from_json(data)
        txn.put_device(new)
        txn.bump_registry()
        return new

    return store.transact(fn)


def set_enabled(store: Store, dev: str, enabled: bool) -> DeviceRow:
    """Enable or disable a device. A disabled device still receives its commands (a wipe
    above all); it gets no data, and its changes are refused for now (`device_disabled`,
    transient: they wait on the device until it is enabled again)."""
    return _update(store, dev, enabled=enabled)


def enable_device(store: Store, dev: str, now_ms: int) -> tuple[DeviceRow, CommandRow | None]:
    """Enable `dev` and, when it was disabled and agreed to the `sync` capability, queue a
    `sync` command in the same transaction: the changes it held while disabled (each in
    its retry backoff, up to the agent's `backoff_max_s`) go at once, and a device offline
    now gets the command at its next hello. A device without the capability gets none
    (it retries when its backoff runs out, as before); nor does one already enabled, or
    one with a `sync` command still pending. Returns the row and the command queued."""
    def fn(txn: WriteTxn) -> tuple[DeviceRow, CommandRow | None]:
        row = txn.get_device(dev)
        if row is None:
            raise UnknownDevice(f"device {dev!r} is not registered (see `waystation device "
                                "list`)")
        new = dataclasses.replace(row, enabled=True)
        txn.put_device(new)
        cmd: CommandRow | None = None
        pending = any(c.cmd == "sync" and not c.done_ms for c in txn.commands(dev))
        if not row.enabled and COMMAND_CAPS["sync"] in row.caps and not pending:
            cmd = CommandRow(f"sync-{now_ms:x}-{secrets.token_hex(3)}", dev, "sync", {},
                             created_ms=now_ms)
            txn.put_command(cmd)
        txn.bump_registry()
        return new, cmd

    return store.transact(fn)


def set_scopes(store: Store, dev: str, scopes: Sequence[str]) -> DeviceRow:
    """Replace the scopes a device may read and write."""
    return _update(store, dev, scopes=list(_scopes(scopes)))


def change_scopes(store: Store, dev: str, now_ms: int, *, add: Sequence[str] = (),
                  remove: Sequence[str] = ()) -> tuple[DeviceRow, CommandRow | None]:
    """Add and remove scopes of `dev` in one transaction, effective on the server at once
    (the engine reloads the registry), and queue the `scopes` command that tells the
    device (PROTOCOL.md §7.9); an older `scopes` command still pending is superseded.
    Returns the new row and the command (None when nothing changed)."""
    check_id("device id", dev)
    for scope in (*add, *remove):
        check_id("scope", scope)

    def fn(txn: WriteTxn) -> tuple[DeviceRow, CommandRow | None]:
        device = txn.get_device(dev)
        if device is None:
            raise UnknownDevice(f"device {dev!r} is not registered; `waystation device list` "
                                "shows the registered ones")
        unknown = [s for s in remove if s not in device.scopes]
        if unknown:
            raise InvalidArgument(f"device {dev!r} does not follow {', '.join(unknown)}; "
                                  f"its scopes are {', '.join(device.scopes)}")
        new = [s for s in device.scopes if s not in remove]
        new += [s for s in add if s not in new]
        if not new:
            raise InvalidArgument(f"device {dev!r} would follow no scope; add one (--add S) "
                                  "or disable the device (`waystation device disable`)")
        if tuple(new) == device.scopes:
            return device, None
        row = dataclasses.replace(device, scopes=tuple(new))
        txn.put_device(row)
        for old in txn.commands(dev):
            if old.cmd == "scopes" and not old.done_ms:
                txn.put_command(dataclasses.replace(old, done_ms=now_ms))
        cmd = CommandRow(f"scopes-{now_ms:x}-{secrets.token_hex(3)}", dev, "scopes",
                         {"scopes": list(new)}, created_ms=now_ms)
        txn.put_command(cmd)
        txn.bump_registry()
        return row, cmd

    return store.transact(fn)


COMMAND_CAPS: dict[str, str] = {"creds": "creds", "scopes": "scopes", "sync": "sync",
                                "cert_renew": "cert_renew"}
"""Commands newer than protocol v1 and the capability a device must have agreed to get
one (PROTOCOL.md §7.9)."""


def deliverable(cmd: CommandRow, caps: Iterable[str]) -> bool:
    """Whether `cmd` may be sent to a device that agreed to `caps`: a `creds`, `scopes`
    or `sync` command only to a device that speaks it (a v1 device keeps it pending; for
    scopes its config decides, for creds the operator writes its config)."""
    need = COMMAND_CAPS.get(cmd.cmd)
    return need is None or need in caps


def list_devices(store: Store) -> list[DeviceRow]:
    with store.read() as txn:
        return txn.devices()


def issue_command(store: Store, dev: str, cmd: str, now_ms: int,
                  args: dict[str, Any] | None = None) -> CommandRow:
    """Queue a command for `dev`; it is sent at its next hello (or at once if online).

    A wipe also disables the device and records the wipe as pending on its row: until
    the device reports it done it gets nothing else, and afterwards no data until the
    operator enables it again (`set_enabled`).
    """
    if cmd not in COMMANDS:
        raise InvalidArgument(f"unknown command {cmd!r}; use one of {', '.join(COMMANDS)}")
    row = CommandRow(f"{cmd}-{now_ms:x}-{secrets.token_hex(3)}", dev, cmd, dict(args or {}),
                     created_ms=now_ms)

    def fn(txn: WriteTxn) -> CommandRow:
        device = txn.get_device(dev)
        if device is None:
            raise UnknownDevice(f"device {dev!r} is not registered")
        txn.put_command(row)
        if cmd == "wipe":
            txn.put_device(dataclasses.replace(device, enabled=False, wipe_id=row.id,
                                               wipe_ms=now_ms, wipe_done_ms=0))
        txn.bump_registry()
        return row

    return store.transact(fn)


class Registry:
    """In-memory registry for the engine; `refresh()` reloads when the store changed."""

    def __init__(self) -> None:
        self.generation = -1
        self._devices: dict[str, DeviceRow] = {}
        self._by_scope: dict[str, frozenset[str]] = {}

    def refresh(self, txn: ReadTxn) -> bool:
        """Reload if the store's registry generation moved; True when it did."""
        gen = txn.registry_generation()
        if gen == self.generation:
            return False
        self.load(txn.devices(), gen)
        return True

    def load(self, rows: Iterable[DeviceRow], generation: int) -> None:
        self._devices = {row.id: row for row in rows}
        by_scope: dict[str, set[str]] = {}
        for row in self._devices.values():
            if row.enabled:
                for scope in row.scopes:
                    by_scope.setdefault(scope, set()).add(row.id)
        self._by_scope = {s: frozenset(d) for s, d in by_scope.items()}
        self.generation = generation

    def get(self, dev: str) -> DeviceRow | None:
        """The device's row, or None if it is unknown."""
        return self._devices.get(dev)

    def active(self, dev: str) -> DeviceRow | None:
        """The device's row if it is registered and enabled."""
        row = self._devices.get(dev)
        return row if row is not None and row.enabled else None

    def subscribers(self, scope: str) -> frozenset[str]:
        """Enabled devices that follow `scope`."""
        return self._by_scope.get(scope, frozenset())

    def put(self, row: DeviceRow) -> None:
        """Update one row in memory (after the engine stored it; scopes unchanged)."""
        self._devices[row.id] = row

    def devices(self) -> list[DeviceRow]:
        return list(self._devices.values())


__all__ = [
    "COMMANDS",
    "Registry",
    "RegistryMoved",
    "add_device",
    "change_scopes",
    "check_id",
    "deliverable",
    "enable_device",
    "issue_command",
    "list_devices",
    "remove_device",
    "set_enabled",
    "set_scopes",
]
