"""The broker-side steps of a password rotation on a RabbitMQ fleet (`enrol.broker_kind =
"rabbitmq"`): RabbitMQ keeps its own users, one password each, so

    begin   nothing (RabbitMQ takes only the old password until the switch)
    switch  the device's user gets the new salted hash: a definitions document with only
            that user is written to `enrol.rabbitmq_import` on its standard input
            (`rabbitmqctl import_definitions` by default), so neither the password nor
            its hash appears on a command line (`ps`)
    retire  nothing (the switch already replaced the old password)

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
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RabbitLogins:
    """Device logins kept by RabbitMQ, changed through an import command."""

    import_argv: Sequence[str]
    timeout_s: float = IMPORT_TIMEOUT_S

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

    def switch(self, user: str, new_hash: str) -> None:
        errors = self.switch_many([(user, new_hash)])
        if user in errors:
            raise RabbitImportError(errors[user])

    def switch_many(self, pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
        """Set each user's new hash with one import; returns user -> why it failed."""
        errors = {user: "the rotation's password hash is not a RabbitMQ sha256 hash (it was "
                        "started with another enrol.broker_kind): run rotate-password again"
                  for user, new_hash in pairs if not valid_hash(new_hash)}
        good = [(u, h) for u, h in pairs if u not in errors]
        if not good:
            return errors
        try:
            self._import(users_document(good))
        except RabbitImportError as exc:
            errors.update({user: str(exc) for user, _ in good})
        return errors

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
