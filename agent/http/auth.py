"""Tokens per app for the local API: issued once, stored hashed, checked on every request.

A token reads ``wst_<id>_<secret>``: `id` (8 hex digits) finds its entry without trying
every hash, `secret` is 32 random bytes (url-safe base64). The file `api-tokens.json` in
the store's directory (mode 0600, rewritten atomically: temp file, fsync, rename) keeps,
per token, the app name, its read and write rights (collection names, or ``*`` for
all) and ``scrypt(secret, salt)``. The secret itself is never stored: it is shown once
by `waystation agent token add` and cannot be shown again.

A request's token is verified with scrypt and a constant-time compare; a verified token
is remembered (by its SHA-256) until the file changes, so scrypt runs once per token and
file version, not per request. An unknown id is refused without hashing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from agent.errors import AgentError, BadRequest, NotFound

TOKENS_FILE = "api-tokens.json"
_FORMAT = 1
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32, "maxmem": 64 * 1024 * 1024}
_TOKEN_RE = re.compile(r"wst_([0-9a-f]{8})_([A-Za-z0-9_-]{43})")
_APP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_TOKENS = 256
_MAX_HEADER = 200


class TokenFileError(AgentError):
    """The token file cannot be read or written (its path and what to do are named)."""

    exit_code = 2


@dataclass(frozen=True)
class AppToken:
    """One app's token entry (without the secret)."""

    id: str
    app: str
    read: tuple[str, ...]
    write: tuple[str, ...]
    created_ms: int

    def can_read(self, collection: str) -> bool:
        return "*" in self.read or collection in self.read or self.can_write(collection)

    def can_write(self, collection: str) -> bool:
        return "*" in self.write or collection in self.write

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "app": self.app, "read": list(self.read),
                "write": list(self.write), "created_ms": self.created_ms}


APP: web.RequestKey[AppToken] = web.RequestKey("app", AppToken)
"""Where the auth middleware puts the verified app of a request."""


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class TokenStore:
    """The token file of one store directory; safe to share between threads."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / TOKENS_FILE
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, dict[str, Any]] = {}
        self._verified: dict[bytes, AppToken] = {}

    # ---------------------------------------------------------------- the file

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenFileError(f"cannot read the API token file {self.path}: "
                                 f"{exc.strerror or exc}") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> None:
        """(Re)read the file if it changed since the last look (caller holds the lock)."""
        stamp = self._file_stamp()
        if stamp == self._stamp and (stamp is not None or not self._entries):
            return
        entries: dict[str, dict[str, Any]] = {}
        if stamp is not None:
            try:
                doc = orjson.loads(self.path.read_bytes())
                if doc.get("format") != _FORMAT or not isinstance(doc.get("tokens"), list):
                    raise ValueError("not a Waystation API token file (format 1)")
                for entry in doc["tokens"]:
                    entries[str(entry["id"])] = entry
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise TokenFileError(f"the API token file {self.path} is unreadable ({exc}); "
                                     "remove it and issue the tokens again") from None
        self._entries = entries
        self._stamp = stamp
        self._verified.clear()

    def _save(self, entries: Iterable[dict[str, Any]]) -> None:
        doc = {"format": _FORMAT, "tokens": list(entries)}
        tmp = self.path.with_name(f".{TOKENS_FILE}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise TokenFileError(f"cannot write the API token file {self.path}: "
                                 f"{exc.strerror or exc}") from None

    # ---------------------------------------------------------------- commands

    def add(self, app: str, read: Iterable[str], write: Iterable[str]) -> tuple[str, AppToken]:
        """Issue a token for `app`; returns (the token, shown once; its entry)."""
        if not _APP_RE.fullmatch(app):
            raise BadRequest("invalid", f"app name {app!r}: use 1-64 letters, digits, '.', "
                                        "'_' or '-', starting with a letter or digit")
        rights_r, rights_w = _rights(read), _rights(write)
        if not rights_r and not rights_w:
            raise BadRequest("invalid", "a token needs --read or --write (collection names, "
                                        "or '*' for all)")
        with self._lock:
            self._load()
            if len(self._entries) >= MAX_TOKENS:
                raise BadRequest("invalid", f"this store already has {MAX_TOKENS} tokens: "
                                            "remove unused ones first")
            token_id = secrets.token_hex(4)
            while token_id in self._entries:
                token_id = secrets.token_hex(4)
            secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
            salt = secrets.token_bytes(16)
            entry = {"id": token_id, "app": app, "read": list(rights_r),
                     "write": list(rights_w), "created_ms": time.time_ns() // 1_000_000,
                     "salt": _b64(salt), "hash": _b64(_hash(secret, salt))}
            self._save([*self._entries.values(), entry])
            self._stamp = None
            self._load()
        return f"wst_{token_id}_{secret}", _public(entry)

    def list(self) -> list[AppToken]:
        with self._lock:
            self._load()
            return [_public(e) for e in self._entries.values()]

    def remove(self, ident: str) -> int:
        """Remove tokens by id or by app name; returns how many."""
        with self._lock:
            self._load()
            keep = [e for e in self._entries.values() if ident not in (e["id"], e["app"])]
            gone = len(self._entries) - len(keep)
            if not gone:
                raise NotFound(f"no API token with id or app name {ident!r}")
            self._save(keep)
            self._stamp = None
            self._load()
            return gone

    # ---------------------------------------------------------------- checking

    def verify(self, header: str | None) -> AppToken | None:
        """The app of an ``Authorization: Bearer <token>`` header, or None."""
        if not header or len(header) > _MAX_HEADER:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        token = token.strip()
        match = _TOKEN_RE.fullmatch(token)
        if match is None:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        with self._lock:
            self._load()
            known = self._verified.get(digest)
            if known is not None:
                return known
            entry = self._entries.get(match.group(1))
            if entry is None:
                return None
        try:
            expected = base64.b64decode(entry["hash"])
            actual = _hash(match.group(2), base64.b64decode(entry["salt"]))
        except (ValueError, KeyError, TypeError):
            return None
        if not hmac.compare_digest(expected, actual):
            return None
        app = _public(entry)
        with self._lock:
            if self._entries.get(app.id) is entry:
                self._verified[digest] = app
        return app


def _rights(names: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for raw in names:
        for name in str(raw).split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return tuple(out)


def _public(entry: dict[str, Any]) -> AppToken:
    return AppToken(id=entry["id"], app=entry["app"], read=tuple(entry["read"]),
                    write=tuple(entry["write"]), created_ms=int(entry["created_ms"]))


__all__ = ["APP", "TOKENS_FILE", "AppToken", "TokenFileError", "TokenStore"]
