"""The agent daemon: the device's sender and receiver over MQTT (PROTOCOL.md §9).

One engine thread owns every decision; the MQTT link's network thread only hands
events to it through a queue, so no lock guards the daemon's state:

    network thread ──(conn / disc / msg)──► queue ──► engine loop ──► LMDB (agent.sync)
    local writes (any process) ──wake socket / poll──┘          └──► link.publish

Sender: drains the outbox in `changes` batches, highest priority first, keeping at most
`max_inflight_changes` unanswered; a change stays in the outbox until the server acks
or permanently rejects it; unanswered changes go again after `ack_timeout_s` and after
every reconnect (amqtt drops in-flight messages on reconnect); transiently rejected
changes wait with exponential backoff. Receiver: applies acks, rejections, deltas,
catch-up pages and checkpoints through `agent.sync`, each one durable transaction, and
asks for a catch-up on every (re)connect and whenever a sequence gap does not fill.

Every retry fires on its own timer: nothing waits for the next local write or a restart.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.api import WAKE_SOCKET, Agent
from agent.catchup import CatchupRound
from schemas import codec, wire
from schemas.collection import Catalog
from schemas.errors import ProtocolError
from waystation import __version__
from waystation.config import AgentConfig
from waystation.mqtt import Backoff, MqttLink, Will

log = structlog.get_logger("waystation.agent")

AGENT_NAME = f"waystation/{__version__}"
_TIMER_S = 0.25
_CATCHUP_RETRY_MIN_S = 2.0


@dataclass
class DaemonStats:
    """Counters for status output, tests and benchmarks."""

    batches_sent: int = 0
    changes_sent: int = 0
    resent: int = 0
    acked: int = 0
    dead: int = 0
    deltas: int = 0
    pages: int = 0
    bad_messages: int = 0
    connects: int = 0
    catchups: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class AgentDaemon:
    """Runs the sync loop for one device until `stop()` (or SIGTERM under `run()`)."""

    def __init__(self, cfg: AgentConfig, catalog: Catalog, *,
                 env: Mapping[str, str] | None = None, agent: Agent | None = None,
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.env = dict(os.environ if env is None else env)
        self.agent = agent if agent is not None else Agent.open(cfg, catalog, env=self.env)
        self._owns_agent = agent is None
        self.sync = self.agent.sync
        self.dev = cfg.device_id
        prefix = cfg.mqtt.prefix
        self.up_topic = f"{prefix}/{self.dev}/up"
        self.down_topic = f"{prefix}/{self.dev}/down"
        self.status_topic = f"{prefix}/{self.dev}/status"
        self.stats = DaemonStats()
        self._rng = rng or random.Random()
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = False
        self._inflight: dict[int, float] = {}        # n -> monotonic deadline for an answer
        self._earliest = float("inf")  # no deadline in _inflight is before this
        self._retry_at: dict[int, float] = {}        # n -> not before (transient rejects)
        self._catchup: CatchupRound | None = None  # the catch-up under way
        self._catchup_sent = 0.0
        self._last_status = 0.0
        self._hello_cp: dict[str, int] | None = None
        self._last_problem: tuple[Any, Any] | None = None
        self._last_loop = time.monotonic()
        self._wake_sock: socket.socket | None = None
        self.link = self._make_link()

    def _make_link(self) -> MqttLink:
        sync = self.cfg.sync
        offline = codec.encode(wire.Status(dev=self.dev, on=False, agent=AGENT_NAME))
        link = MqttLink.from_config(
            self.cfg.mqtt, client_id=self.dev, env=self.env,
            will=Will(self.status_topic, offline, qos=1, retain=True),
            backoff=Backoff(initial=sync.backoff_initial_s, maximum=sync.backoff_max_s),
            on_connect=lambda present: self._events.put(("conn", present)),
            on_disconnect=lambda reason: self._events.put(("disc", reason)),
            on_message=lambda topic, payload: self._events.put(("msg", topic, payload)),
            on_problem=lambda problem, delay: self._events.put(
                ("problem", problem.kind, problem.detail, delay)),
        )
        link.subscribe(self.down_topic, qos=1)
        return link

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the engine thread and the MQTT link (returns at once)."""
        self._open_wake_socket()
        self._thread = threading.Thread(target=self._loop, name=f"agent-{self.dev}", daemon=True)
        self._thread.start()
        self.link.start()

    def stop(self, *, drain_s: float = 5.0) -> None:
        """Clean shutdown: finish the batch in flight (wait up to `drain_s` for its
        answer), publish the offline status, close the session cleanly."""
        self._events.put(("stop", drain_s))
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(drain_s + 10)
        self.link.stop(clean=True)
        self._close_wake_socket()
        with contextlib.suppress(Exception):
            self.sync.set_online(False)
            self.sync.record_link("offline", "stopped")
        if self._owns_agent:
            self.agent.close()

    def go_offline(self, *, abrupt: bool = True) -> None:
        """Drop the connection (the van drives into a tunnel): abruptly, so the broker
        publishes the last will, or cleanly. The daemon keeps running; local writes
        keep landing in the outbox until `go_online()`."""
        self.link.stop(clean=not abrupt)
        self._events.put(("disc", "taken offline"))

    def go_online(self) -> None:
        """Reconnect after `go_offline()` (a new connection, same persistent session)."""
        if self.link.connected:
            return
        self.link = self._make_link()
        self.link.start()

    def wake(self) -> None:
        """Something was written locally: send it now."""
        self._events.put(("wake",))

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def healthy(self) -> bool:
        """The engine loop turned recently (feeds the systemd watchdog)."""
        return time.monotonic() - self._last_loop < 30

    def inflight(self) -> int:
        return len(self._inflight)

    # ------------------------------------------------------------------ engine loop

    def _loop(self) -> None:
        next_timer = 0.0
        try:
            while True:
                now = time.monotonic()
                self._last_loop = now
                timeout = max(0.0, min(next_timer - now, self.cfg.sync.poll_interval_s))
                try:
                    event = self._events.get(timeout=timeout)
                except queue.Empty:
                    event = ("tick",)
                if event[0] == "stop":
                    self._drain_and_close(float(event[1]))
                    return
                self._handle(event)
                # Handle everything already queued before sending more; but once an
                # answer has made room for a whole batch, send it, so the server gets the
                # next batch while the remaining answers are applied (not after all of
                # them: that made agent and server take turns instead of working side
                # by side).
                while True:
                    if event[0] == "msg" and self._inflight_room():
                        self._pump(time.monotonic())
                    try:
                        event = self._events.get_nowait()
                    except queue.Empty:
                        break
                    if event[0] == "stop":
                        self._drain_and_close(float(event[1]))
                        return
                    self._handle(event)
                now = time.monotonic()
                if now >= next_timer:
                    self._timers(now)
                    next_timer = now + _TIMER_S
                self._pump(now)
        except Exception:
            log.exception("agent_loop_failed", dev=self.dev)
            raise
        finally:
            self._stopped.set()

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        try:
            if kind == "msg":
                self._on_message(event[2])
            elif kind == "conn":
                self._on_connect(bool(event[1]))
            elif kind == "disc":
                self._on_disconnect(str(event[1]))
            elif kind == "problem":
                # A kind the link is sure of (from the exception or the broker's refusal)
                # stands; a generic one is classified from its text.
                sure = event[1] not in ("disconnected", "broker_refused", "network")
                self.sync.record_link("retrying", str(event[2]), float(event[3]),
                                      code=str(event[1]) if sure else None)
                if (event[1], event[2]) != self._last_problem:  # say it once, not per retry
                    self._last_problem = (event[1], event[2])
                    log.warning("link_problem", dev=self.dev, kind=event[1], detail=event[2],
                                retry_in_s=round(float(event[3]), 1))
        except Exception:
            # A failure applying one message must not kill the loop; the data it
            # carried comes again (resend, catch-up).
            log.exception("agent_event_failed", dev=self.dev, kind=kind)

    def _on_connect(self, session_present: bool) -> None:
        self._connected = True
        self._last_problem = None
        self.stats.connects += 1
        # Whatever was in flight may be lost (amqtt drops in-flight QoS 1 on reconnect):
        # send it again; the server answers duplicates with the same outcome.
        self.stats.resent += len(self._inflight)
        self._inflight.clear()
        log.info("connected", dev=self.dev, session_present=session_present,
                 pending=self.sync.pending_count())
        self._publish_status(True)
        self.sync.server_caps = None  # agreed anew on every connection (welcome)
        hello = self.sync.hello(AGENT_NAME, z=True)
        if self._send(hello):
            self._hello_cp = hello.cp
        self._start_catchup()
        self.sync.set_online(True)
        self.sync.record_link("online")

    def _on_disconnect(self, reason: str) -> None:
        if self._connected:
            log.info("disconnected", dev=self.dev, reason=reason)
        self._connected = False
        self._inflight.clear()
        self._catchup = None
        with contextlib.suppress(Exception):
            self.sync.set_online(False)
            self.sync.record_link("offline", reason)

    def _on_message(self, payload: bytes) -> None:
        try:
            msg = codec.decode(payload, allowed=wire.DOWN_TYPES)
        except ProtocolError as err:
            self.stats.bad_messages += 1
            log.warning("bad_down_message", dev=self.dev, code=err.code, reason=err.reason)
            return
        if isinstance(msg, wire.Ack):
            result = self.sync.apply_ack(msg)
            for n in (*result.applied, *result.ignored):
                self._inflight.pop(n, None)
                self._retry_at.pop(n, None)
            self.stats.acked += len(result.applied)
        elif isinstance(msg, wire.Reject):
            self._on_reject(msg)
        elif isinstance(msg, wire.Delta):
            self.sync.apply_delta(msg)
            self.stats.deltas += 1
        elif isinstance(msg, wire.Page):
            self._on_page(msg)
        elif isinstance(msg, wire.Checkpoint):
            self._on_checkpoint(msg)
        elif isinstance(msg, wire.Command):
            self._on_command(msg)
        elif isinstance(msg, wire.Welcome):
            caps = self.sync.apply_welcome(msg)
            log.info("welcome", dev=self.dev, server=msg.srv, caps=sorted(caps))

    def _on_reject(self, msg: wire.Reject) -> None:
        result = self.sync.apply_reject(msg)
        for n in (*result.dead, *result.ignored):
            self._inflight.pop(n, None)
            self._retry_at.pop(n, None)
        self.stats.dead += len(result.dead)
        if result.transient:
            attempts = {rj.n: rj for rj in msg.rj}
            now = time.monotonic()
            for n in result.transient:
                self._inflight.pop(n, None)
                tries = self.stats.extra.get(f"try:{n}", 0) + 1
                self.stats.extra[f"try:{n}"] = tries
                self._retry_at[n] = now + self._backoff(tries)
                log.info("change_deferred", dev=self.dev, n=n, code=attempts[n].code,
                         retry_in_s=round(self._retry_at[n] - now, 1))
        if result.dead:
            log.warning("changes_rejected", dev=self.dev, numbers=result.dead,
                        reasons=sorted({rj.code for rj in msg.rj if rj.perm}))
        if result.error:
            log.warning("message_rejected", dev=self.dev, **result.error)

    def _on_page(self, page: wire.Page) -> None:
        self.sync.apply_page(page)
        self.stats.pages += 1
        if self._catchup is not None and page.req == self._catchup.req:
            self._catchup.on_page(page.s, page.more)
        if page.more:
            # Continue only this scope: asking again for every scope would make the
            # server answer each scope once per request, multiplying the pages.
            cps = self.agent.checkpoints()
            cp = cps.get(page.s)
            snap = [page.s] if cp is not None and cp.snapshot else []
            req = self._catchup.req if self._catchup is not None else page.req
            self._send(wire.Catchup(dev=self.dev, req=req, cp={page.s: page.to}, snap=snap,
                                    lim=self.cfg.sync.catchup_page))
            self._catchup_sent = time.monotonic()
        elif page.reset and self._catchup is None:
            self._start_catchup()  # a late copy restarted a snapshot: only a checkpoint ends it

    def _on_checkpoint(self, msg: wire.Checkpoint) -> None:
        result = self.sync.apply_checkpoint(msg)
        if result.behind:
            log.info("catchup_behind", dev=self.dev, scopes=result.behind)
            self._start_catchup()
            return
        self._hello_if_moved()
        current = self._catchup
        if current is not None and msg.req == current.req:
            # Scopes complete in an answer where another said `more` are in no checkpoint
            # of the chain (PROTOCOL.md §7.8): ask for them again once the chain is done.
            again = current.after_checkpoint(msg.cp, msg.denied)
            if current.done:
                self._catchup = None
            elif again:
                self._catchup_sent = time.monotonic()
                self._send(self.sync.catchup_request(current.req, scopes=again))
        if result.dropped:
            log.info("snapshot_dropped_records", dev=self.dev, count=result.dropped)
        if result.denied:
            log.warning("scopes_denied", dev=self.dev, scopes=result.denied)

    def _on_command(self, cmd: wire.Command) -> None:
        if cmd.cmd == "wipe":
            executed = not self.sync.command_done(cmd.id)
            if executed:
                report = self.agent.wipe(cmd.id)
                self.sync = self.agent.sync
                log.warning("wiped", dev=self.dev, id=cmd.id,
                            key_destroyed=report.key_destroyed, key_kept=report.key_kept)
        else:
            executed = self.sync.execute_command(cmd)
        log.warning("command", dev=self.dev, id=cmd.id, cmd=cmd.cmd, executed=executed)
        if executed and cmd.cmd in ("wipe", "resync", "scopes"):
            self._inflight.clear()
            self._retry_at.clear()
            self._start_catchup()
        self._send(self.sync.hello(AGENT_NAME, z=True))

    # ------------------------------------------------------------------ sending

    def _pump(self, now: float) -> None:
        if not self._connected:
            return
        sync_cfg = self.cfg.sync
        if now >= self._earliest:  # else nothing can have expired: no scan of them all
            for n in [n for n, deadline in self._inflight.items() if deadline <= now]:
                del self._inflight[n]
                self.stats.resent += 1
            self._earliest = min(self._inflight.values(), default=float("inf"))
        room = sync_cfg.max_inflight_changes - len(self._inflight)
        while room > 0:
            waiting = [n for n, t in self._retry_at.items() if t > now]
            # Without deferred changes, the in-flight numbers themselves (not a copy).
            exclude: AbstractSet[int] = (
                self._inflight.keys() if not waiting else {*self._inflight, *waiting})
            batch = self.sync.next_batch(exclude, min(sync_cfg.batch_max_changes, room),
                                         sync_cfg.batch_max_bytes)
            if not batch:
                return
            payload = batch.payload(self.dev,
                                    compress_over=sync_cfg.compress_over_bytes or None)
            if not self.link.publish(self.up_topic, payload):
                return
            deadline = now + sync_cfg.ack_timeout_s
            self._earliest = min(self._earliest, deadline)
            for n in batch.numbers:
                self._inflight[n] = deadline
                self._retry_at.pop(n, None)
            self.stats.batches_sent += 1
            self.stats.changes_sent += len(batch)
            room -= len(batch)

    def _inflight_room(self) -> bool:
        """Room in the in-flight window for a whole batch (refilling smaller gaps as they
        open would split the backlog into ever smaller batches)."""
        sync_cfg = self.cfg.sync
        room = sync_cfg.max_inflight_changes - len(self._inflight)
        return self._connected and room >= sync_cfg.batch_max_changes

    def _hello_if_moved(self) -> None:
        """Tell the server how far this device has caught up (hello carries its
        checkpoints), when that moved since the last hello (operator's view, §7.1)."""
        hello = self.sync.hello(AGENT_NAME, z=True)
        if hello.cp != self._hello_cp and self._send(hello):
            self._hello_cp = hello.cp

    def _send(self, msg: wire.Message) -> bool:
        payload = codec.encode(msg, compress_over=self.cfg.sync.compress_over_bytes or None)
        return self.link.publish(self.up_topic, payload)

    def _start_catchup(self) -> None:
        if not self._connected:
            return
        req = "c-" + uuid.uuid4().hex[:12]
        request = self.sync.catchup_request(req)
        self._catchup = CatchupRound(req, frozenset(request.cp))
        self._catchup_sent = time.monotonic()
        self.stats.catchups += 1
        self._send(request)

    def _publish_status(self, online: bool) -> None:
        msg = self.sync.status_message(online, AGENT_NAME)
        self.link.publish(self.status_topic, codec.encode(msg), qos=1, retain=True)
        self._last_status = time.monotonic()

    def _timers(self, now: float) -> None:
        sync_cfg = self.cfg.sync
        if not self._connected:
            return
        if now - self._last_status >= sync_cfg.status_interval_s:
            self._publish_status(True)
            self.sync.set_online(True)
            self._hello_if_moved()
        if self._catchup is not None:
            # An unanswered catch-up is retried like an unacked change: after the ack
            # timeout (the request or its answer may have been lost in a reconnect).
            if now - self._catchup_sent >= max(_CATCHUP_RETRY_MIN_S, sync_cfg.ack_timeout_s):
                log.info("catchup_retry", dev=self.dev)
                self._start_catchup()
        elif self.sync.gaps_older_than(sync_cfg.gap_timeout_s):
            log.info("catchup_for_gap", dev=self.dev)
            self._start_catchup()

    def _backoff(self, attempt: int) -> float:
        sync_cfg = self.cfg.sync
        ceiling = min(sync_cfg.backoff_max_s, sync_cfg.backoff_initial_s * 2 ** attempt)
        low = sync_cfg.backoff_initial_s
        return self._rng.uniform(low, max(ceiling, low))

    def _drain_and_close(self, drain_s: float) -> None:
        deadline = time.monotonic() + drain_s
        while self._inflight and self._connected and time.monotonic() < deadline:
            try:
                event = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if event[0] in ("msg", "conn", "disc"):
                self._handle(event)
        if self._connected:
            with contextlib.suppress(Exception):
                self._publish_status(False)
        log.info("agent_stopped", dev=self.dev, pending=self.sync.pending_count(),
                 unanswered=len(self._inflight))

    # ------------------------------------------------------------------ wake socket

    def _open_wake_socket(self) -> None:
        # Writers in any process poke this socket after a commit (Agent._poke), so the
        # daemon sends at once instead of at its next poll.
        path = self.agent.store.path / WAKE_SOCKET
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(path))
        except OSError as exc:
            # Path too long for AF_UNIX or not writable: fall back to polling.
            log.info("wake_socket_unavailable", path=str(path), error=str(exc))
            sock.close()
            return
        self._wake_sock = sock
        threading.Thread(target=self._wake_reader, args=(sock,), name=f"wake-{self.dev}",
                         daemon=True).start()

    def _wake_reader(self, sock: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                sock.recv(64)
            except OSError:
                return
            self._events.put(("wake",))

    def _close_wake_socket(self) -> None:
        sock, self._wake_sock = self._wake_sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            with contextlib.suppress(OSError):
                (self.agent.store.path / WAKE_SOCKET).unlink()
