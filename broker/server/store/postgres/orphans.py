"""Backends the store lost but the database still runs: ended after a reconnect.

When the link to the database goes silent (a cut cable, a dropping firewall) in the
middle of a transaction, the store's side gives up on the connection (tcp_user_timeout)
and later reconnects. The database's side knows nothing of it: its backend sits "idle in
transaction" waiting for the next statement, holding the transaction's row locks (the
scopes' sequence rows, FOR UPDATE), and nothing ever reaches it to say the client is
gone (no reset crosses a silent link, and once the link is back the client's kernel has
nothing left to send on that connection). It keeps them until
idle_in_transaction_session_timeout (60 s, `store._make_conninfo`), and the first
transaction of the new connection on the same scopes waits behind it all that time: the
merge server stalls for up to a minute after the network came back.

So the store remembers which backend each write connection has (pid and start time, the
pair naming one backend even if the pid is reused later) and, when it drops one as lost,
ends that backend from the new connection before using it (`pg_terminate_backend`; a role
may end its own backends). Its transaction is rolled back unless its COMMIT was already
done: the outcome was unknown to the store either way, and the merge answers a change
that did commit as a duplicate when the device sends it again.

This assumes what the store assumes anyway (a staging TEMP table lives on its write
connection): one backend per connection for the connection's life, so no transaction
pooler in front that could have handed that backend to another client since.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import psycopg
import structlog

log = structlog.get_logger("broker.server.store")


@dataclasses.dataclass(frozen=True, slots=True)
class Backend:
    """One database backend: its pid, and when it started (pids are reused)."""

    pid: int
    started: datetime.datetime


def identify(conn: psycopg.Connection[Any]) -> Backend | None:
    """The backend serving `conn` (None where the database does not say: a role that
    may not see pg_stat_activity's rows, a proxy in front)."""
    try:
        row = conn.execute("SELECT pid, backend_start FROM pg_stat_activity "
                           "WHERE pid = pg_backend_pid()").fetchone()
        conn.rollback()
    except psycopg.Error:
        if conn.broken or conn.closed:
            raise
        conn.rollback()
        return None
    if row is None or row[1] is None:
        return None
    return Backend(int(row[0]), row[1])


def end(conn: psycopg.Connection[Any], lost: list[Backend]) -> None:
    """End the backends in `lost` that still run, from `conn` (a fresh connection, idle),
    and leave `conn` idle. Refused (a role without the right) or failed: logged, and the
    store goes on (a lingering backend then holds its locks until the database's idle
    timeout, as before)."""
    for backend in lost:
        try:
            row = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid = %s AND backend_start = %s", (backend.pid, backend.started)
            ).fetchone()
            conn.rollback()
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                raise
            conn.rollback()
            log.warning("store_lost_backend_not_ended", pid=backend.pid,
                        error=str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            continue
        if row is not None:
            log.info("store_lost_backend_ended", pid=backend.pid, ended=bool(row[0]))


_HUNG = ("SELECT a.pid, extract(epoch FROM now() - a.state_change)::float8, "
         "pg_terminate_backend(a.pid) FROM pg_stat_activity a "
         "WHERE a.datname = current_database() AND a.state = 'idle in transaction' "
         "AND a.pid <> pg_backend_pid() AND a.state_change < now() - make_interval(secs => %s) "
         "AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.granted "
         "AND l.relation = to_regclass(%s) AND l.mode = 'RowShareLock')")


def end_hung(conn: psycopg.Connection[Any], idle_s: float, table: str) -> int:
    """End the backends whose transaction holds rows of `table` locked (FOR UPDATE) and
    has waited for its client's next statement longer than `idle_s`: their server is
    hung (stopped dead, not gone: nothing tells the database, and the backend keeps its
    locks until idle_in_transaction_session_timeout). Its transaction rolls back; woken,
    that server finds its connection ended and runs it again (a change another server
    applied meanwhile is answered as a duplicate). From `conn` (autocommit); how many
    were ended. Refused (a backend of another role): logged, none ended."""
    try:
        rows = conn.execute(_HUNG, (idle_s, table)).fetchall()
    except psycopg.Error as exc:
        if conn.broken or conn.closed:
            raise
        log.warning("store_hung_backend_not_ended",
                    error=str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                    hint="a scope lock stays held until the database's idle timeout "
                         "(60 s): give the store's role the right to end its backends "
                         "(pg_signal_backend) or run every server as one role")
        return 0
    for pid, idle, ended in rows:
        log.warning("store_hung_backend_ended", pid=int(pid), idle_s=round(float(idle), 1),
                    ended=bool(ended),
                    reason="its transaction held scope locks that this server waits for "
                           "and sent nothing for that long: its server is hung (see "
                           "which server's log stops; it resumes by running it again)")
    return sum(1 for row in rows if row[2])


__all__ = ["Backend", "end", "end_hung", "identify"]
