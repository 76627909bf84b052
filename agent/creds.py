"""The device's broker passwords, and changing them when the server says so.

The operator rotates a device's broker password (`waystation device rotate-password`);
the server sends the new one in a `creds` command (PROTOCOL.md §7.9, capability
`creds`). The broker accepts the old and the new one for a while, so the device is
never locked out, provided it follows three rules, which this module keeps:

1. Store the new password durably (``<data_dir>/broker-credentials.json``, mode 0600,
   temp file + fsync + rename) *before* the command is reported done. A crash before
   that leaves the old password, which still works: the server sends the command again.
2. Log in with the newest password first and fall back to the older ones when the
   broker refuses it (Mosquitto holds one password per user: until the server switched
   its password file, only the old one works there).
3. Forget the old password only after a login with the new one succeeded.

`BrokerCredentials` is what `waystation.mqtt.MqttLink` asks before each connection
attempt (`PasswordProvider`); it is called from the link's network thread and from the
agent's engine thread, hence the lock.

An operator who edits the password in the agent config afterwards (a device without
the capability, rotated by hand) is followed: the stored passwords become fallbacks.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.login_choice import LoginChoice
from schemas.wire import ID_PATTERN
from waystation.atrest.files import write_atomic

log = structlog.get_logger(__name__)

FILE_NAME = "broker-credentials.json"
FORMAT = 1
MIN_PASSWORD = 16
MAX_PASSWORD = 256
_PASSWORD_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no blanks: one line in a file
_ID_RE = re.compile(ID_PATTERN)
_MAX_FILE = 8192
MAX_PENDING = 4
"""Received passwords kept until one of them logged the device in."""


class BadCreds(ValueError):
    """A `creds` command the device refuses: malformed, for another device, or older
    than the rotation it already holds (a replay)."""


@dataclass(frozen=True)
class Secret:
    """One rotated password: the rotation id, when it was ordered (ms), the password."""

    rotation: str
    t: int
    password: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.rotation, "t": self.t, "pw": self.password}

    @classmethod
    def from_json(cls, data: Any) -> Secret | None:
        if not isinstance(data, dict):
            return None
        rid, t, pw = data.get("id"), data.get("t"), data.get("pw")
        if not (isinstance(rid, str) and isinstance(t, int) and isinstance(pw, str)):
            return None
        return cls(rid, t, pw)


def parse(args: Any, dev: str) -> Secret:
    """The new password of a `creds` command's `args` ({dev, rotation, t, password}),
    checked: it must name this device, a rotation id, a time and a usable password."""
    if not isinstance(args, dict):
        raise BadCreds("args must be an object")
    if args.get("dev") != dev:
        raise BadCreds(f"the password is for device {args.get('dev')!r}, not {dev!r}")
    rid, t, pw = args.get("rotation"), args.get("t"), args.get("password")
    if not isinstance(rid, str) or not _ID_RE.fullmatch(rid):
        raise BadCreds("args.rotation must be a rotation id")
    if not isinstance(t, int) or isinstance(t, bool) or not 0 < t < 2**53:
        raise BadCreds("args.t must be a positive integer (ms)")
    if (not isinstance(pw, str) or not MIN_PASSWORD <= len(pw) <= MAX_PASSWORD
            or not _PASSWORD_RE.fullmatch(pw)):
        raise BadCreds(f"args.password must be {MIN_PASSWORD} to {MAX_PASSWORD} printable "
                       "ASCII characters without blanks")
    return Secret(rid, t, pw)


def fingerprint(password: str | None) -> str:
    """Tells whether the configured password changed, without keeping a second copy."""
    if password is None:
        return ""
    return hashlib.sha256(password.encode("utf-8")).hexdigest()[:32]


class BrokerCredentials:
    """The passwords this device may log in with, newest first (see module docstring).

    ``current``: the rotated password it last logged in with; ``pending``: passwords
    received since, not yet used for a login, newest first. Older pending ones are kept
    too: a rotation superseded after the server switched the broker to it must still
    log the device in, or the device could not report the newer one.
    """

    def __init__(self, data_dir: Path, configured: str | None) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._configured = configured
        self._lock = threading.Lock()
        self._current: Secret | None = None
        self._pending: list[Secret] = []
        self._cfg = fingerprint(configured)
        self._choice: LoginChoice[Secret, str] = LoginChoice()
        self._login: Secret | None = None
        self._load()

    # ------------------------------------------------------------- the command

    def offer(self, secret: Secret) -> bool:
        """Store the password of a `creds` command durably; True when stored now or
        already (a resent command), BadCreds when it is older than what the device holds.
        Returns only once the file is on disk."""
        with self._lock:
            held = self._pending + ([] if self._current is None else [self._current])
            if any(s.rotation == secret.rotation for s in held):
                return True
            newest = max((s.t for s in held), default=0)
            if secret.t <= newest:
                raise BadCreds(f"rotation {secret.rotation} is older than the one this "
                               "device holds (a replay)")
            pending = [secret, *self._pending][:MAX_PENDING]
            # On disk first: a password that could not be saved is never used.
            self._save(self._current, pending, self._cfg)
            self._pending = pending
            self._choice.restart()
        log.warning("broker_password_received", rotation=secret.rotation,
                    path=str(self.path))
        return True

    @property
    def login_rotation(self) -> str | None:
        """The rotation whose password the live connection logged in with (None: the
        configured password): what `hello.cred` reports."""
        with self._lock:
            return None if self._login is None else self._login.rotation

    @property
    def pending_rotation(self) -> str | None:
        """The newest rotation received but not yet used for a login."""
        with self._lock:
            return self._pending[0].rotation if self._pending else None

    # ------------------------------------------------------------- PasswordProvider

    def password(self) -> str | None:
        """The password for the next connection attempt."""
        with self._lock:
            return self._choice.pick(self._candidates())

    def refused(self) -> None:
        """The broker refused the password just tried: try the next one next time."""
        with self._lock:
            tried = self._choice.refused()
        if tried is not None:
            log.warning("broker_password_refused", rotation=tried.rotation,
                        hint="falling back to the previous password")

    def accepted(self) -> None:
        """The broker accepted the password just tried: a received one becomes the
        current one, and everything older is forgotten."""
        with self._lock:
            used = self._login = self._choice.accepted()
            if used is None or used not in self._pending:
                return
            pending = [s for s in self._pending if s.t > used.t]
            cfg = fingerprint(self._configured)
            self._save(used, pending, cfg)  # if this fails, the next login does it
            self._current, self._pending, self._cfg = used, pending, cfg
        log.warning("broker_password_rotated", rotation=used.rotation)

    # ------------------------------------------------------------- internals

    def _candidates(self) -> list[tuple[Secret | None, str]]:
        stored = [(s, s.password) for s in self._pending]
        if self._current is not None:
            stored.append((self._current, self._current.password))
        configured = [] if self._configured is None else [(None, self._configured)]
        edited = self._current is not None and self._cfg != fingerprint(self._configured)
        ordered = configured + stored if edited else stored + configured
        out: list[tuple[Secret | None, str]] = []
        for secret, pw in ordered:
            if all(pw != seen for _, seen in out):
                out.append((secret, pw))
        return out

    def _load(self) -> None:
        try:
            doc = read_private(self.path, _MAX_FILE, FORMAT)
        except OSError as exc:
            log.error("broker_credentials_unreadable", path=str(self.path), error=str(exc),
                      hint="using the configured password; fix the file's permissions")
            return
        except ValueError:
            log.error("broker_credentials_damaged", path=str(self.path),
                      hint="using the configured password; if the broker refuses it, write "
                           "the device's current password into its agent config")
            return
        if doc is None:
            return
        self._current = Secret.from_json(doc.get("current"))
        pending = doc.get("pending")
        loaded = [Secret.from_json(s) for s in pending] if isinstance(pending, list) else []
        self._pending = sorted((s for s in loaded if s is not None), key=lambda s: -s.t)
        cfg = doc.get("cfg")
        self._cfg = cfg if isinstance(cfg, str) else ""

    def _save(self, current: Secret | None, pending: list[Secret], cfg: str) -> None:
        doc = {"v": FORMAT, "cfg": cfg,
               "current": None if current is None else current.to_json(),
               "pending": [s.to_json() for s in pending]}
        write_private(self.path, json.dumps(doc, sort_keys=True).encode("utf-8"))


def write_private(path: Path, data: bytes) -> None:
    """Temp file (0600 from the start) -> fsync -> rename -> fsync of the directory."""
    write_atomic(path, data)


def read_private(path: Path, max_bytes: int, version: int) -> dict[str, Any] | None:
    """A small JSON state file written by `write_private` (a JSON object with "v":
    `version`); None when there is none. OSError: unreadable; ValueError: damaged (over
    `max_bytes`, not JSON, another format)."""
    try:
        raw = path.read_bytes()[:max_bytes + 1]
    except FileNotFoundError:
        return None
    if len(raw) > max_bytes:
        raise ValueError(f"{path}: over {max_bytes} bytes")
    doc = json.loads(raw)  # a JSONDecodeError is a ValueError
    if not isinstance(doc, dict) or doc.get("v") != version:
        raise ValueError(f"{path}: not format {version}")
    return doc


__all__ = ["FILE_NAME", "BadCreds", "BrokerCredentials", "Secret", "fingerprint", "parse",
           "read_private", "write_private"]
