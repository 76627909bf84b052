"""The merge server daemon: MQTT in, `Engine` in the middle, MQTT out.

    network thread ──(up / status messages)──► intake ──► worker: Engine.handle_many
                                                               └──► link.publish(down)

The intake (`broker.server.intake`) holds what waits for the worker, bounded in bytes
whatever devices send: each device has its own queue and the queues are served in turn
by bytes (a flood from one device does not delay the others), a device past its quota
(`intake.device_bytes`) has its further messages dropped and counted (it resends what
is not acked), a payload over `merge.max_payload_bytes` is refused there without being
queued, and when `intake.max_bytes` is reached the network thread waits for room, so
the broker holds the rest instead of this process (backpressure).

The worker takes whatever waits (at most one turn of each waiting device, a few
thousand messages or 256 KiB, in the intake's fair order, waiting
`merge.batch_window_ms` for more) and hands it to the engine as one group, so many
change batches share one store transaction (group commit). Answers are published only
after that transaction committed: an ack never precedes the durable apply.

Each message carries when it arrived (the network thread's clock) and, over MQTT,
whether the broker sent it as a retained replay on subscribe (`MqttLink(on_retained=)`):
a live status's `t` against its arrival tells how far the device's clock is off
(`broker.server.clockskew`); a replayed one may be days old and tells nothing of it.

Subscriptions: `{prefix}/+/up` — as the shared subscription
`$share/{shared_group}/{prefix}/+/up` when `shared_group` is set, so several servers
consume side by side (Mosquitto, EMQX; amqtt has no shared subscriptions) — and
`{prefix}/+/status` for presence — or, with `[amqp] nodes` set, RabbitMQ's queues over
AMQP (broker/server/amqp_link.py: several servers as competing consumers of one
replicated queue; each up message acknowledged only after its group committed; the
announcement then goes over a small MQTT link of its own: broker/server/announcer.py).
Alone on its subscription (no `shared_group`) the server keeps a persistent session, so
a restarted server finds what the broker queued while it was away. In a shared group it
connects with a clean session: brokers (Mosquitto 2.0, EMQX) keep handing a disconnected
member's persistent session its share of the group's messages, so a server that died
would swallow 1/N of every device's changes into a queue nobody reads (for
`persistent_client_expiration`, 30 days in deploy/) and each of them would wait for the
device's ack timeout. With a clean session the broker drops the dead member at once and
the others get everything; what was in flight to it is resent by the devices (they
resend until the server acks).

Test hook (crash tests only): ``WAYSTATION_FAILPOINT=after_commit:N`` in the server's
environment, read once when the server is built, makes the process SIGKILL itself on
the N-th group that applied at least one change, right after that group's store
transaction committed and before any ack or delta is published ("applied, not acked").
``WAYSTATION_FAILPOINT=stall_after_connect:MS`` makes the worker wait MS ms after it
handled a new connection's "connected", as a worker starved of CPU does while the
network thread keeps queuing (the replayed statuses and what devices send at the
announcement then wait together in the intake). Unset (always, outside tests) each
costs one attribute test per group.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog

from broker.errors import ServerIdTaken
from broker.server.announcer import (
    SideAnnouncer,
    announce_on,
    announcement_will,
    side_announcer,
)
from broker.server.engine import Engine
from broker.server.intake import Intake, IntakeLimits, Item, Verdict
from broker.server.login_removal import login_removals
from broker.server.process_identity import pid_of, running_twin
from broker.server.rotation_files import advance, broker_logins
from broker.server.store import open_store
from broker.server.store.base import Store
from schemas.collection import Catalog, load_catalog
from waystation.config import BrokerConfig, ServerConfig, load_config
from waystation.hlc import Clock
from waystation.mqtt import MqttLink
from waystation.mqtt_hooks import PasswordProvider
from waystation.service import check_state_directory, run_service

if TYPE_CHECKING:
    from broker.server.amqp_link import AmqpLink

log = structlog.get_logger("waystation.server")

_MAX_GROUP = 2000
_MAX_GROUP_BYTES = 256 * 1024
_TICK_S = 1.0
_STOP_GRACE_S = 10.0
"""How long a stop lets the worker finish the group in hand, what is queued and the last
flush. Past it (a store that does not answer: a silent link, a lock a lost backend holds)
the stop interrupts the store and abandons the rest: nothing of it was acked, so the
devices send it again (`_abandon`)."""
_STOP_ABANDON_S = 5.0
"""How long the worker then has to notice (a connect under way ends at its timeout)."""
FAILPOINT_ENV = "WAYSTATION_FAILPOINT"


def _failpoint(value: str | None, want: str) -> int | None:
    """N of ``want:N`` (the test hooks in the module docstring), else None."""
    if not value:
        return None
    name, _, count = value.partition(":")
    if (name not in ("after_commit", "stall_after_connect") or not count.isdigit()
            or int(count) < 1):
        raise ValueError(f"{FAILPOINT_ENV}={value!r}: expected after_commit:N or "
                         "stall_after_connect:MS, with N, MS >= 1")
    return int(count) if name == want else None


def _refuse_twin(store: Store, cfg: ServerConfig) -> None:
    """Refuse to start as a merge server that another process on this host runs now
    (`broker.server.process_identity.running_twin`), before the engine records itself
    over that server's liveness row."""
    with store.read() as txn:
        rows = txn.servers()
    twin = running_twin(rows, cfg.server_id)
    if twin is None:
        return
    pid = pid_of(twin.proc)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(twin.started_ms / 1000))
    raise ServerIdTaken(
        f"merge server {twin.id} is already running on this host (PID {pid}, started "
        f"{started}) with this store: stop it first (`systemctl stop waystation-server`, "
        f"or Ctrl-C / `kill {pid}` for a `waystation server run` in a terminal); every "
        "merge server needs its own server_id")


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class MergeServer:
    """One merge consumer; `start()` / `stop()`, or `run()` in the foreground."""

    def __init__(self, cfg: ServerConfig, catalog: Catalog, *,
                 env: Mapping[str, str] | None = None, store: Store | None = None,
                 password_provider: PasswordProvider | None = None) -> None:
        """`password_provider`: asked for the broker password at each MQTT connection
        attempt instead of the config's (`broker.cli.daemons.awaited_login`)."""
        self.cfg = cfg
        self.env = dict(os.environ if env is None else env)
        self.store = store if store is not None else open_store(cfg)
        self._owns_store = store is None
        try:
            _refuse_twin(self.store, cfg)
        except ServerIdTaken:
            if self._owns_store:
                self.store.close()
            raise
        self.announcer: SideAnnouncer | None = None
        self.engine = Engine(self.store, catalog, cfg, wall_ms, Clock("~server", wall_ms))
        self.rotation_logins = broker_logins(
            cfg.enrol, lambda: load_config(BrokerConfig, None, self.env).resolved_password_file(),
            background=True)
        self._rotation_failures: dict[str, int] = {}
        self.login_removals = login_removals(self.rotation_logins)
        prefix = cfg.mqtt.prefix
        self.prefix = prefix
        up = f"{prefix}/+/up"
        self.up_filter = f"$share/{cfg.shared_group}/{up}" if cfg.shared_group else up
        self.status_filter = f"{prefix}/+/status"
        self.intake = Intake(IntakeLimits(max_bytes=cfg.intake.max_bytes,
                                          device_bytes=cfg.intake.device_bytes,
                                          max_payload=cfg.merge.max_payload_bytes))
        self._dropped_logged = 0
        self._stopping = threading.Event()
        self._abandoned = threading.Event()
        self._interrupted = False  # the store, by a stop (`_abandon`)
        self._thread: threading.Thread | None = None
        self._last_loop = time.monotonic()
        self.messages_in = 0
        self.messages_out = 0
        self.groups = 0
        self.group_seconds = 0.0
        # Test hook (module docstring): crash after the N-th applying group's commit.
        self._fail_after_commit = _failpoint(self.env.get(FAILPOINT_ENV), "after_commit")
        self._stall_after_connect = _failpoint(self.env.get(FAILPOINT_ENV),
                                               "stall_after_connect")
        self._fp_applied = 0
        self._fp_groups = 0
        self.link: MqttLink | AmqpLink
        self._amqp: AmqpLink | None = None
        if cfg.amqp.enabled:
            # imported here: pika (~0.02 s of CPU, ~0.06 s under coverage) only for the
            # servers that use it
            from broker.server.amqp_link import AmqpLink

            # RabbitMQ: up and status from its queues over AMQP (broker/server/amqp_link.py);
            # the announcement over a small MQTT link of its own (broker/server/announcer.py)
            self.announcer = side_announcer(cfg, env=self.env)
            answers = self.announcer is not None and cfg.announce
            self.link = self._amqp = AmqpLink.from_config(
                cfg, env=self.env, on_connect=self._on_connect, on_message=self._on_message,
                server_states=cfg.server_group if answers else None,
                on_server_state=self.announcer.on_server_state if self.announcer else None)
            self.up_filter = f"amqp:{self.link.up_queue}"
        else:
            # The announcement's last will: the broker says "offline" for a server that
            # crashed or lost its link (PROTOCOL.md §7.12).
            self.link = MqttLink.from_config(
                cfg.mqtt, client_id=f"waystation-{cfg.server_id}", env=self.env,
                clean_session=cfg.shared_group is not None,
                max_inflight=0, max_queued=0, will=announcement_will(cfg),
                on_connect=self._on_connect,
                on_message=self._on_message,
                on_retained=self._on_retained,
                password_provider=password_provider,
            )
        # Statuses first: the broker replays the retained ones when it takes the
        # subscription, so on a connection that forgot presence ("connected") they all
        # arrive ahead of any change, whose delta then reaches every device online
        # (the intake serves them before devices' messages: broker.server.intake.fair).
        self.link.subscribe(self.status_filter, qos=1)
        self.link.subscribe(self.up_filter, qos=1)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="merge-worker", daemon=True)
        self._thread.start()
        self.link.start()
        if self.announcer is not None:
            self.announcer.start()

    def stop(self) -> None:
        """Finish the group in hand and what is queued, then close the session and the
        store; within `_STOP_GRACE_S` + `_STOP_ABANDON_S` whatever the store does."""
        self._stopping.set()
        self.intake.close()
        if self._thread is not None:
            self._thread.join(_STOP_GRACE_S)
            if self._thread.is_alive():
                self._abandon()
                self._thread.join(_STOP_ABANDON_S)
        # A clean stop sends no last will: say "offline" ourselves.
        if self.announcer is not None:
            self.announcer.stop()
        elif isinstance(self.link, MqttLink):
            announce_on(self.link, self.cfg, False, wall_ms())
        self.link.stop(clean=True)
        if self._owns_store:
            self.store.close()

    def _abandon(self) -> None:
        """The worker did not finish within the stop's grace: make its store call return
        (`Store.interrupt`: a PostgreSQL store's ends; an LMDB call waits on no network,
        its interrupt is a no-op) and have it leave what is still queued."""
        log.warning("stop_abandoning", grace_s=_STOP_GRACE_S, inbox=self.intake.stats().items)
        if self._owns_store:
            # Set before the call: the worker's call fails as soon as it is interrupted,
            # and it must not then flush through the store.
            self._interrupted = self.store.interruptible
            self.store.interrupt()
        self._abandoned.set()

    def metrics_snapshot(self) -> dict[str, Any]:
        """Counters for the metrics endpoint (read from another thread: copies only)."""
        counters: dict[str, int] = {}
        for _ in range(3):  # the worker may resize the Counter while we copy it
            try:
                counters = dict(self.engine.counters)
                break
            except RuntimeError:
                continue
        registry = self.engine.registry
        intake = self.intake.stats()
        letters = self.engine.dead_letter_stats
        return {"counters": counters, "messages_in": self.messages_in,
                "messages_out": self.messages_out, "groups": self.groups,
                "group_seconds": self.group_seconds,
                "devices_registered": len(registry.devices()),
                "devices_online": len(self.engine.presence.online()),
                "devices_clock_off": self.engine.clocks.off(),
                "inbox": intake.items, "intake": intake.to_json(),
                "dead_letter_store": None if letters is None else letters.to_json(),
                "connected": self.link.connected,
                "announce_connected": (None if self.announcer is None
                                       else self.announcer.connected),
                "zd3": None if self.engine.recent is None else self.engine.recent.to_json()}

    @property
    def healthy(self) -> bool:
        return time.monotonic() - self._last_loop < 30

    # ------------------------------------------------------------------ network thread

    def _on_connect(self, session_present: bool) -> None:
        # The link subscribes again on every connect and the broker replays every
        # retained status. Without a kept session presence is rebuilt from those alone;
        # with one, the statuses queued while we were away and the replay keep it right.
        if not session_present:
            self.intake.put_control("connected")
        if isinstance(self.link, MqttLink):
            announce_on(self.link, self.cfg, True, wall_ms())
        log.info("server_connected", session_present=session_present, up=self.up_filter)

    def _on_retained(self, topic: str, payload: bytes) -> None:
        """A retained message the broker replays on subscribe (MQTT only): a status that
        may be days old, which tells presence but not how far the device's clock is."""
        self._on_message(topic, payload, retained=True)

    def _on_message(self, topic: str, payload: bytes, retained: bool = False) -> None:
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != self.prefix or parts[2] not in ("up", "status"):
            log.warning("unexpected_topic", topic=topic[:200])
            return
        # Blocks while the intake is full: paho reads nothing more meanwhile. When it
        # arrived goes with it: a status's `t` is compared with it, not with when the
        # worker gets to it (`broker.server.clockskew`).
        verdict = self.intake.put(parts[2], parts[1], payload, retained=retained,
                                  at=wall_ms())
        if verdict is Verdict.DROPPED and self._amqp is not None:
            # Dropped on purpose (the device is over its quota; it resends what is not
            # acked): RabbitMQ must not keep it unacknowledged, or consumption stalls.
            self._amqp.settle([Item(parts[2], parts[1], payload, len(payload))])

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        window = self.cfg.merge.batch_window_ms / 1000
        next_tick = time.monotonic() + _TICK_S
        while True:
            self._last_loop = time.monotonic()
            # Cap a group by payload bytes too: every ack of a group waits for its one
            # commit, so a huge group would stall acks while a backlog drains.
            group = self.intake.take(max(0.0, next_tick - time.monotonic()),
                                     max_items=_MAX_GROUP, max_bytes=_MAX_GROUP_BYTES,
                                     window=window)
            if group is None or self._abandoned.is_set():
                # contact times and presence wait for a tick; and say we stopped cleanly
                # (not through a store the stop interrupted: every write fails there)
                if not self._interrupted:
                    self.engine.flush(stopping=True)
                return
            if group:
                self._process(group)
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + _TICK_S
                self.engine.heartbeat.broker(self.link.connected, wall_ms())
                self._publish(self.engine.tick())
                self._log_drops()
                self._advance_rotations()

    def _advance_rotations(self) -> None:
        """Broker password rotations: the broker steps they owe (`rotation_files`); and
        the logins of removed devices still to delete (`login_removal`)."""
        try:
            advance(self.store, self.engine.registry, self.rotation_logins, wall_ms(),
                    self._rotation_failures)
        except Exception:
            log.exception("password_rotation_failed")
        if self.login_removals is not None:
            try:
                self.login_removals.advance(self.store, wall_ms())
            except Exception:
                log.exception("device_login_removal_crashed")

    def _process(self, group: list[Item]) -> None:
        ups: list[tuple[str, bytes]] = []
        for item in group:
            if item.kind == "up" and not item.refused:
                ups.append((item.device, item.payload))
                continue
            if ups:
                # Keep arrival order between changes and what follows them.
                self._publish(self._handle(ups))
                ups = []
            if item.refused:
                self._publish(self.engine.handle_refused(item.device, item.kind,
                                                         item.payload, item.size))
            elif item.kind == "status":
                self._publish(self.engine.handle_status(
                    item.device, item.payload, live=not item.retained,
                    received_ms=item.at or None))
            elif item.kind == "connected":
                self.engine.reset_presence()
                if self._stall_after_connect is not None:
                    log.warning("failpoint_stall_after_connect", ms=self._stall_after_connect)
                    time.sleep(self._stall_after_connect / 1000)
        if ups:
            self._publish(self._handle(ups))
        if self._amqp is not None:
            # only now, the group committed and answered: RabbitMQ may forget it
            self._amqp.settle(group)

    def _log_drops(self) -> None:
        stats = self.intake.stats()
        if stats.dropped > self._dropped_logged:
            log.warning("intake_dropped", dropped=stats.dropped - self._dropped_logged,
                        dropped_total=stats.dropped, device_bytes=stats.device_bytes,
                        queued_bytes=stats.bytes)
            self._dropped_logged = stats.dropped

    def _handle(self, ups: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        self.messages_in += len(ups)
        started = time.perf_counter()
        try:
            out = list(self.engine.handle_many(ups))
        except Exception:
            # The engine turns bad input into rejections itself; this is a store or
            # programming failure. Devices resend what was not acked.
            log.exception("group_failed", messages=len(ups))
            return []
        finally:
            self.groups += 1
            self.group_seconds += time.perf_counter() - started
        if self._fail_after_commit is not None:
            self._failpoint()
        return out

    def _failpoint(self) -> None:
        """The after_commit test hook: the group committed, nothing is published yet."""
        applied = self.engine.counters["applied"]
        if applied <= self._fp_applied:
            return
        self._fp_applied = applied
        self._fp_groups += 1
        if self._fp_groups >= (self._fail_after_commit or 0):
            log.warning("failpoint_after_commit", group=self._fp_groups, applied=applied)
            os.kill(os.getpid(), signal.SIGKILL)

    def _publish(self, out: list[tuple[str, bytes]]) -> None:
        # Not kept for later: an ack or a page is asked for again, a command sent at the
        # next hello; a delta nobody asks for is shown by the engine's nudge.
        lost: set[str] = set()
        for dev, payload in out:
            if self.link.publish(f"{self.prefix}/{dev}/down", payload):
                self.messages_out += 1
            else:
                lost.add(dev)
        for dev in sorted(lost):
            self.engine.undelivered(dev)


def run(cfg: ServerConfig, *, env: Mapping[str, str],
        password_provider: PasswordProvider | None = None) -> int:
    """Run the server in the foreground until SIGTERM/SIGINT (systemd-aware)."""
    check_state_directory(cfg.data_dir, env, "server")
    catalog = load_catalog(cfg.schema_path())
    server = MergeServer(cfg, catalog, env=env, password_provider=password_provider)
    metrics: list[Any] = []

    def start() -> None:
        server.start()
        if cfg.metrics_port is not None:
            from broker.server.metrics import serve_metrics

            metrics.append(serve_metrics(server, cfg.metrics_port, cfg.metrics_host,
                                        max_connections=cfg.metrics_max_connections,
                                        timeout_s=cfg.metrics_timeout_s))
        log.info("server_started", server_id=cfg.server_id,
                 broker=f"{cfg.mqtt.host}:{cfg.mqtt.port}", store=cfg.store.kind,
                 schema_version=server.engine.catalog.version,
                 schema_file_version=catalog.version, subscription=server.up_filter,
                 metrics=f"{cfg.metrics_host}:{cfg.metrics_port}" if metrics else None)

    def stop() -> None:
        for endpoint in metrics:
            endpoint.shutdown()
        server.stop()

    def status() -> str:
        state = "connected" if server.link.connected else "connecting"
        intake = server.intake.stats()
        announcing = "" if server.announcer is None else server.announcer.status()
        return (f"{state}, {server.messages_in} messages in, {intake.bytes} bytes waiting, "
                f"{intake.dropped} dropped{announcing}")

    return run_service(start=start, stop=stop, healthy=lambda: server.healthy,
                       status=status, env=env)
