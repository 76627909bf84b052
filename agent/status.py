"""The agent's sync state as people need it (`waystation agent status`, the local API).

Every figure means what its label says (issue 8 §4): "online" only while a running sync
daemon says it is connected; "offline" says why (the broker refused the login, nothing
listens at its address, TLS, DNS, ...) and when it tries again; a problem the server
reported is shown until a later sync succeeds; a device the operator wiped says so.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent import fetch_queries, journal
from agent.core import Core, Work
from agent.models import _age
from agent.service.lock import SYNC_LOCK, holder_pid, service_pid
from waystation.diskfull import LOW_SPACE_BYTES
from waystation.linkproblems import HINTS
from waystation.processes import has_ended, pid_alive, this_process
from waystation.timefmt import iso

UNANSWERED_S = 60.0
"""Changes unacked this long while connected, with no server announcement seen, get a
hint in the summary (six of the default `sync.ack_timeout_s`)."""


@dataclass(frozen=True)
class AgentStatus:
    """The agent's sync state, as people need it (`waystation agent status`)."""

    device_id: str
    online: bool
    """A running sync daemon is connected to the broker (its heartbeat is fresh)."""
    pending: int
    """Changes in the outbox (saved locally, not yet acked by the server)."""
    oldest_pending_age_s: float | None
    last_sync_age_s: float | None
    last_sync_ms: int | None
    """When the device last heard from the server with data: an ack, a delta, a
    catch-up page, a completed catch-up."""
    dead_letters: int
    open_conflicts: int
    lost_writes: int
    checkpoints: dict[str, int]
    gaps: list[str]
    """Scopes with a sequence gap waiting for a catch-up."""
    snapshots: list[str]
    """Scopes being re-downloaded from a snapshot."""
    heartbeat_age_s: float | None
    last_error: dict[str, Any] | None
    """The last problem the server reported ({code, reason, t}; for a change it refused
    for now also `retry_at`, ms, and `retry_in_s`, when the daemon sends it again);
    cleared by a later successful sync."""
    next_n: int
    schema_version: int
    agent_running: bool | None = None
    """The sync daemon's process is alive (None: it never ran on this store)."""
    link: dict[str, Any] | None = None
    """Why the sync daemon is not connected: {state, code, reason, hint, t, retry_in_s}
    (code from `agent.connectivity` / `waystation.linkproblems`); None while connected
    or before any attempt."""
    store_path: str = ""
    """The local store this status was read from."""
    incarnation: str | None = None
    wiped: dict[str, Any] | None = None
    """{t, id, key_destroyed}: this store replaced one the operator wiped."""
    deferred: list[dict[str, Any]] = field(default_factory=list)
    """What the sync policy holds back and why, while the daemon runs: each
    {code, reason, lanes, until_ms, since_ms}; code is server_unavailable,
    window_closed, metered, budget_spent or battery_low (docs/agent-api.md)."""
    sync_now_until_ms: int | None = None
    """An explicit "sync now" lifts the device's policy until then."""
    server: dict[str, Any] | None = None
    """The merge server group's announcements: {group, up (None: none seen),
    down_since_ms, up_since_ms}."""
    quota: dict[str, Any] | None = None
    """The disk quota (storage.quota_bytes): {limit, used, reached}; None without one.
    While reached, local writes are refused (agent.quota)."""
    evicted: int = 0
    """Records evicted by retention (agent.evict); `fetch` brings them back."""
    fetching: int = 0
    """Records asked back from the server and not answered yet (agent.fetching)."""
    fetch_queries: int = 0
    """Queries asked of the server and not answered yet (agent.fetch_queries)."""
    journal: dict[str, int] = field(default_factory=dict)
    """The acked changes kept for a restored server (agent.journal): {changes, bytes}."""
    disk_free_bytes: int | None = None
    """Free bytes (for this user) on the filesystem holding the store; None: unknown.
    Below `waystation.diskfull.LOW_SPACE_BYTES` the summary says writes may fail."""
    read_ms: int | None = None
    """When this status was read (the store's clock, ms); not in `to_dict`: the ages
    above are relative to it."""
    replayed: dict[str, Any] | None = None
    """What the latest resync ordered by a server restore gave back: {t, id, changes,
    units_skipped, scopes, resending, settled, past} (PROTOCOL.md §9.7, agent.journal);
    None: no restore seen. The summary says it while changes sent again wait for the
    server and for `journal.REPLAY_NEWS_MS` (a day) after; then `past` is true."""

    @property
    def synced_since_wipe(self) -> bool:
        """The device synced after its wipe: the server answers it again, so the
        operator enabled it (a wiped device gets no data and no acks until then)."""
        return bool(self.wiped and self.last_sync_ms is not None
                    and self.last_sync_ms > int(self.wiped["t"]))

    def _unanswered(self) -> str | None:
        """Connected, changes unacked for `UNANSWERED_S`: say where to look (else "online,
        3 pending" alone reads as a sync under way). Either no merge server of the group
        ever announced itself, or one is announced up but nothing at all came from the
        server for as long: hung (a stopped process stays announced up until the broker's
        keep-alive gives up on it), or overloaded. A server whose store fails answers
        `server_error` (`last_error`); a long backlog draining gets acks all along."""
        if (not self.online or not self.pending or self.deferred or self.last_error
                or (self.oldest_pending_age_s or 0) < UNANSWERED_S or self.server is None):
            return None
        waited = (f"the oldest change has waited {_age(self.oldest_pending_age_s or 0)} for "
                  "the server's ack")
        group = self.server.get("group")
        if self.server.get("up") is None:
            return (f"{waited} and no merge server of group {group!r} has announced itself "
                    "on the broker: is one running (`waystation server status` on the "
                    "server host)?")
        silent = self.last_sync_age_s
        up_since = self.server.get("up_since_ms")
        if (not self.server.get("up") or (silent is not None and silent < UNANSWERED_S)
                or (up_since and self.read_ms is not None
                    and self.read_ms - int(up_since) < UNANSWERED_S * 1000)):
            return None  # down: the deferral says so; just up: resending takes a moment
        heard = ("nothing has come from the server yet" if silent is None
                 else f"nothing has come from the server for {_age(silent)}")
        return (f"{waited} and {heard}, though a merge server of group {group!r} is "
                "announced up: it may be hung or overloaded: see `waystation server "
                "status` and the server's log on the server host")

    def summary(self) -> str:
        """One line: "online, 0 pending, last sync 3 s ago" and the like."""
        last = ("never synced" if self.last_sync_age_s is None
                else f"last sync {_age(self.last_sync_age_s)} ago")
        waiting = ""
        if self.pending:
            noun = "change" if self.pending == 1 else "changes"
            waiting = (f"{self.pending} {noun} saved locally, waiting for connection; oldest "
                       f"{_age(self.oldest_pending_age_s or 0)}; ")
        if self.online:
            text = f"online, {self.pending} pending"
            if self.pending:  # "12 pending" alone hides whether they wait for long
                text += f" (oldest {_age(self.oldest_pending_age_s or 0)})"
            text += f", {last}"
        elif self.agent_running is False:
            # Since when, about: its last heartbeat (a clean stop writes one as it goes).
            heard = ("" if self.heartbeat_age_s is None
                     else f", last heard from {_age(self.heartbeat_age_s)} ago")
            text = (f"offline — the sync daemon is not running{heard} (start `waystation "
                    f"agent run` or its service); {waiting or 'nothing pending; '}{last}")
        elif self.agent_running is None and self.heartbeat_age_s is None and self.link is None:
            # No daemon ever said anything from this store: a fresh install's next step.
            text = (f"offline — the sync daemon has not run on this store yet (start "
                    f"`waystation agent run` or its service); {waiting or 'nothing pending; '}"
                    f"{last}")
        elif self.link is not None:
            text = f"offline — {self.link['hint']} ({self.link['reason']})"
            left = self.link.get("retry_in_s")
            if left is not None:  # 0 once due: the daemon is trying (or about to)
                text += f"; retrying in {left:.0f} s" if left >= 0.5 else "; trying again now"
            if self.link.get("since_ms"):
                text += f"; offline since {_when(int(self.link['since_ms']))}"
            text += f"; {waiting or 'nothing pending; '}{last}"
        elif self.pending:
            text = f"offline — {waiting}{last}"
        else:
            text = f"offline — nothing pending; {last}"
        extras = []
        if self.disk_free_bytes is not None and self.disk_free_bytes < LOW_SPACE_BYTES:
            # Every write needs room, an ack's too: this stops syncing, not only the app.
            # "May": LMDB reuses the pages its file already has, so writes (and acks)
            # often still fit on a disk with no byte free; a plain "fail" read false next
            # to "0 pending, last sync 2 s ago".
            extras.append(f"the disk holding the store is nearly full "
                          f"({self.disk_free_bytes // 1024} KiB free): local writes and "
                          "syncing may fail (storage_full) until space is freed on it")
        if self.quota and self.quota.get("reached"):
            # What frees room: acks drain the outbox; with it empty, only retention (or
            # a larger quota) does: say which, or the device stays full with no hint.
            frees = ("until the outbox drains or retention evicts synced records"
                     if self.pending else "and the outbox is empty: declare retention for "
                     "more collections or raise storage.quota_bytes")
            extras.append(f"disk quota reached ({self.quota['used']} of {self.quota['limit']} "
                          f"bytes): local writes are refused {frees}; syncing goes on")
        if self.last_error and self.last_error.get("code") == "schema_refused":
            # The device's own verdict on a version the server sent (agent.schema_update)
            extras.append(f"schema version refused: {self.last_error.get('reason', '')}")
        elif self.last_error:
            said = f"server says: {self.last_error.get('reason', '')}"
            if self.last_error.get("code") == "server_error":
                # "send it again later" is addressed to the device, which does so by
                # itself: the problem, and what fixes it, are on the server's side.
                said += (" (a problem on the server, its store down or failing: this device "
                         "sends the change again by itself; the operator sees why in "
                         "`waystation server status` and the server's log)")
            elif self.last_error.get("code") == "unknown_device":
                # Removed from the registry (or never enrolled): the command it names is
                # the operator's, and nothing waiting here is lost meanwhile.
                said += (" (the operator's command, on the server host; the changes "
                         "waiting stay on this device)")
            left = self.last_error.get("retry_in_s")
            if left and self.agent_running is not False:
                said += f" (next try in {left:.0f} s)"
            extras.append(said)
        if self.wiped and not self.synced_since_wipe:
            # The server's "disabled" reason names the command too, but only once the
            # device connects and sends something: say it from the store alone.
            disabled = (self.last_error or {}).get("code") == "device_disabled"
            extras.append("this device was wiped by the operator" + (
                "" if disabled else ": it gets no data until the operator enables it "
                f"(`waystation device enable {self.device_id}` on the server)"))
        if self.replayed and not self.replayed.get("past"):
            extras.append(describe_replay(self.replayed))
        if self.dead_letters:
            extras.append(f"{self.dead_letters} dead letter{'s' if self.dead_letters != 1 else ''}"
                          " (changes the server refused for good: `waystation agent "
                          "deadletters`)")
        if self.open_conflicts:
            extras.append(f"{self.open_conflicts} open conflict"
                          f"{'s' if self.open_conflicts != 1 else ''} to settle "
                          "(`waystation agent conflicts`)")
        unanswered = self._unanswered()
        if unanswered:
            extras.append(unanswered)
        if self.deferred:
            held = "; ".join(describe_deferral(d, live=self.online) for d in self.deferred)
            text += f"; {'waiting: ' if self.pending else ''}{held}"
            if self.pending and any(d.get("code") != "server_unavailable"
                                    and "records" in (d.get("lanes") or [])
                                    for d in self.deferred):
                # The device's own policy holds them: say how to send them anyway (a
                # server that is down is not lifted by asking).
                text += " (`waystation agent sync` sends them now)"
        elif self.sync_now_until_ms is not None:
            text += f"; sync now until {_when(self.sync_now_until_ms)}"
        if extras:
            text += "; " + "; ".join(extras)
        return text

    def to_dict(self) -> dict[str, Any]:
        doc = {**asdict(self), "summary": self.summary()}
        del doc["read_ms"]
        return doc


def _when(ms: int) -> str:
    # One way of writing a time on both sides: `server devices` reads the same.
    return iso(ms)


def describe_replay(r: dict[str, Any]) -> str:
    """A restore's replay as people read it: what is being (or was) sent again."""
    count = int(r["changes"])
    changes = f"{count} acked change{'s' if count != 1 else ''}"
    text = f"the server was restored from a backup ({_when(r['t'])}): "
    if r.get("resending"):
        text += f"sending {changes} again, not all acked yet"
    elif count or r.get("units_skipped"):
        text += f"{changes} sent again"
    else:
        text += "this device had nothing the backup lacked"
    if r.get("units_skipped"):
        units = int(r["units_skipped"])
        text += (f"; {units} transaction{'s' if units != 1 else ''} could not be sent again "
                 "(part of it was pruned from the journal)")
    return text


def describe_deferral(d: dict[str, Any], *, live: bool = True) -> str:
    """One deferral as people read it: "server unavailable since ...", "outside the sync
    windows until ..." and so on. `live` False: the daemon is not connected to the
    broker, so what it last heard of the merge servers may no longer hold (a broker
    that stops delivers the servers' last wills first: they read as down though they
    run) and is said as such."""
    code = d.get("code")
    if code == "server_unavailable":
        since = d.get("since_ms")
        return ("server unavailable" + (f" since {_when(since)}" if since else "")
                + ("" if live else " (as last heard before the link to the broker was "
                   "lost)")
                + ": changes stay on the device until a merge server announces itself")
    text = str(d.get("reason", code))
    if d.get("until_ms"):
        text += f" until {_when(int(d['until_ms']))}"
    lanes = d.get("lanes") or []
    if lanes and "records" not in lanes:
        text += f" ({', '.join(lanes)} wait)"
    return text


def read_status(core: Core) -> AgentStatus:
    """The status of the agent's store (one read transaction)."""

    def run(work: Work) -> AgentStatus:
        tx = work.tx
        now = work.now()
        first = tx.first("outbox")
        oldest = None if first is None else max(0.0, (now - first[1]["t"]) / 1000)
        last_sync = tx.meta("last_sync")
        online_doc = tx.meta("online")
        hb_age = None if online_doc is None else max(0.0, (now - online_doc["t"]) / 1000)
        syncing: bool | None = None  # the process that wrote the heartbeat is alive
        if online_doc is not None and online_doc.get("pid"):
            # Its identity, where recorded, also tells a pid reused since it crashed.
            ended = has_ended(str(online_doc.get("proc", "")))
            syncing = pid_alive(int(online_doc["pid"])) if ended is None else not ended
        online = bool(online_doc and online_doc["on"] and hb_age is not None
                      and hb_age <= core.settings.heartbeat_timeout_s and syncing is not False)
        # The agent service holds a lock on its data_dir; a sync daemon run on its own
        # (or the service's sync process) is known by its heartbeat's process.
        data_dir = core.store.path.parent
        service = service_pid(data_dir)
        running: bool | None = True if service else syncing
        # The service's sync process holds the sync lock for its life: none while it
        # starts or after it exited (the heartbeat's pid may be an earlier process's).
        sync_gone = bool(service) and holder_pid(data_dir / SYNC_LOCK) is None
        link = None
        link_doc = tx.meta("link")
        # Its last heartbeat said connected and it is alive, but it has stopped writing
        # them: its loop does not run (SIGSTOP, a device asleep, stuck in a write on a
        # stalled disk). A daemon that lost its link records that, and offline it
        # writes none: this is the only way a stale "connected" is left behind.
        stuck = bool(online_doc and online_doc["on"] and not online and hb_age is not None
                     and hb_age > core.settings.heartbeat_timeout_s
                     and syncing is not False and running is not False)
        if stuck and not sync_gone:
            assert online_doc is not None and hb_age is not None
            link = {"state": "offline", "code": "not_responding",
                    "reason": f"no heartbeat from the sync daemon for {hb_age:.0f} s",
                    "hint": HINTS["not_responding"], "t": online_doc["t"],
                    "retry_in_s": None, "since_ms": online_doc["t"]}
        elif sync_gone and not online:
            # The service runs, its sync process does not: that, not the last
            # connection problem recorded, is why nothing syncs now.
            link = {"state": "offline", "code": "sync_restarting",
                    "reason": "the sync process is not running",
                    "hint": HINTS["sync_restarting"], "t": online_doc["t"] if online_doc
                    else now, "retry_in_s": None, "since_ms": _offline_since(link_doc)}
        elif (link_doc is not None and link_doc.get("state") != "online" and not online
                and running is not False):
            code = link_doc.get("code") or "network"
            retry = link_doc.get("retry_in_s")
            # Rounded to the ms (2.3 - 0.008 answered 2.2920000000000003 in the JSON),
            # after the floor at 0, so a retry already due reads 0.0.
            left = None if retry is None else round(
                max(0.0, retry - (now - link_doc["t"]) / 1000), 3)
            link = {"state": link_doc.get("state"), "code": code,
                    "reason": link_doc.get("reason", ""), "hint": HINTS.get(code, "offline"),
                    "t": link_doc["t"], "retry_in_s": left,
                    "since_ms": _offline_since(link_doc)}
        policy = tx.meta("policy") if running is not False else None
        open_conflicts = sum(1 for _ in tx.keys("conflicts", b"O"))
        limit = core.settings.quota_bytes
        used = tx.live_bytes() if limit is not None else 0
        quota = None if limit is None else {"limit": limit, "used": used,
                                             "reached": used >= limit}
        lost = sum(1 for _ in tx.keys("conflicts", b"L"))
        cps: dict[str, int] = {}
        gaps: list[str] = []
        snaps: list[str] = []
        for scope in core.scopes:
            cp = work.checkpoint(scope)
            cps[scope] = cp.cp
            if cp.has_gap:
                gaps.append(scope)
            if cp.snapshot:
                snaps.append(scope)
        return AgentStatus(
            device_id=core.dev, online=online, pending=tx.count("outbox"),
            oldest_pending_age_s=oldest,
            last_sync_age_s=None if last_sync is None else max(0.0, (now - last_sync) / 1000),
            last_sync_ms=last_sync, dead_letters=tx.count("deadletters"),
            open_conflicts=open_conflicts, lost_writes=lost, checkpoints=cps, gaps=gaps,
            snapshots=snaps, heartbeat_age_s=hb_age,
            last_error=_last_error(tx.meta("last_err"), now),
            next_n=work.peek_next_n(), schema_version=core.catalog.version,
            agent_running=running, link=link, store_path=str(core.store.path),
            incarnation=work.incarnation(), wiped=tx.meta("wiped"),
            deferred=list(policy.get("deferrals", [])) if policy else [],
            sync_now_until_ms=(policy.get("sync_now_until_ms") if policy and (
                policy.get("sync_now_until_ms") or 0) > now else None),
            server=policy.get("server") if policy else None, quota=quota,
            evicted=tx.count("evicted"), fetching=tx.count("fetch"),
            fetch_queries=fetch_queries.waiting(work),
            journal=journal.stats(work), replayed=_replayed(work, now),
            disk_free_bytes=_disk_free(core.store.path), read_ms=now)

    return core.read(run)


def sync_running(status: AgentStatus) -> bool:
    """Whether a sync process runs on the store `status` was read from, as the local API's
    `sync_running` says it from inside the service: the service's sync process holds the
    sync lock for its life; a sync daemon run on its own is `agent_running`."""
    data_dir = Path(status.store_path).parent
    if service_pid(data_dir):
        return holder_pid(data_dir / SYNC_LOCK) is not None
    return status.agent_running is True


def record_online(work: Work, online: bool) -> None:
    """The daemon's heartbeat: connected or not, now, and which process says so."""
    work.tx.set_meta("online", {"on": online, "t": work.now(), "pid": os.getpid(),
                                "proc": this_process()})


def _offline_since(link_doc: dict[str, Any] | None) -> int | None:
    """Since when the daemon's link is not online, by its record (None: not recorded,
    a store from before the record had it, or the link is online)."""
    if link_doc is None or link_doc.get("state") == "online":
        return None
    since = link_doc.get("since")
    return since if isinstance(since, int) else None


def _disk_free(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _replayed(work: Work, now: int) -> dict[str, Any] | None:
    doc = work.tx.meta(journal.REPLAY_KEY)
    if doc is None:
        return None
    return journal.replay_news(doc, journal.resending(work, doc), now)


def _last_error(doc: dict[str, Any] | None, now: int) -> dict[str, Any] | None:
    """The stored last error, with the seconds left until the change it held is tried
    again (`retry_in_s`, 0 once due) when the daemon recorded when that is."""
    if doc is None or not isinstance(doc.get("retry_at"), int):
        return doc
    return {**doc, "retry_in_s": round(max(0.0, (doc["retry_at"] - now) / 1000), 1)}


__all__ = ["UNANSWERED_S", "AgentStatus", "describe_deferral", "describe_replay",
           "read_status", "record_online", "sync_running"]

