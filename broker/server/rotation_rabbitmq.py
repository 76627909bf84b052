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
merge loop must not wait for it. A failed import is retried at every tick.

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
from collections.abc import Sequence
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
class _Import:
    """One import under way in its own thread."""

    pairs: dict[str, str]
    done: threading.Event = field(default_factory=threading.Event)
    errors: dict[str, str] = field(default_factory=dict)


class RabbitLogins:
    """Device logins kept by RabbitMQ, changed through an import command.

    `background` (the server): the command runs in a thread of its own, so a slow or
    failing one (`rabbitmqctl` takes about 3 s to find a node down) never holds up the
    merge loop; `switch_many` starts an import and reports its users as under way
    (None), and reports its outcome at the first call after it ended."""

    def __init__(self, import_argv: Sequence[str], timeout_s: float = IMPORT_TIMEOUT_S, *,
                 background: bool = False) -> None:
        self.import_argv = tuple(import_argv)
        self.timeout_s = timeout_s
        self.background = background
        self._job: _Import | None = None

    @property
    def where(self) -> str:
        return "rabbitmq: " + " ".join(self.import_argv)

    @property
    def hint(self) -> str:
        return ("enrol.rabbitmq_import must import a definitions document from its standard "
                "input into the RabbitMQ cluster (try it by hand as the server's user: "
                f"`echo '{{}}' | {' '.join(self.import_argv)}`); the server tries again at "
                "every tick and the device keeps its old password meanwhile")

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
            now = _Import(good)
            self._run(now)
            errors.update(now.errors)
            return errors
        last = self._job
        if last is not None and not last.done.is_set():
            errors.update(dict.fromkeys(good))
            return errors
        self._job = None
        if last is not None:
            # Its outcome holds for the users still due with the hash it imported.
            for user, new_hash in list(good.items()):
                if last.pairs.get(user) == new_hash:
                    del good[user]
                    if user in last.errors:
                        errors[user] = last.errors[user]
        if good:
            self._job = _Import(good)
            threading.Thread(target=self._run, args=(self._job,), name="rabbitmq-import",
                             daemon=True).start()
            errors.update(dict.fromkeys(good))
        return errors

    def _run(self, job: _Import) -> None:
        try:
            self._import(users_document(list(job.pairs.items())))
        except RabbitImportError as exc:
            job.errors = dict.fromkeys(job.pairs, str(exc))
        except Exception as exc:  # reported like a failed import, never lost in a thread
            job.errors = dict.fromkeys(job.pairs, f"{type(exc).__name__}: {exc}")
        finally:
            job.done.set()

    def retire(self, user: str) -> None:
        """Nothing: the switch replaced the old password."""

    def _import(self, doc: dict[str, Any]) -> None:
        argv = list(self.import_argv)
        try:
            done = subprocess.run(argv, input=json.dumps(doc), capture_output=True, text=True,
                                  timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RabbitImportError(f"{argv[0]} did not finish within {self.timeout_s:.0f} s"
                                    ) from exc
        except OSError as exc:
            raise RabbitImportError(f"{argv[0]} could not be run: {exc.strerror or exc}"
                                    ) from exc
        if done.returncode != 0:
            output = (done.stderr.strip() or done.stdout.strip())[-OUTPUT_TAIL:]
            raise RabbitImportError(f"{argv[0]} exited with {done.returncode}: {output}")


__all__ = ["RabbitImportError", "RabbitLogins", "users_document", "valid_hash"]
