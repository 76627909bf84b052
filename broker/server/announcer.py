"""The merge server's announcement (PROTOCOL.md §7.12) on an MQTT connection: the last
will, "up" after every connect, "down" on a clean stop, and the clearing that
`announce = false` does.

Over MQTT the server announces on its own link (`announce_on`, `announcement_will`).
Over AMQP (`[amqp] nodes`, RabbitMQ) it has no MQTT link for that, so `SideAnnouncer`
keeps a small one of its own to RabbitMQ's MQTT listener (the `[mqtt]` host, port and
login the devices' broker already has in that config), used for nothing else: no
subscription, a clean session (RabbitMQ keeps no queue for it). Without it a RabbitMQ
fleet whose servers are all down keeps draining devices into RabbitMQ's up queue, and
`agent status` never says "server unavailable since T".

The side link must never stop the server from merging: it connects in the background,
retries with MqttLink's backoff forever, and while it cannot connect the server merges
over AMQP as before; what is wrong is logged once per outage (`announce_link_failed`,
with what to do) and shown in the systemd status line and the metrics.

RabbitMQ keeps retained messages per node and gives them only to exact-topic
subscriptions, so a device's `+` subscription gets the live announcements and the will
(routed cluster-wide through `amq.topic`), never the retained copies: a device connected
while its servers go down hears it; one connecting while they are down sees its group
as unknown and drains (the broker queues its changes) until the next announcement.

The same gap would hold a device wrongly: one that connected after every server of its
group announced knows none of them; when one of them dies, it hears that one's will
alone, and "every server announced is down" holds it while the others still serve. So
the server also receives its group's announcements (over AMQP, on its status queue:
`AmqpLink(server_states=)`, which says why not over this link) and answers a "down"
with its own "up", live (`on_server_state`): the device holds for one round trip, not
until a server reconnects. It answers its own will too: one of an earlier connection
that RabbitMQ publishes late must not leave it announced down while it runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from broker.server.announce import server_down, state_payload, state_topic
from waystation.linkproblems import HINTS, LinkProblem
from waystation.mqtt import Backoff, MqttLink, Will

__all__ = ["SideAnnouncer", "announce_on", "announcement_will", "side_announcer"]

log = structlog.get_logger("waystation.server")

SIDE_BACKOFF = Backoff(initial=0.5, maximum=10.0)
"""The side link's reconnect delays: one connection per server (no fleet to spread),
and while it is down devices are not told when the group goes down, or stay held by a
will of its own: back within 10 s of the listener's return, not MqttLink's 30 s."""
REPEAT_WARNING_S = 300.0
"""`announce_link_failed` of the same kind is logged at most this often."""


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def announcement_will(cfg: Any) -> Will | None:
    """The last will of a server's announcing link (None with `announce = false`)."""
    if not cfg.announce:
        return None
    topic = state_topic(cfg.mqtt.prefix, cfg.server_group, cfg.server_id)
    return Will(topic, state_payload(cfg.server_group, cfg.server_id, False, None),
                qos=1, retain=True)


def announce_on(link: MqttLink, cfg: Any, online: bool, now_ms: int) -> bool:
    """Publish the announcement rules of §7.12 on `link`: `online` after a connect,
    not `online` on a clean stop. A server that does not announce (any more) clears, after
    each connect, what it announced before, or its retained "offline" would hold every
    device of its group. False: nothing could be handed to the link (not connected)."""
    topic = state_topic(cfg.mqtt.prefix, cfg.server_group, cfg.server_id)
    if cfg.announce:
        return link.publish(topic, state_payload(cfg.server_group, cfg.server_id, online,
                                                 now_ms), qos=1, retain=True)
    if online:
        return link.publish(topic, b"", qos=1, retain=True)
    return True


def _failure_hint(cfg: Any, problem: LinkProblem) -> str:
    what = HINTS.get(problem.kind, "")
    if cfg.announce:
        effect = ("devices keep sending into RabbitMQ while every server of the group is "
                  "down (they are not told the group is down) and `agent status` does not "
                  "say so; merging over AMQP is not affected")
        way_out = "or set announce = false to run without announcing"
    else:
        effect = ("an announcement this server made earlier is not cleared, so devices "
                  "that heard it may hold their changes; merging over AMQP is not affected")
        way_out = "or clear it by hand (deploy/README.md, \"Server announcements\")"
    return (f"{effect}. Check that [mqtt] host and port name RabbitMQ's MQTT listener "
            f"(mqtt.listeners.tcp.default, 1883 in deploy/rabbitmq/rabbitmq.conf), that "
            f"[mqtt] tls matches it and that the server's login may connect over MQTT; "
            f"{way_out}. The link retries by itself ({what})")


def side_announcer(cfg: Any, *, env: Mapping[str, str] | None = None) -> SideAnnouncer | None:
    """The side link of an AMQP-consuming server; None, after saying why, when its
    `[mqtt]` TLS settings cannot be loaded (a missing or unreadable file): merging over
    AMQP does not depend on them, so it goes on without announcing."""
    try:
        return SideAnnouncer(cfg, env=env)
    except (OSError, ValueError) as exc:
        tls = cfg.mqtt.tls
        files = [] if tls is None else [str(p) for p in (tls.ca_file, tls.cert_file,
                                                         tls.key_file) if p is not None]
        log.error("announce_link_unusable", reason=f"{type(exc).__name__}: {exc}",
                  tls_files=files,
                  hint="the server merges over AMQP but does not announce itself to "
                       "devices (they are not told when every server of the group is "
                       "down): fix [mqtt] tls (its files must exist and be readable by "
                       "the server's user) and restart it, or remove [mqtt] tls if "
                       "RabbitMQ's MQTT listener is plain, or set announce = false")
        return None


class SideAnnouncer:
    """The announcement of an AMQP-consuming server over its own MQTT connection to
    RabbitMQ's MQTT plugin (module docstring). `start()` / `stop()`; thread-safe reads."""

    def __init__(self, cfg: Any, *, env: Mapping[str, str] | None = None,
                 backoff: Backoff | None = None,
                 now_ms: Callable[[], int] = _wall_ms) -> None:
        self.cfg = cfg
        self.topic = state_topic(cfg.mqtt.prefix, cfg.server_group, cfg.server_id)
        self._now_ms = now_ms
        self._lock = threading.Lock()
        self._failing = False
        self._stopping = False
        self._logged: tuple[str, float] | None = None  # kind and time of the last warning
        self.problem: str | None = None
        """Why the side link is down now ("kind: detail"), None while it is up."""
        self.link = MqttLink.from_config(
            cfg.mqtt, client_id=f"waystation-{cfg.server_id}", env=env,
            clean_session=True, max_inflight=20, max_queued=100,
            will=announcement_will(cfg), backoff=backoff or SIDE_BACKOFF,
            on_connect=self._on_connect, on_disconnect=self._on_disconnect,
            on_problem=self._on_problem)

    @property
    def connected(self) -> bool:
        return self.link.connected

    def start(self) -> None:
        self.link.start()

    def stop(self) -> None:
        """A clean stop sends no last will: say "offline" ourselves, then disconnect."""
        self._stopping = True  # our own "offline" is not to be answered
        announce_on(self.link, self.cfg, False, self._now_ms())
        self.link.stop(clean=True)

    def status(self) -> str:
        """For the systemd status line: "" while all is well."""
        problem = self.problem
        if problem is None or self.link.connected:
            return ""
        return f"; NOT ANNOUNCING to devices (RabbitMQ MQTT listener: {problem})"

    def on_server_state(self, topic: str, payload: bytes) -> None:
        """An announcement of this server's group (from the AMQP link's thread): a
        server announced down, answer with our "up" (module docstring)."""
        cfg = self.cfg
        if (cfg.announce and not self._stopping and self.link.connected
                and server_down(topic, payload, prefix=cfg.mqtt.prefix,
                                group=cfg.server_group)):
            announce_on(self.link, cfg, True, self._now_ms())
            log.info("announce_repeated", down=topic.split("/")[3], topic=self.topic)

    # ------------------------------------------------------------ network thread

    def _on_connect(self, session_present: bool) -> None:
        announce_on(self.link, self.cfg, True, self._now_ms())
        with self._lock:
            recovered, self._failing = self._failing, False
            self.problem = None
        log.info("announce_link_connected", host=self.link.host, port=self.link.port,
                 topic=self.topic, announce=self.cfg.announce, after_failure=recovered)

    def _on_disconnect(self, reason: str) -> None:
        with self._lock:
            self.problem = f"disconnected: {reason}"

    def _on_problem(self, problem: LinkProblem, delay_s: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.problem = f"{problem.kind}: {problem.detail}"
            first, self._failing = not self._failing, True
            # Once per outage, and a link that keeps connecting and dropping at once
            # (a broker closing it) not every time: MqttLink logs each new reason itself
            # (`mqtt connection attempt failed`), and retries with its backoff.
            say = first and (self._logged is None or self._logged[0] != problem.kind
                             or now - self._logged[1] >= REPEAT_WARNING_S)
            if say:
                self._logged = (problem.kind, now)
        if say:
            log.warning("announce_link_failed", host=self.link.host, port=self.link.port,
                        problem=problem.kind, reason=problem.detail,
                        retry_in_s=round(delay_s, 1), hint=_failure_hint(self.cfg, problem))
