"""A device's broker password rotation: its stages, and what each hello changes (pure).

`waystation device rotate-password ID` starts one (`start`); the device is never locked
out because the broker accepts the old and the new password through these stages:

    sent      the new password's hash is in the overlap file (the embedded broker takes
              both); a `creds` command carries the password to the device (§7.9)
    stored    the device reported the command done: the password is on its disk
    switched  the server wrote the new hash into the broker's password file and kept
              the old one in the overlap file (Mosquitto, one password per user, takes
              the new one from its reload on; the device falls back to the old one
              until then)
    retired   the device logged in with the new password (`hello.cred`), or the
              operator's deadline passed (`--retire-after`): the old one is dropped

The server moves a rotation on (`due`, carried out by `broker.server.rotation_files`)
at its periodic tick, from what the store holds, so a crash anywhere only delays it.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from broker.errors import InvalidArgument, UnknownDevice
from broker.server.store.base import CommandRow, Store, WriteTxn

Stage = Literal["sent", "stored", "switched", "retired"]
Step = Literal["switch", "retire"]

MAX_RETIRE_AFTER_S = 366 * 24 * 3600
MAX_ERROR_CHARS = 600


@dataclass(frozen=True)
class Rotation:
    """One rotation of a device's broker password, as kept in its device row."""

    id: str
    cmd: str
    """The `creds` command that carries the password."""
    t: int
    """When the operator ordered it (ms)."""
    new_hash: str
    """The new password's hash, in the password file's format."""
    retire_at: int = 0
    """Retire the old password at this time (ms) even without a login with the new one;
    0: only after that login."""
    stored: int = 0
    login: int = 0
    switched: int = 0
    retired: int = 0
    forced: bool = False
    """Retired by the deadline rather than by a login with the new password."""
    failed: int = 0
    """When the step it owes last failed (ms); 0 once it worked."""
    error: str = ""
    """Why that step failed (for `server status` and `device list`)."""

    @property
    def stage(self) -> Stage:
        if self.retired:
            return "retired"
        if self.switched:
            return "switched"
        return "stored" if self.stored else "sent"

    def due(self, now: int) -> Step | None:
        """The file step the server owes this rotation now, if any."""
        if self.retired:
            return None
        late = bool(self.retire_at) and now >= self.retire_at
        if not self.switched:
            return "switch" if self.stored or self.login or late else None
        return "retire" if self.login or late else None

    def done(self, step: Step, now: int) -> Rotation:
        """After the server carried out `step`."""
        if step == "switch":
            return dataclasses.replace(self, switched=now, failed=0, error="")
        return dataclasses.replace(self, retired=now, forced=not self.login, failed=0,
                                   error="")

    def failing(self, now: int, error: str) -> Rotation:
        """After the server tried the step it owes and it failed."""
        return dataclasses.replace(self, failed=now, error=error[:MAX_ERROR_CHARS])

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        # Absent unless failing: a row an older server reads back stays one it knows.
        for key in ("failed", "error"):
            if not doc[key]:
                del doc[key]
        return doc

    @classmethod
    def from_json(cls, data: Any) -> Rotation | None:
        if not isinstance(data, dict) or not data:
            return None
        try:
            return cls(**data)
        except TypeError:
            return None

    def describe(self) -> str:
        """For `device list` and `server devices`."""
        if self.error and not self.retired:
            return f"password rotation: {self.stage}, its next step failing ({self.error})"
        return {"sent": "password rotation: sent, not yet stored by the device",
                "stored": "password rotation: stored by the device",
                # Only the embedded broker still takes the old password here (its
                # overlap file); Mosquitto and RabbitMQ hold one password per user.
                "switched": "password rotation: switched, waiting for the device's login "
                            "with the new password",
                "retired": "password rotated"}[self.stage]


def rotation_of(row_rot: dict[str, Any]) -> Rotation | None:
    return Rotation.from_json(row_rot)


def on_hello(rot: Rotation, done: set[str], cred: str | None, now: int) -> Rotation:
    """What one hello says: the command done (password stored), a login with it."""
    if rot.retired:
        return rot
    if rot.cmd in done and not rot.stored:
        rot = dataclasses.replace(rot, stored=now)
    if cred == rot.id and not rot.login:
        # Logging in with it proves it was stored even if the report was lost.
        rot = dataclasses.replace(rot, login=now, stored=rot.stored or now)
    return rot


def start(store: Store, dev: str, password: str, new_hash: str, now_ms: int, *,
          retire_after_s: int | None) -> tuple[Rotation, CommandRow]:
    """Record a new rotation for `dev` and queue its `creds` command; one still under way
    is superseded (its command done, unsent: its password never reaches the device)."""
    if retire_after_s is not None and not 0 <= retire_after_s <= MAX_RETIRE_AFTER_S:
        raise InvalidArgument(f"--retire-after must be between 0 s and "
                              f"{MAX_RETIRE_AFTER_S} s (a year)")
    rid = f"r-{now_ms:x}-{secrets.token_hex(3)}"
    cmd = CommandRow(f"creds-{now_ms:x}-{secrets.token_hex(3)}", dev, "creds",
                     {"dev": dev, "rotation": rid, "t": now_ms, "password": password},
                     created_ms=now_ms)
    rot = Rotation(rid, cmd.id, now_ms, new_hash,
                   retire_at=0 if retire_after_s is None else now_ms + retire_after_s * 1000)

    def fn(txn: WriteTxn) -> tuple[Rotation, CommandRow]:
        device = txn.get_device(dev)
        if device is None:
            raise UnknownDevice(f"device {dev!r} is not registered; `waystation device list` "
                                "shows the registered ones")
        for old in txn.commands(dev):
            if old.cmd == "creds" and not old.done_ms:
                txn.put_command(dataclasses.replace(old, done_ms=now_ms,
                                                    args=scrubbed(old.args)))
        txn.put_command(cmd)
        txn.put_device(dataclasses.replace(device, rot=rot.to_json()))
        txn.bump_registry()
        return rot, cmd

    return store.transact(fn)


def scrubbed(args: dict[str, Any]) -> dict[str, Any]:
    """A `creds` command's args without the password (kept once it is not needed)."""
    return {k: v for k, v in args.items() if k != "password"}


__all__ = ["MAX_RETIRE_AFTER_S", "Rotation", "Stage", "Step", "on_hello", "rotation_of",
           "scrubbed", "start"]
