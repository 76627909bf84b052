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

Status: the retained `status` goes at every (re)connect, every `status_interval_s`, and
within about a second of the outbox draining or of changes starting to wait
(`agent.status_report`), so the server's view of the outbox is not half a minute old.

Sync policy (`agent.policy`, `[policy]`): before each batch the daemon asks its `Gate`
whether the records lane may send (sync windows, metered link and budget, battery,
bandwidth cap, the merge server group's retained announcement on
`{prefix}/_server/{group}/+/state`, an explicit "sync now"); held changes stay in the
outbox and meta "policy" says what waits and why (`agent status`, the local API).
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
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.answer_wait import AnswerWait
from agent.api import Agent
from agent.catchup import CatchupRound
from agent.clientcert import ClientCerts
from agent.creds import BrokerCredentials
from agent.daemon_cert import CertHooks
from agent.daemon_deaf import DeafHooks
from agent.daemon_hello import HelloHooks
from agent.daemon_policy import PolicyHooks
from agent.daemon_receive import AGENT_NAME, ReceiveHooks
from agent.daemon_retention import RetentionHooks
from agent.daemon_send import SendHooks
from agent.daemon_wake import WakeHooks
from agent.errors import StoreDamaged
from agent.link_progress import LinkProgress
from agent.pacing import Pacer
from agent.policy.decide import Decision
from agent.policy.gate import Gate
from agent.status_report import StatusReports
from schemas import codec, wire
from schemas.collection import Catalog
from waystation.config import AgentConfig
from waystation.mqtt import Backoff, MqttLink, Will

log = structlog.get_logger("waystation.agent")

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
    loops: int = 0
    """Turns of the engine loop (each asks the sync policy and pumps)."""
    held: int = 0
    """Times a partial batch waited for an answer (adaptive batching, agent.pacing)."""
    extra: dict[str, int] = field(default_factory=dict)


class AgentDaemon(ReceiveHooks, SendHooks, PolicyHooks, RetentionHooks, CertHooks,
                  HelloHooks, WakeHooks, DeafHooks):
    """Runs the sync loop for one device until `stop()` (or SIGTERM under `run()`)."""

    def __init__(self, cfg: AgentConfig, catalog: Catalog, *,
                 env: Mapping[str, str] | None = None, agent: Agent | None = None,
                 rng: random.Random | None = None, gate: Gate | None = None) -> None:
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
        self.server_group = cfg.policy.server_group
        self.server_filter = f"{prefix}/_server/{self.server_group}/+/state"
        self.gate = gate if gate is not None else Gate(cfg.policy)
        self._decision: Decision | None = None
        self._policy_doc: dict[str, Any] | None = None
        self._policy_written = 0.0
        self._budget_dirty = False
        self.stats = DaemonStats()
        self._rng = rng or random.Random()
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self.damaged: StoreDamaged | None = None
        """Set when the store turned out damaged: the engine loop stopped for good."""
        self._thread: threading.Thread | None = None
        self._connected = False
        self._inflight: dict[int, float] = {}        # n -> monotonic time it was sent
        self._first_sent: dict[int, float] = {}
        """n -> when it was first sent, of changes not yet answered: an answer's time is
        counted from there (an answer to a change sent again may be to its first copy:
        counted from the last, a server behind would look prompt)."""
        self._earliest = float("inf")  # nothing in _inflight was sent before this
        self.answer_wait = AnswerWait(cfg.sync.ack_timeout_s)
        """How long what is in flight waits for an answer (`agent.answer_wait`)."""
        self.progress = LinkProgress()
        """When the link was last seen delivering (`agent.link_progress`)."""
        self._retry_at: dict[int, float] = {}        # n -> not before (transient rejects)
        self._catchup: CatchupRound | None = None  # the catch-up under way
        self._catchup_sent = 0.0
        self._reports = StatusReports(cfg.sync.status_interval_s)
        self._hello_cp: dict[str, int] | None = None
        self._hello_at = 0.0
        self._hellos_unwelcomed = 0
        self._answered = False
        """The server answered something (ack, rejection, page, checkpoint) since the
        latest hello: with no `welcome` before it, the server predates capabilities."""
        self._last_problem: tuple[Any, Any] | None = None
        self.pacer = Pacer(cfg.sync.batch_max_changes)
        self._may_send = True
        """Something may be waiting to be sent. Cleared when a batch scan found the
        outbox exhausted (`Batch.exhausted`); set again by every event but an ack (a
        write's wake, a tick, a connection, any other message), by the timers, and
        when a change's answer deadline passed. An ack alone adds nothing to send, so
        the turn after it skips the outbox scan instead of finding it empty."""
        self._last_loop = time.monotonic()
        self._wake_sock: socket.socket | None = None
        policy = self.sync.policy_state()
        if policy is not None:
            self.gate.restore_budget(policy.get("budget"))
        self._take_sync_now()
        self.creds = BrokerCredentials(cfg.data_dir, cfg.mqtt.resolved_password(self.env))
        self.certs = ClientCerts.from_config(cfg)
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
            password_provider=self.creds,
            cert_provider=self.certs if self.certs.enabled else None,
        )
        link.subscribe(self.down_topic, qos=1)
        if self.cfg.policy.wait_for_server:
            link.subscribe(self.server_filter, qos=1)
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
            self.sync.record_policy(None)
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
                wake_at = self.pacer.wake_at(now, next_timer)
                timeout = max(0.0, min(wake_at - now, self.cfg.sync.poll_interval_s))
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
                self._retention_tick(now)
                self._fetch_tick(now)
                self._fetch_query_tick(now)
                self.stats.loops += 1
        except StoreDamaged as exc:
            # Said once, with what to do; nothing more can be synced from this store.
            self.damaged = exc
            log.error("store_damaged", dev=self.dev, file=exc.path, error=str(exc))
        except Exception:
            log.exception("agent_loop_failed", dev=self.dev)
            raise
        finally:
            self._stopped.set()

    def _handle(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind != "msg":
            self._may_send = True
        try:
            if kind == "msg":
                if event[1] == self.down_topic:
                    self._heard()
                    self._on_message(event[2])
                else:
                    self._on_server_state(str(event[1]), event[2])
            elif kind == "sync_now":
                self._take_sync_now()
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
        except StoreDamaged:
            raise  # not one message's problem: every later one would fail the same way
        except Exception:
            # A failure applying one message must not kill the loop; the data it
            # carried comes again (resend, catch-up).
            log.exception("agent_event_failed", dev=self.dev, kind=kind)

    def _on_connect(self, session_present: bool) -> None:
        self._connected = True
        self._link_changed()
        self.answer_wait.reset()
        self._last_problem = None
        self.stats.connects += 1
        # Whatever was in flight may be lost (amqtt drops in-flight QoS 1 on reconnect):
        # send it again; the server answers duplicates with the same outcome.
        self.stats.resent += len(self._inflight)
        self._inflight.clear()
        self._first_sent.clear()  # (an answer's time across a reconnect tells nothing)
        log.info("connected", dev=self.dev, session_present=session_present,
                 pending=self.sync.pending_count())
        self._publish_status(True)
        self._cert_on_connect()
        self._say_hello()
        self._start_catchup()
        self.sync.set_online(True)
        self.sync.record_link("online")

    def _on_disconnect(self, reason: str) -> None:
        if self._connected:
            log.info("disconnected", dev=self.dev, reason=reason)
        self._connected = False
        self._link_changed()
        self._inflight.clear()
        self._catchup = None
        with contextlib.suppress(Exception):
            self.sync.set_online(False)
            self.sync.record_link("offline", reason)

    # ------------------------------------------------------------------ sending

    def _zdict(self) -> bool | bytes:
        """Compress with a preset dictionary: only once the server agreed (§11)."""
        return self.sync.up_packing()

    def _send(self, msg: wire.Message) -> bool:
        payload = codec.encode(msg, compress_over=self.cfg.sync.compress_over_bytes or None,
                               zdict=self._zdict())
        return self.link.publish(self.up_topic, payload)

    def _start_catchup(self) -> None:
        if not self._connected:
            return
        req = "c-" + uuid.uuid4().hex[:12]
        request = self.sync.catchup_request(req)
        self._catchup = CatchupRound(req, frozenset(request.cp))
        self._catchup_sent = time.monotonic()
        self._asked(self._catchup_sent)
        self.stats.catchups += 1
        self._send(request)

    def _publish_status(self, online: bool) -> None:
        msg = self.sync.status_message(online, AGENT_NAME)
        self.link.publish(self.status_topic, codec.encode(msg), qos=1, retain=True)
        self._reports.sent(time.monotonic(), msg.pend if online else None)

    def _timers(self, now: float) -> None:
        sync_cfg = self.cfg.sync
        # Writes whose wake was lost (another process, a full socket buffer), changes
        # coming back from a retry delay, a policy opening: looked for at least here.
        self._may_send = True
        if not self._connected:
            return
        self.progress.observe(now, self.link.bytes_in)
        self._note_policy()
        if self._reports.periodic_due(now):
            self._publish_status(True)
            self.sync.set_online(True)
            self._hello_if_moved()
        elif self._reports.prompt_due(now, self.sync.pending_count()):
            # The outbox drained, or changes keep waiting: `server devices` says so now
            # (agent.status_report), not at the next periodic status.
            self._publish_status(True)
        self._creds_timer(now)
        self._cert_timer(now)
        self._deaf_check(now)
        if self._catchup is not None:
            # An unanswered catch-up is retried like an unacked change: after the ack
            # timeout (the request or its answer may have been lost in a reconnect),
            # counted from the last bytes the link delivered: on a slow link the page
            # asked for takes longer than that to arrive, and asking again only queues
            # another copy behind it (agent.link_progress).
            start = self.progress.stretched(self._catchup_sent, self.answer_wait.limit)
            if now - start >= max(_CATCHUP_RETRY_MIN_S, sync_cfg.ack_timeout_s):
                log.info("catchup_retry", dev=self.dev)
                self._start_catchup()
        elif (now >= self._behind_wait_until
              and self.sync.gaps_older_than(sync_cfg.gap_timeout_s)):
            log.info("catchup_for_gap", dev=self.dev)
            self._start_catchup()

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
