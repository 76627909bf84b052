"""Merge-server liveness: each server records itself in the store, and the operator's
`server status` / `server devices` tell from those rows whether any server runs (pure).

Why: the devices' presence in the store is as the last server left it (the engine keeps
it across restarts on purpose). With no server running, nobody corrects it, and a
console that says "online" would mislead. So each server keeps a `ServerRow` per
`server_id`:

    started_ms   when this run of the server started
    seen_ms      refreshed by the engine's once-a-second tick, but written at most every
                 `SEEN_EVERY_MS` (one small row upsert per server every 5 s)
    stopped_ms   written by a clean stop (`Engine.flush(stopping=True)`); 0 while it
                 runs, and after a crash
    broker_down_ms  since when it has not been connected to its broker (0: connected),
                 written at the next tick after the link went down or came back: a
                 server that runs but cannot reach the broker merges nothing, and its
                 presence of devices goes stale like a stopped server's
    store_failing_ms, store_error  since when its store refuses its writes, and the
                 latest refusal (a full disk; PostgreSQL that refuses or does not come
                 back), written by the next tick that gets its row through (a small
                 write may pass where a batch does not); cleared by the next batch of
                 devices' messages the store takes. A store that takes no write at all
                 leaves `seen_ms` to go stale instead: the server is then "gone".

A server is "running" when it did not stop cleanly and was seen within the stale
threshold (`STALE_AFTER_S` = 30 s, six missed writes: a slow tick or a store hiccup is
not a crash); `--stale-after` of the CLI overrides it. Times are wall clocks: a CLI on
another host (PostgreSQL) compares its clock with the server's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import Any

from broker.server.store.rows import ServerRow
from waystation.timefmt import ago, iso, span

SEEN_EVERY_MS = 5_000
"""How often a running server rewrites its `seen_ms`, at most."""
STALE_AFTER_S = 30
_ERROR_CHARS = 300
"""A store's refusal is kept this long in the row (the log has it whole)."""
"""How long after its last `seen_ms` a server that did not stop cleanly counts as gone."""
BROKER_HINT = ("check that the broker runs and that the server's [mqtt] host, port and "
               "login (on RabbitMQ: its [amqp] nodes and that login) are right, and that "
               "the network between them passes (its log says why: `mqtt connection "
               "attempt failed`, `link_problem`, `amqp_connection_failed`)")
STORE_HINT = ("fix what the error names (free disk space, a PostgreSQL that runs and "
              "takes writes); the server's log has each refusal (`store_failed`)")
START_HINT = ("start it: `systemctl start waystation-server` (see `systemctl status "
              "waystation-server` and `journalctl -u waystation-server` for why it stopped), "
              "or `waystation server run`")


def start_hint(config: str | None = None) -> str:
    """START_HINT for the command that asks: one given `--config FILE` names it, since a
    bare `waystation server run` would start a server on ./waystation-data, another
    store than the one this command read."""
    if config is None:
        return START_HINT
    return START_HINT.removesuffix("`waystation server run`") + (
        f"`waystation server run --config {config}` for a server run by hand")


class Heartbeat:
    """The row a server writes about itself, and when it is due (one engine's)."""

    def __init__(self, server_id: str, group: str, version: str, started_ms: int,
                 proc: str = "") -> None:
        self.row = ServerRow(server_id, group, version, started_ms, started_ms, proc=proc)
        self._written_ms: int | None = None
        self.others = 0
        """Other servers running on this store when this one last wrote its row
        (`saw`): they share the devices' messages (`broker.server.caps.served_now`)."""
        self.broker_down_ms = 0
        """Since when the broker link is down (0: up, or never told: `broker`)."""
        self.store_failing_ms = 0
        """Since when the store refuses the engine's writes (0: it takes them)."""
        self.store_error = ""

    def broker(self, connected: bool, now: int) -> None:
        """The broker link as the daemon sees it now; a change makes the row due."""
        down = 0 if connected else (self.broker_down_ms or now)
        if down != self.broker_down_ms:
            self.broker_down_ms = down
            self._written_ms = None

    def store_failed(self, error: str, now: int) -> None:
        """The store refused a write; the first refusal of a run makes the row due."""
        self.store_error = " ".join(error.split())[:_ERROR_CHARS]
        if not self.store_failing_ms:
            self.store_failing_ms = now
            self._written_ms = None

    def store_ok(self) -> None:
        """The store took a batch of the devices' messages."""
        if self.store_failing_ms:
            self.store_failing_ms, self.store_error = 0, ""
            self._written_ms = None

    def _now(self, seen_ms: int, stopped_ms: int = 0) -> ServerRow:
        return dataclasses.replace(self.row, seen_ms=seen_ms, stopped_ms=stopped_ms,
                                   broker_down_ms=self.broker_down_ms,
                                   store_failing_ms=self.store_failing_ms,
                                   store_error=self.store_error)

    def due(self, now: int) -> ServerRow | None:
        """The row to write now (the first, after a change of the broker link, then every
        `SEEN_EVERY_MS`), else None."""
        if self._written_ms is not None and now - self._written_ms < SEEN_EVERY_MS:
            return None
        return self._now(seen_ms=now)

    def stopping(self, now: int) -> ServerRow:
        """The row a clean stop writes."""
        return self._now(seen_ms=now, stopped_ms=now)

    def saw(self, rows: Sequence[ServerRow], now: int) -> None:
        """`rows`: the store's servers as read with this server's own row written."""
        self.others = sum(1 for r in rows
                          if r.id != self.row.id and state(r, now, STALE_AFTER_S * 1000)
                          == "running")

    def written(self, row: ServerRow) -> None:
        """`row` is in the store (a failed write leaves the next tick due again)."""
        self._written_ms = row.seen_ms


def state(row: ServerRow, now: int, stale_ms: int, ended: Collection[str] = ()) -> str:
    """"running", "stopped" (cleanly) or "gone" (not seen within `stale_ms`, never
    stopped cleanly: crashed, killed, hung, or cut off from the store; or in `ended`:
    its process is known to have ended, `process_identity.ended_servers`)."""
    if row.stopped_ms:
        return "stopped"
    if row.id in ended:
        return "gone"
    return "running" if now - row.seen_ms <= stale_ms else "gone"


def other_start_hint(server_id: str, config: str | None = None) -> str:
    """How to start a merge server other than the one `config` (the asking command's)
    configures: its own config and service, not the ones START_HINT names (the operator
    guide runs a second server as `waystation-server-2` from `server-2.toml`)."""
    mine = "" if config is None else f" (`{config}` configures another server)"
    return (f"start it on its host from its own config, the one with server_id = "
            f"{server_id!r}{mine}: its systemd service (`systemctl start` and `journalctl "
            "-u` with its unit's name), or `waystation server run --config` with that file")


def describe(row: ServerRow, now: int, stale_ms: int, ended: Collection[str] = (),
             config: str | None = None, own_id: str | None = None) -> str:
    """One server's line of `server status`; `own_id`: the server_id of the config the
    command read (another server's line names its own config and service, not that
    one's)."""
    other = own_id is not None and row.id != own_id
    head = f"merge server {row.id} (group {row.group}, {row.version or 'version ?'})"
    st = state(row, now, stale_ms, ended)
    if st == "running":
        line = f"{head}: running (seen {ago(row.seen_ms, now)}, started {iso(row.started_ms)})"
        if row.broker_down_ms:
            line += (f", but NOT CONNECTED TO THE BROKER since {iso(row.broker_down_ms)} "
                     f"({span(max(0, now - row.broker_down_ms))}): it merges nothing, "
                     f"devices' changes wait in the broker; {BROKER_HINT}")
        if row.store_failing_ms:
            line += (f", but ITS STORE REFUSES ITS WRITES since {iso(row.store_failing_ms)} "
                     f"({span(max(0, now - row.store_failing_ms))}): {row.store_error or '?'}; "
                     "the devices keep their changes and send them again, nothing is lost; "
                     f"{STORE_HINT}")
        return line
    if st == "stopped":
        return f"{head}: stopped cleanly at {iso(row.stopped_ms)}"
    if row.id in ended:
        pid = row.proc.split("/")[2]
        return (f"{head}: its process ({pid}, on this host) has ended without stopping "
                f"cleanly: crashed or killed (last seen {ago(row.seen_ms, now)}, "
                f"{iso(row.seen_ms)}); "
                f"{other_start_hint(row.id, config) if other else start_hint(config)}")
    return (f"{head}: not seen for {span(now - row.seen_ms)} (last {iso(row.seen_ms)}) and "
            "it did not stop cleanly: crashed, hung, or cut off from the store? Check it "
            "on its host (" + ("`systemctl status` of its service)" if other
                               else "`systemctl status waystation-server`)"))


def server_doc(row: ServerRow, now: int, stale_ms: int,
               ended: Collection[str] = ()) -> dict[str, Any]:
    """One server in the `--json` forms (`broker_*`: null unless it runs;
    `process_ended`: its process is known to have ended, on this host)."""
    st = state(row, now, stale_ms, ended)
    running = st == "running"
    return {"id": row.id, "group": row.group, "version": row.version,
            "state": st, "started": iso(row.started_ms),
            "seen": iso(row.seen_ms), "seen_s_ago": max(0, now - row.seen_ms) // 1000,
            "stopped": iso(row.stopped_ms) or None,
            "broker_connected": not row.broker_down_ms if running else None,
            "broker_down_since": (iso(row.broker_down_ms) or None) if running else None,
            "store_failing_since": (iso(row.store_failing_ms) or None) if running else None,
            "store_error": (row.store_error or None) if running else None,
            "process_ended": row.id in ended}


def any_running(rows: Sequence[ServerRow], now: int, stale_ms: int,
                ended: Collection[str] = ()) -> bool:
    return any(state(r, now, stale_ms, ended) == "running" for r in rows)


def any_serving(rows: Sequence[ServerRow], now: int, stale_ms: int,
                ended: Collection[str] = ()) -> bool:
    """A server runs and is connected to its broker: presence is kept up to date."""
    return any(state(r, now, stale_ms, ended) == "running" and not r.broker_down_ms
               for r in rows)


def presence_as_of(rows: Sequence[ServerRow]) -> int:
    """When the devices' stored presence was last kept up to date: the latest time any
    server recorded itself connected to its broker (0: none ever did)."""
    return max((r.broker_down_ms or r.seen_ms for r in rows), default=0)


def no_server_warning(rows: Sequence[ServerRow], stale_s: int,
                      config: str | None = None) -> str:
    """What `server status` / `server devices` say when no server runs."""
    as_of = presence_as_of(rows)
    if not rows:
        # Also what an operator sees after forgetting every server: say so, or the
        # upgrade advice alone sends them looking for a server started before it.
        # A new store is the first thing a new install shows: say that first, or the
        # upgrade advice sends its operator looking for an older server to restart.
        when = ("no merge server has recorded itself in this store: none has run on it yet "
                "(a new store: start one), one started before the upgrade to this release "
                "records nothing (restart it), or `waystation server forget` dropped them")
        since = "as the last server left it"
    else:
        when = (f"every merge server recorded in this store stopped, crashed, or has not "
                f"been seen "
                f"for over {stale_s} s: `waystation server status` lists them")
        since = f"as of {iso(as_of)}, when the last server was seen"
    return (f"NO MERGE SERVER IS RUNNING ({when}). Device presence (online/offline) and "
            f"PENDING counts are {since}, not live, and devices' changes wait on the devices "
            f"(or in the broker) until a server runs; {start_hint(config)}.")


def presence_warning(rows: Sequence[ServerRow], now: int, stale_s: int,
                     ended: Collection[str] = (), config: str | None = None) -> str | None:
    """What `server status` and `server devices` say above their output when no server
    keeps presence up to date: none running, or none connected to its broker; None
    while one does."""
    stale_ms = stale_s * 1000
    if not any_running(rows, now, stale_ms, ended):
        return no_server_warning(rows, stale_s, config)
    if not any_serving(rows, now, stale_ms, ended):
        return cut_off_warning(rows)
    return None


def cut_off_warning(rows: Sequence[ServerRow]) -> str:
    """What `server status` / `server devices` say when servers run but none is
    connected to its broker."""
    return (f"NO MERGE SERVER IS CONNECTED TO THE BROKER (the running ones lost it: "
            f"`waystation server status` says since when). Device presence (online/offline) "
            f"and PENDING counts are as of {iso(presence_as_of(rows))}, not live, and "
            f"devices' changes wait on the devices (or in the broker); {BROKER_HINT}.")


__all__ = ["BROKER_HINT", "SEEN_EVERY_MS", "STALE_AFTER_S", "START_HINT", "Heartbeat",
           "any_running", "any_serving", "cut_off_warning", "describe", "no_server_warning",
           "other_start_hint", "presence_as_of", "presence_warning", "server_doc", "start_hint",
           "state"]
