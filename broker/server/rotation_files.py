"""The broker-side steps of a password rotation (`broker.server.rotation`) and the server
tick that carries them out (`advance`). Here: the password file and its overlap file, and
the broker reload that makes Mosquitto read them (RabbitMQ: `rotation_rabbitmq`).

Every step is idempotent and keeps both passwords accepted in every intermediate state
(a crash between two writes leaves a state the next tick repeats the step from):

    begin   overlap += new hash                  (CLI, when the rotation starts)
    switch  overlap += old hash; file := new hash; reload the broker
    retire  overlap -= everything of the user
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from broker.embedded import passwords
from broker.server.registry import Registry
from broker.server.rotation import Rotation, Step
from broker.server.store.base import Store, WriteTxn
from waystation.config.server import EnrolConfig
from waystation.errors import ConfigError

log = structlog.get_logger(__name__)

RELOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RotationFiles:
    """The broker's password file (Mosquitto format) and how to make the broker reload."""

    password_file: Path
    reload: Sequence[str] = ()
    mosquitto: bool = False
    """enrol.broker_kind is "mosquitto": a switch without `reload` is logged, since
    Mosquitto keeps the old password until someone reloads it."""

    def begin(self, user: str, new_hash: str) -> None:
        passwords.add_overlap(self.password_file, user, new_hash)

    def switch(self, user: str, new_hash: str) -> None:
        old = passwords.read_password_file(self.password_file).get(user)
        if old is not None and old != new_hash:
            passwords.add_overlap(self.password_file, user, old)
        passwords.write_hash_entry(self.password_file, user, new_hash)
        self.reload_broker()

    def retire(self, user: str) -> None:
        passwords.drop_overlap(self.password_file, user)

    def reload_broker(self) -> None:
        if not self.reload:
            if self.mosquitto:
                log.warning("broker_not_reloaded", password_file=str(self.password_file),
                            hint="enrol.broker_reload is not set: reload Mosquitto by hand "
                                 "(systemctl reload mosquitto) so that the device can log in "
                                 "with its new password, or set enrol.broker_reload")
            return
        try:
            done = subprocess.run(list(self.reload), capture_output=True, text=True,
                                  timeout=RELOAD_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("broker_reload_failed", command=list(self.reload), error=str(exc),
                      hint="fix enrol.broker_reload, or reload the broker by hand")
            return
        if done.returncode != 0:
            log.error("broker_reload_failed", command=list(self.reload),
                      code=done.returncode, stderr=done.stderr.strip()[-500:],
                      hint="fix enrol.broker_reload, or reload the broker by hand")

    @property
    def where(self) -> str:
        return f"password file {self.password_file}"

    @property
    def hint(self) -> str:
        return ("the server must be able to write the broker's password file "
                "(enrol.password_file); it tries again at every tick")

    def switch_many(self, pairs: Sequence[tuple[str, str]]) -> dict[str, str | None]:
        """`switch` for each user; returns user -> why it failed."""
        errors: dict[str, str | None] = {}
        for user, new_hash in pairs:
            try:
                self.switch(user, new_hash)
            except (OSError, ConfigError, ValueError) as exc:
                errors[user] = str(exc)
        return errors


class BrokerLogins(Protocol):
    """Where device logins live and how a rotation's steps change them: the password
    file (embedded broker, Mosquitto) or RabbitMQ's users
    (`broker.server.rotation_rabbitmq`)."""

    @property
    def where(self) -> str: ...

    @property
    def hint(self) -> str: ...

    def begin(self, user: str, new_hash: str) -> None: ...

    def switch_many(self, pairs: Sequence[tuple[str, str]]) -> dict[str, str | None]:
        """Switch each user to its new hash; returns user -> why it failed, or None while
        its switch is still under way (asked again at the next tick); absent: done."""
        ...

    def retire(self, user: str) -> None: ...


def broker_logins(enrol: EnrolConfig, password_file: Callable[[], Path], *,
                  background: bool = False) -> BrokerLogins:
    """The logins `enrol.broker_kind` names (`password_file` is asked only when they are
    in a password file). `background`: a RabbitMQ import runs in a thread of its own (the
    server: its loop must not wait for `rabbitmqctl`)."""
    if enrol.broker_kind == "rabbitmq":
        from broker.server.rotation_rabbitmq import RabbitLogins

        return RabbitLogins(tuple(enrol.rabbitmq_import), background=background,
                            delete_argv=tuple(enrol.rabbitmq_delete_user))
    return RotationFiles(enrol.password_file or password_file(), tuple(enrol.broker_reload),
                         mosquitto=enrol.broker_kind == "mosquitto")


ERROR_REPEAT_MS = 300_000
"""A step that keeps failing is logged (and noted in the store) again after this long; it
is retried at every tick."""
MAX_SWITCHES_PER_TICK = 500
"""Switches carried out in one tick (RabbitMQ: one import); the rest at the next ticks."""


def advance(store: Store, registry: Registry, logins: BrokerLogins, now: int,
            failing: dict[str, int] | None = None) -> int:
    """Carry out the steps the rotations in `registry` owe now; returns how many.
    `failing` (device -> when its failure was last logged) keeps a step that fails at
    every tick from flooding the log and the store."""
    failing = {} if failing is None else failing
    due: list[tuple[str, Rotation, Step]] = []
    for row in registry.devices():
        rot = Rotation.from_json(row.rot)
        step = None if rot is None else rot.due(now)
        if rot is None or step is None or not _still_current(store, row.id, rot):
            continue
        due.append((row.id, rot, step))
    switches = [(dev, rot.new_hash) for dev, rot, step in due
                if step == "switch"][:MAX_SWITCHES_PER_TICK]
    errors = logins.switch_many(switches) if switches else {}
    switching = {dev for dev, _ in switches}
    steps = 0
    for dev, rot, step in due:
        if step == "switch" and dev not in switching:
            continue  # over this tick's batch
        if step == "switch" and dev in errors and errors[dev] is None:
            continue  # under way (RabbitMQ: the import runs in its own thread)
        error = errors.get(dev)
        if step == "retire":
            try:
                logins.retire(dev)
            except (OSError, ConfigError, ValueError) as exc:
                error = str(exc)
        if error is not None:
            if now - failing.get(dev, -ERROR_REPEAT_MS) < ERROR_REPEAT_MS:
                continue
            failing[dev] = now
            log.error("password_rotation_step_failed", dev=dev, rotation=rot.id, step=step,
                      logins=logins.where, error=error, hint=logins.hint)
            _record_failure(store, dev, rot, now, error)
            continue
        failing.pop(dev, None)
        if _record(store, dev, rot, step, now):
            steps += 1
            log.warning("password_rotation_step", dev=dev, rotation=rot.id, step=step,
                        forced=step == "retire" and not rot.login)
    return steps


def _still_current(store: Store, dev: str, rot: Rotation) -> bool:
    """The registry may be a tick old: a rotation superseded (or a device removed)
    since must not have its step written into the broker's files."""
    with store.read() as txn:
        row = txn.get_device(dev)
    fresh = None if row is None else Rotation.from_json(row.rot)
    return fresh is not None and fresh.id == rot.id


def _record_failure(store: Store, dev: str, rot: Rotation, now: int, error: str) -> None:
    def fn(txn: WriteTxn) -> None:
        row = txn.get_device(dev)
        fresh = None if row is None else Rotation.from_json(row.rot)
        if row is None or fresh is None or fresh.id != rot.id:
            return
        txn.put_device(dataclasses.replace(row, rot=fresh.failing(now, error).to_json()))
        txn.bump_registry()

    store.transact(fn)


def _record(store: Store, dev: str, rot: Rotation, step: Step, now: int) -> bool:
    def fn(txn: WriteTxn) -> bool:
        row = txn.get_device(dev)
        fresh = None if row is None else Rotation.from_json(row.rot)
        if row is None or fresh is None or fresh.id != rot.id:
            return False  # removed, or a newer rotation started meanwhile
        txn.put_device(dataclasses.replace(row, rot=fresh.done(step, now).to_json()))
        txn.bump_registry()
        return True

    return store.transact(fn)


__all__ = ["BrokerLogins", "RotationFiles", "advance", "broker_logins"]
