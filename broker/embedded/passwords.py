"""Mosquitto-compatible password files.

One line per user, ``username:hash``. The hash formats are Mosquitto's own, so the same
file works for the embedded amqtt broker (through our auth plugin) and for a real
Mosquitto ``password_file``:

    $7$<iterations>$<base64 salt>$<base64 hash>   PBKDF2-HMAC-SHA512, 64-byte key
                                                  (Mosquitto >= 2.0, what we write)
    $6$<base64 salt>$<base64 hash>                SHA-512 of password + salt
                                                  (Mosquitto <= 1.6; read only)

``mosquitto_passwd`` uses a 12-byte salt and 101 iterations; so do we by default, so a
file we write is indistinguishable from one it writes. Device passwords are random
secrets handed out at enrolment, for which key stretching adds nothing; an operator who
hands out human-chosen passwords can raise ``iterations``.

Writes are atomic (temp file, fsync, rename, fsync of the directory) and leave the file
with mode 0600, so a broker that re-reads the file never sees half of it.

The *overlap file* (``<password file>.rotating``, same line format, several lines per
user allowed) holds the extra hashes the embedded broker accepts while a device's
password is rotated (`broker.server.rotation`): the new one until the device has it,
then the old one until it logged in with the new. Mosquitto does not read it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from waystation.errors import ConfigError

__all__ = [
    "DEFAULT_ITERATIONS",
    "add_overlap",
    "delete_password_entry",
    "drop_overlap",
    "hash_password",
    "overlap_path",
    "read_overlap",
    "read_password_file",
    "verify_password",
    "write_hash_entry",
    "write_password_entry",
]

DEFAULT_ITERATIONS = 101
"""What ``mosquitto_passwd`` 2.0 uses."""

SALT_BYTES = 12
"""What ``mosquitto_passwd`` uses."""

_KEY_BYTES = 64
_MAX_ITERATIONS = 10_000_000  # refuse absurd counts read from a file (a cheap DoS otherwise)


def hash_password(
    password: str, *, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> str:
    """Hash ``password`` in Mosquitto 2.0's ``$7$`` (PBKDF2-SHA512) format."""
    if iterations < 1 or iterations > _MAX_ITERATIONS:
        raise ValueError(f"iterations must be between 1 and {_MAX_ITERATIONS}, not {iterations}")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, _KEY_BYTES)
    return f"$7${iterations}${_b64(salt)}${_b64(key)}"


def verify_password(stored: str, password: str) -> bool:
    """True when ``password`` matches ``stored`` (``$7$`` or ``$6$``); False for anything else.

    Never raises on a malformed hash: a damaged line simply matches no password.
    """
    parts = stored.strip().split("$")
    try:
        if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
            iterations = int(parts[2])
            if iterations < 1 or iterations > _MAX_ITERATIONS:
                return False
            salt = base64.b64decode(parts[3], validate=True)
            expected = base64.b64decode(parts[4], validate=True)
            if not expected:
                return False
            actual = hashlib.pbkdf2_hmac(
                "sha512", password.encode("utf-8"), salt, iterations, len(expected)
            )
            return hmac.compare_digest(actual, expected)
        if len(parts) == 4 and parts[0] == "" and parts[1] == "6":
            salt = base64.b64decode(parts[2], validate=True)
            expected = base64.b64decode(parts[3], validate=True)
            actual = hashlib.sha512(password.encode("utf-8") + salt).digest()
            return hmac.compare_digest(actual, expected)
    except (ValueError, binascii.Error):
        return False
    return False


def read_password_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read ``username:hash`` lines into a dict; blank lines and ``#`` comments are skipped.

    Raises FileNotFoundError when the file does not exist and ConfigError for a line
    without a ``:``. A later line for the same user wins, as in Mosquitto.
    """
    users: dict[str, str] = {}
    text = Path(path).read_text(encoding="utf-8")
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"{path}, line {number}: expected 'username:hash'")
        users[user] = stored
    return users


def write_password_entry(
    path: str | os.PathLike[str],
    user: str,
    password: str,
    *,
    iterations: int = DEFAULT_ITERATIONS,
) -> None:
    """Add ``user`` or replace its password, atomically; creates the file (mode 0600)."""
    _check_username(user)
    _rewrite(Path(path), user, hash_password(password, iterations=iterations))


def write_hash_entry(path: str | os.PathLike[str], user: str, stored: str) -> None:
    """Add ``user`` or replace its hash (already in the file's format), atomically."""
    _check_username(user)
    _rewrite(Path(path), user, stored)


def overlap_path(password_file: str | os.PathLike[str]) -> Path:
    """The overlap file of ``password_file`` (see the module docstring)."""
    path = Path(password_file)
    return path.with_name(path.name + ".rotating")


def read_overlap(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """User -> the extra hashes it may log in with; {} when there is no overlap file."""
    out: dict[str, list[str]] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if not sep or not user:
            raise ConfigError(f"{path}, line {number}: expected 'username:hash'")
        out.setdefault(user, []).append(stored)
    return out


def add_overlap(password_file: str | os.PathLike[str], user: str, stored: str) -> None:
    """Let ``user`` log in with ``stored`` too (idempotent)."""
    _check_username(user)
    path = overlap_path(password_file)
    held = read_overlap(path)
    if stored in held.get(user, []):
        return
    held.setdefault(user, []).append(stored)
    _atomic_write(path, _overlap_text(held))


def drop_overlap(password_file: str | os.PathLike[str], user: str) -> bool:
    """Forget every extra hash of ``user``; False when it had none."""
    path = overlap_path(password_file)
    held = read_overlap(path)
    if user not in held:
        return False
    del held[user]
    _atomic_write(path, _overlap_text(held))
    return True


def _overlap_text(held: dict[str, list[str]]) -> str:
    return "".join(f"{user}:{stored}\n" for user, hashes in sorted(held.items())
                   for stored in hashes)


def delete_password_entry(path: str | os.PathLike[str], user: str) -> bool:
    """Remove ``user`` atomically; returns False when it was not in the file."""
    target = Path(path)
    try:
        present = user in read_password_file(target)
    except FileNotFoundError:
        return False
    if present:
        _rewrite(target, user, None)
    return present


def _rewrite(path: Path, user: str, stored: str | None) -> None:
    """Replace (or drop, when ``stored`` is None) the line for ``user``; keep all others."""
    try:
        old_lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        old_lines = []
    lines: list[str] = []
    replaced = False
    for raw in old_lines:
        name, sep, _ = raw.strip().partition(":")
        if sep and name == user and not raw.lstrip().startswith("#"):
            if stored is not None and not replaced:
                lines.append(f"{user}:{stored}")
            replaced = True
            continue
        lines.append(raw)
    if stored is not None and not replaced:
        lines.append(f"{user}:{stored}")
    _atomic_write(path, "".join(line + "\n" for line in lines))


def _atomic_write(path: Path, text: str) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    # The broker reads this file as another user (Mosquitto runs as `mosquitto`): a
    # rewrite keeps the existing file's mode and group, or Mosquitto could no longer
    # read it after the first enrolment. A new file is 0600 (root-run brokers).
    try:
        old = path.stat()
        mode, gid = old.st_mode & 0o7777, old.st_gid
    except FileNotFoundError:
        mode, gid = 0o600, -1
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            if gid != -1 and os.fstat(tmp.fileno()).st_gid != gid:
                # Allowed for root and for members of that group; otherwise the
                # directory's setgid bit is what gives the file the broker's group.
                with contextlib.suppress(PermissionError):
                    os.fchown(tmp.fileno(), -1, gid)
            os.fchmod(tmp.fileno(), mode)
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_username(user: str) -> None:
    if not user or ":" in user or any(ch in user for ch in "\r\n") or user != user.strip():
        raise ValueError(f"invalid username for a password file: {user!r}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
