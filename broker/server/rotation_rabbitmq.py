"""The broker-side steps of a password rotation on a RabbitMQ fleet (`enrol.broker_kind =
"rabbitmq"`): RabbitMQ keeps its own users, one password each, so

    begin   nothing (RabbitMQ takes only the old password until the switch)
    switch  the device's user gets the new salted hash: a definitions document with only
            that user is written to `enrol.rabbitmq_import` on its standard input
            (`rabbitmqctl import_definitions` by default), so neither the password nor
            its hash appears on a command line (`ps`)
    retire  nothing (the switch already replaced the old password)

The server runs the import in a thread of its own (`RabbitLogins(background=True)`):
`rabbitmqctl` starts an Erlang VM and takes seconds, even to find a node down, and the
merge loop must not wait for it. A failed import is retried at every tick. The user of
a removed device is deleted the same way (`delete_many`: `enrol.rabbitmq_delete_user`
with the id appended, one run per user; `broker.server.login_removal`).

RabbitMQ 3.10 keeps a connection that logged in with the old password open when the
password changes: the device keeps its session and logs in with the new one at its next
connection. An import changes only what the document names: the user's permissions and
topic permissions stay as `python -m broker.rabbitmq.definitions` wrote them.
"""

from __future__ import annotations

import base64
import binascii
import json
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.rabbitmq.definitions import HASHING

IMPORT_TIMEOUT_S = 60.0
OUTPUT_TAIL = 500
"""Characters of a failing import's output kept for the log and `server status`."""


class RabbitImportError(Exception):
    """`enrol.rabbitmq_import` failed; the message says how."""


def valid_hash(value: str) -> bool:
    """A RabbitMQ sha256 password hash: base64 of a 4-byte salt and a 32-byte digest."""
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False
    return len(raw) == 36


def users_document(pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """A definitions document that sets each user's password hash and nothing else a
    device user has (no tags, no limits)."""
    return {"users": [{"name": user, "password_hash": new_hash, "hashing_algorithm": HASHING,
                       "tags": [], "limits": {}} for user, new_hash in pairs]}


@dataclass
class _Job:
    """One run under way in its own thread: user -> the value it is run for (a hash; ""
    for a deletion), and then user -> why it failed."""

    pairs: dict[str, str]
    done: threading.Event = field(default_factory=threading.Event)
    errors: dict[str, str] = field(default_factory=dict)


class _Background:
    """One run at a time of `run` (user -> value in, user -> error out) in a thread of its
    own; asked again at each tick, it reports the outcome of the run that ended for the
    users still due with the same value, and starts a run for the others."""

    def __init__(self, run: Callable[[dict[str, str]], dict[str, str]], name: str) -> None:
        self._runner = run
        self._name = name
        self._job: _Job | None = None

    def submit(self, due: dict[str, str]) -> dict[str, str | None]:
        """User -> why it failed, or None while its run is under way; absent: done."""
        errors: dict[str, str | None] = {}
        last = self._job
        if last is not None and not last.done.is_set():
            return dict.fromkeys(due)
        self._job = None
        todo = dict(due)
        if last is not None:
            for user, value in due.items():
                if last.pairs.get(user) == value:
                    del todo[user]
                    if user in last.errors:
                        errors[user] = last.errors[user]
        if todo:
            self._job = _Job(todo)
            threading.Thread(target=self._run, args=(self._job,), name=self._name,
                             daemon=True).start()
            errors.update(dict.fromkeys(todo))
        return errors

    def run_now(self, due: dict[str, str]) -> dict[str, str]:
        job = _Job(dict(due))
        self._run(job)
        return job.errors

    def _run(self, job: _Job) -> None:
        try:
            job.errors = self._runner(job.pairs)
        except Exception as exc:  # reported like a failed run, never lost in a thread
            job.errors = dict.fromkeys(job.pairs, f"{type(exc).__name__}: {exc}")
        finally:
            job.done.set()


class RabbitLogins:
    """Device logins kept by RabbitMQ, changed through an import command and deleted
    through a delete command (`device remove`, `broker.server.login_removal`).

    `background` (the server): the commands run in a thread of their own, so a slow or
    failing one (`rabbitmqctl` takes about 3 s to find a node down) never holds up the
    merge loop; `switch_many` / `delete_many` start a run and report its users as under
    way (None), and report its outcome at the first call after it ended."""

    def __init__(self, import_argv: Sequence[str], timeout_s: float = IMPORT_TIMEOUT_S, *,
                 background: bool = False,
                 delete_argv: Sequence[str] = ("rabbitmqctl", "delete_user")) -> None:
        self.import_argv = tuple(import_argv)
        self.delete_argv = tuple(delete_argv)
        self.timeout_s = timeout_s
        self.background = background
        self._imports = _Background(self._run_import, "rabbitmq-import")
        self._deletes = _Background(self._run_deletes, "rabbitmq-delete-user")

    @property
    def where(self) -> str:
        return "rabbitmq: " + " ".join(self.import_argv)

    @property
    def hint(self) -> str:
        return ("enrol.rabbitmq_import must import a definitions document from its standard "
                "input into the RabbitMQ cluster (try it by hand as the server's user: "
                f"`echo '{{}}' | {' '.join(self.import_argv)}`); the server tries again at "
                "every tick and the device keeps its old password meanwhile")

    def delete_hint(self, user: str) -> str:
        """What an operator runs by hand when the server cannot delete `user`."""
        return (f"enrol.rabbitmq_delete_user must delete a RabbitMQ user named as its last "
                "argument; the server tries again at every tick; by hand: "
                f"`{' '.join(self.delete_argv)} {user}`")

    def begin(self, user: str, new_hash: str) -> None:
        """Nothing: RabbitMQ holds one password per user (see the module docstring)."""

    def switch_many(self, pairs: Sequence[tuple[str, str]]) -> dict[str, str | None]:
        """Set each user's new hash with one import. Returns user -> why it failed, or
        None while its import is under way (background); a user not in it is done."""
        errors: dict[str, str | None] = {
            user: "the rotation's password hash is not a RabbitMQ sha256 hash (it was "
                  "started with another enrol.broker_kind): run rotate-password again"
            for user, new_hash in pairs if not valid_hash(new_hash)}
        good = {u: h for u, h in pairs if u not in errors}
        if not good:
            return errors
        if not self.background:
            errors.update(self._imports.run_now(good))
            return errors
        errors.update(self._imports.submit(good))
        return errors

    def delete_many(self, users: Sequence[str]) -> dict[str, str | None]:
        """Delete each user (one delete command each); a user RabbitMQ does not know is
        done. Returns user -> why it failed, or None while under way (background)."""
        due = dict.fromkeys(users, "")
        if not self.background:
            return dict(self._deletes.run_now(due))
        return self._deletes.submit(due)

    def _run_import(self, pairs: dict[str, str]) -> dict[str, str]:
        try:
            self._import(users_document(list(pairs.items())))
        except RabbitImportError as exc:
            return dict.fromkeys(pairs, str(exc))
        return {}

    def _run_deletes(self, pairs: dict[str, str]) -> dict[str, str]:
        errors: dict[str, str] = {}
        for user in pairs:
            try:
                _run_command([*self.delete_argv, user], None, self.timeout_s)
            except RabbitImportError as exc:
                if not _no_such_user(str(exc)):
                    errors[user] = str(exc)
        return errors

    def retire(self, user: str) -> None:
        """Nothing: the switch replaced the old password."""

    def _import(self, doc: dict[str, Any]) -> None:
        _run_command(list(self.import_argv), json.dumps(doc), self.timeout_s)


def _run_command(argv: list[str], stdin: str | None, timeout_s: float) -> None:
    """Run `argv` (with `stdin`); RabbitImportError saying how it failed."""
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RabbitImportError(f"{argv[0]} did not finish within {timeout_s:.0f} s"
                                ) from exc
    except OSError as exc:
        raise RabbitImportError(f"{argv[0]} could not be run: {exc.strerror or exc}"
                                ) from exc
    if done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip())[-OUTPUT_TAIL:]
        raise RabbitImportError(f"{argv[0]} exited with {done.returncode}: {output}")


def _no_such_user(error: str) -> bool:
    """`rabbitmqctl delete_user` refusing a user that is not there (already deleted, or
    never imported): what the deletion wants holds already."""
    return "does not exist" in error or "no_such_user" in error


__all__ = ["RabbitImportError", "RabbitLogins", "users_document", "valid_hash"]
