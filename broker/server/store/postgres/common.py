"""Shared pieces of the PostgreSQL store: constants, migrations, SQL helpers."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict

from broker.errors import StoreError

T = TypeVar("T")

SCHEMA = "waystation"
"""The PostgreSQL schema (namespace) holding every table of the store."""

ADVISORY_LOCK = 0x5761797374617469
"""pg_advisory_xact_lock key serialising migrations ("Waystati")."""

SCHEMA_LOCK = 0x5761797363686D61
"""Advisory lock key of the live collection schema ("Wayschma"): merges hold it shared,
`schema publish` / `rollback` exclusively (`WriteTxn.guard_schema`)."""
DEFAULT_MAX_DEAD_LETTERS = 100_000
"""The default of DeadLetterLimits.max_count (kept for callers of the old name)."""
MAX_ATTEMPTS = 30
"""Attempts of one transaction that keeps meeting concurrency failures."""
LOCK_WAIT_MS = 2000
"""A write transaction waits this long at most for a scope lock at a time (lock_timeout,
set with its schema lock); then it looks for a hung holder (`orphans.end_hung`) and
tries again, as long as it takes (a waiter never gives up on a holder that works)."""
HUNG_IDLE_S = 10
"""A write transaction that holds scope locks and has sent nothing for this long, while
another one waits for them, is hung (its server stopped dead: SIGSTOP, a paused VM, a
process stuck on a dead disk): the waiter ends its backend. The database would keep its
locks until its idle timeout (60 s) and the whole server group would wait behind it for
the scopes it held. Far above the longest pause between two statements of a working
server (a group's merge between its reads and its commit: well under a second)."""
PREFETCH_MAX = 16 * 1024
"""Catch-up reads prefetch record states up to this size with the index page."""
COPY_MIN = 64
"""Buffered writes of at least this many rows go by binary COPY, fewer by one INSERT."""
_MIGRATION_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_RETRYABLE = ("40001", "40P01", "23505", "55P03")
_RECONNECT = ("57P01", "57P02", "57P03", "25006")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migrations this code knows, in version order (``migrations/NNNN_name.sql``)."""
    out = []
    for entry in resources.files("broker.server.store").joinpath("migrations").iterdir():
        m = _MIGRATION_RE.match(entry.name)
        if m:
            out.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    out.sort(key=lambda m: m.version)
    if [m.version for m in out] != list(range(1, len(out) + 1)):
        raise StoreError("the store's migrations are not numbered 1, 2, 3, ... "
                         "(broken installation)")
    return out


def describe_url(url: str) -> str:
    """`url` without its password: postgresql://user@host:port/dbname, or for a Unix
    socket (a host that is a directory, or none: libpq's default socket)
    postgresql://user@/dbname?host=DIR&port=PORT, the form libpq reads back."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    user = str(params.get("user") or "")
    host = str(params.get("host") or params.get("hostaddr") or "")
    port = str(params.get("port") or "")
    db = str(params.get("dbname") or user or "")
    who = user + "@" if user else ""
    if host and not host.startswith("/"):
        return f"postgresql://{who}{host}:{port or '5432'}/{db}"
    query = "&".join(f"{k}={v}" for k, v in (("host", host), ("port", port)) if v)
    return f"postgresql://{who}/{db}" + (f"?{query}" if query else "")


class _Reorder(Exception):
    """A scope below one already held is locked by another transaction: rerun the
    transaction with all these scopes locked first, in order."""

    def __init__(self, scopes: set[str]) -> None:
        super().__init__("scope lock order")
        self.scopes = scopes


class _Blocked(_Reorder):
    """A scope lock waited LOCK_WAIT_MS: end a hung holder, if any, and try again."""

    def __init__(self, scopes: set[str]) -> None:
        super().__init__(scopes)
        self.args = ("scope lock wait",)


def _sqlstate(exc: BaseException) -> str:
    return getattr(exc, "sqlstate", None) or ""


def _text_array(values: Iterable[str]) -> str:
    """A text[] literal (quicker to build than psycopg's element-wise array dump)."""
    return "{" + ",".join(['"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                           for v in values]) + "}"


def _int_array(values: Iterable[int]) -> str:
    """An int8[] literal."""
    return "{" + ",".join(map(str, values)) + "}"


def _clean(text: str) -> str:
    """PostgreSQL text cannot hold NUL."""
    return text.replace("\x00", "\\x00") if "\x00" in text else text
