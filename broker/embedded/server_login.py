"""The merge server's broker login on a single machine, made up when nobody set one.

`waystation broker run` and `waystation server run` started with no config files on one
machine must find each other: the broker logs devices and the server in through its
password file, and the server would have no password to give. So when the broker's
password file has no login for any of its `server_users`, `broker run` generates one:
a random password, its hash added to the password file for the first server user, and
the password itself in ``<broker data_dir>/server-password`` (mode 0600). `server run`
without a configured password reads that file (see `server_password_file`), from the
broker's data_dir as the broker config and its WAYSTATION_BROKER__* environment
overrides name it: the same default location when neither is configured.

Nothing is generated when a server login exists already (an operator ran `broker
passwd`, or uses Mosquitto); a generated file that no longer matches the login is
reported, not overwritten.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import structlog

from broker.embedded.passwords import read_password_file, verify_password, write_password_entry

log = structlog.get_logger(__name__)

SERVER_PASSWORD_NAME = "server-password"


def server_password_file(broker_data_dir: Path) -> Path:
    """Where `broker run` keeps the server password it generated."""
    return Path(broker_data_dir) / SERVER_PASSWORD_NAME


def ensure_server_login(password_file: Path, broker_data_dir: Path,
                        server_users: Sequence[str]) -> Path | None:
    """Give the server a login when the password file has none; returns the file holding
    the generated password (None when the operator's login is kept)."""
    if not server_users:
        return None
    user = server_users[0]
    secret_file = server_password_file(broker_data_dir)
    try:
        logins = read_password_file(password_file)
    except FileNotFoundError:
        logins = {}
    kept = _read_secret(secret_file)
    present = [u for u in server_users if u in logins]
    if present:
        if kept is not None and user in logins and not verify_password(logins[user], kept):
            log.warning("server_password_stale", path=str(secret_file), user=user,
                        hint="the login was changed with `broker passwd`; remove the file "
                             "or configure the server's mqtt.password_file")
        return None
    password = kept if kept is not None else secrets.token_urlsafe(24)
    if kept is None:
        _write_secret(secret_file, password)
    write_password_entry(password_file, user, password)
    log.info("server_login_generated", user=user, password_file=str(password_file),
             server_password_file=str(secret_file),
             hint="`waystation server run` on this machine reads it when no mqtt password "
                  "is configured")
    if not set(logins) - set(server_users):
        log.warning("the password file holds the server's login only: no device can "
                    "connect until one is enrolled (`waystation device add`)",
                    path=str(password_file))
    return secret_file


class AwaitedServerPassword:
    """The password `broker run` is yet to generate, for a `server run` started first
    on this machine (`waystation.mqtt_hooks.PasswordProvider`): read anew before each
    connection attempt, so the server logs in as soon as the broker has made it. Before,
    the server read the file once at start and stayed refused until restarted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._found = False

    def password(self) -> str | None:
        try:
            secret = _read_secret(self.path)
        except OSError:
            return None  # unreadable for now: the attempt is refused and logged as such
        if secret is not None and not self._found:
            self._found = True
            log.info("server_password_generated_used", path=str(self.path), late=True)
        return secret

    def refused(self) -> None:
        """Nothing to switch to: the next attempt reads the file again."""

    def accepted(self) -> None:
        """Nothing to remember."""


def _read_secret(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    password = text.removesuffix("\n")
    return password or None


def _write_secret(path: Path, password: str) -> None:
    """Write the password with mode 0600 from the start (never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(password + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


__all__ = ["SERVER_PASSWORD_NAME", "ensure_server_login", "server_password_file"]
