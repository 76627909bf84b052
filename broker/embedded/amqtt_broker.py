"""The embedded MQTT broker: amqtt 0.12.1 with Waystation's auth, ACL and socket tuning.

    EmbeddedBroker(BrokerSettings(...))      start() / stop(), or ``async with``
    serve(cfg, ready=None, stop=None)       run until ``stop`` is set (or the task is cancelled)
    run(cfg) -> int                         blocking, SIGTERM/SIGINT -> clean shutdown
    broker_run(args, env) -> int            the ``waystation broker run`` handler
    python -m broker.embedded --port ...    the same, configured from the command line

amqtt is used through its supported plugin mechanism (``broker.embedded.plugins``); on top
of that a small subclass of amqtt's ``Broker`` (``broker.embedded.amqtt_overrides``, its
per-connection handler in ``broker.embedded.amqtt_handler``)
changes sixteen things amqtt 0.12.1 gets wrong for a fleet (each measured; see the tests in
tests/broker/test_embedded.py and tests/e2e/test_silent_links.py):

1. TCP_NODELAY is set (and checked) on every accepted client socket.
2. A CONNECT is authenticated *before* amqtt touches its session table. Stock amqtt
   first deletes (clean session) or takes over (persistent session) the session of the
   client id it was sent, and only then looks at the credentials, so anyone able to open
   a TCP connection could kick any device offline or wipe its queued messages.
3. Retained messages go only to clients subscribed to them, and only if the ACL's
   "receive" check allows it; on every connect stock amqtt sends the client every
   retained message matching *any* client's subscription, unchecked.
4. With ``tls_require_client_cert`` the TLS listener demands a client certificate
   (amqtt hard-codes CERT_OPTIONAL).
5. A packet over ``max_packet_bytes`` (PROTOCOL.md's 256 KiB payload plus header room)
   drops its sender's connection before amqtt reads it into memory
   (``broker.embedded.packet_limit``); amqtt has no limit at all. So does a packet whose
   fields run past its own end: amqtt read on into the next packets, and a lying topic
   length let a client shift its framing past the limit (200 MiB buffered, measured).
6. A client that sends nothing for 1.5 times its keepalive is disconnected and its last
   will published (MQTT 3.1.1 §3.1.2.10). amqtt only logs the read timeout and waits on,
   so a device whose link went silent (no FIN, no reset: a dead cell, a dropping NAT)
   stayed connected for ever: its will never went out and the server showed it online.
7. A persistent session taken over by a new connection of its client (a device that
   reconnects before the broker saw its old connection end: a new certificate, a NAT
   that rebinds) stays with the new connection. amqtt let the old connection's end mark
   the shared session disconnected, so every message for the device was queued for a
   session it believed offline while the device sat connected and heard nothing (its
   catch-ups and acks unanswered until it reconnected), and published the will, which
   the new CONNECT had already replaced, over the device's fresh status. A clean-session
   CONNECT of a connected client left the old connection open (two live connections of
   one client id, MQTT 3.1.1 §3.1.4-2); it is closed now, without its will. A take-over
   of a connection still starting no longer hangs both (amqtt waited for a reader that
   never ran: in a reconnect storm of one device id, clients hung without CONNACK and
   each race leaked a socket in CLOSE_WAIT), and one arriving while the old connection
   is ending (a clean DISCONNECT and at once a new login) is seen by that end too. A
   take-over of a connection with packets still buffered completes at once (Python
   3.11's wait_for dropped the cancellation of its reader, which read on until the
   keepalive ran out: the new CONNECT unanswered for up to 90 s), and what the old
   connection was PUBACKed for is routed before a clean take-over deletes its session.
   The CONNECTs of one client id take turns from the session table to their attach
   (``broker.embedded.attach_turns``): a broker frozen and resumed found a device's old
   connection, its abandoned attempts and its live one at once, all took the old one
   over, and the first to attach, stopped by no one, ended as the session's end (the
   will over the fresh status, the session marked disconnected under the live
   connection, deaf until it reconnected: tests/broker/test_embedded_takeover_storm.py).
8. What the broker holds for one client is bounded (``max_queued_messages``,
   ``max_queued_mb``; ``broker.embedded.session_queue``): messages for a client that is
   away or not reading are dropped beyond the limit, and a client sending faster than
   the broker routes is not read meanwhile. amqtt held all of it, so a device flooding
   while the server was down or stuck grew the broker until it died. What a client sent
   before it left is routed at once (amqtt kept it for its next connection), taken out
   of its session as it is marked disconnected: amqtt's session monitor empties a
   disconnected clean session's queues every second, and on a loaded machine the tail
   of a flood, PUBACKed, was lost while it was being routed.
9. A connection must send its CONNECT within ``connect_timeout_s`` (15 s), and one that
   fails to (nothing, half a packet, another packet first, or closed early) is closed
   at once (``broker.embedded.client_limits``). amqtt waited for ever and never closed
   such sockets, even after the client had gone, so port scans or a slowloris used up
   the broker's file descriptors and locked every device out. A client that leaves
   ``QOS2_INFLIGHT_MAX`` (100) QoS 2 messages unreleased (PUBREC sent, no PUBREL), or
   ``max_queued_mb`` of them, is disconnected on the next one: amqtt kept them all,
   up to 65,535 per client, and kept every later packet's task behind one unreleased
   (~640 bytes per 2-byte PINGREQ, for the whole connection). A client that stops in
   the middle of a packet for 1.5 times its keepalive (no byte arriving) is disconnected
   as a silent one, its will published: fix 6's timer covered only the wait between
   packets, so such a client stayed connected for ever. A PUBLISH with QoS 3 closes
   the connection (MQTT 3.1.1 §3.3.1.2); amqtt kept it and logged a 1 KB traceback for
   each 8-byte packet.
10. The log lines one client can cause are bounded (``broker.embedded.log_limits``): one
   line of a kind per client per minute, then one saying how many more there were. amqtt
   logged a line per unknown PUBACK and per refused publish (~130 B each) and a warning
   and a traceback (1 KB) per QoS 1 message a device never PUBACKed, so one device could
   fill the disk or hit journald's rate limit, which then drops the broker's other lines.
   A field of a line (a client id, a user, a topic) is cut to 300 characters: a device's
   65,535-byte client id cost 131 KB of log per refused CONNECT.
11. How many connections one source holds, and how fast it may guess passwords, are
   bounded (``broker.embedded.conn_table``, ``login_guard``, hooked in by ``conn_guard``):
   a connection beyond ``max_connecting_per_ip`` (128) from one address not yet logged
   in, or beyond ``max_connections`` in all, is closed at once; after
   ``login_backoff_after`` (5) failed logins of one username from one address that pair
   is refused unchecked for a doubling backoff, and an address with
   ``login_failures_per_ip`` (100) failures in 60 s is refused for the rest of them
   (usernames that logged in from it before excepted). Passwords are hashed on
   ``login_check_threads`` (1) thread, not on the event loop. amqtt accepted every
   connection (2,000 idle sockets from one host held 2,000 file descriptors until the
   CONNECT deadline, and a host reopening them held them for ever) and checked every
   password on its one event loop, as fast as a guesser sent them.
12. The subscription table is iterated over a copy (``SubscriptionTable``): amqtt's loops
   over it await inside, and a client subscribing or leaving meanwhile made a message
   being delivered die undelivered with "dictionary changed size during iteration" and
   a traceback (at every stop of a broker with clients, and whenever a publish
   coincided with a disconnect).
13. What MQTT 3.1.1 forbids is refused (``broker.embedded.protocol_checks``, read as it
   arrives by ``broker.embedded.protocol_reader``): fixed-header flags other than the
   spec's, a packet before CONNECT or a second one, a CONNECT whose will flags contradict
   each other or whose client id, will topic or user name is not UTF-8 or holds U+0000
   (MQTT 3.1.1 §1.5.3; amqtt answered CONNACK 5, as for a wrong password), SUBSCRIBE
   asking for QoS 3, malformed topic filters, and a PUBLISH to a wildcard, empty, NUL or
   non-UTF-8 topic close the connection (amqtt granted "QoS 3", and read a wildcard
   PUBLISH's payload as the client's next packets). An MQTT 5 or
   MQTT 3.1 CONNECT gets CONNACK 0x01 and a log line saying to switch the client to
   3.1.1; amqtt dropped both without a CONNACK.
14. The TLS handshake runs inside the CONNECT deadline, and a failed one is logged with
   its reason and what to do (``broker.embedded.tls_accept``): asyncio gave a handshake
   60 s whatever ``connect_timeout_s`` said and logged no failure, so a device with a
   missing or foreign certificate failed without a word. A TLS connection the broker
   closes waits 3 s, not 30, for the client's close_notify, and each TLS connection
   reads through a 32 KiB buffer, not asyncio's 256 KiB (~315 KB per pending handshake).
15. The retained messages replayed on a subscription are each the topic's latest when
   sent. amqtt copied them all when the replay started and sent the copy one ACL check
   (an await) at a time, so a message published on one of those topics meanwhile
   reached the subscriber live and the older copy came after it, flagged retained: the
   merge server, resubscribing after a broker freeze, read a device's stale last will
   after its fresh "online" status and kept it offline, sending it no deltas
   (tests/broker/test_retained_replay_order.py).
16. A QoS 1 message a persistent session's connection did not acknowledge before it
   stopped (its client left, or a new connection took the session over), or routed to
   it while it stopped, goes to the session's connection after it, live (MQTT 3.1.1
   §4.4; ``KeepaliveHandler._hand_back``). amqtt's stop gave up the PUBACK waits and
   forgot the messages: the merge server, reconnecting, missed a device's status
   published at that moment, or got it only as the retained replay
   (tests/broker/test_session_resend.py).

amqtt keeps nothing across a restart and has no shared subscriptions: a server consumer
on this broker subscribes to ``{prefix}/+/up`` directly (``$share/...`` filters are
accepted by the ACL but never match anything on amqtt).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import amqtt
import structlog
from amqtt.broker import Broker

from broker.embedded import log_limits
from broker.embedded.amqtt_overrides import AMQTT_VERSION, OVERRIDDEN, WaystationBroker
from broker.embedded.client_limits import CONNECT_TIMEOUT_S
from broker.embedded.conn_table import MAX_CONNECTING_PER_IP, MAX_CONNECTIONS
from broker.embedded.login_guard import BACKOFF_MAX_S, LOGIN_FAILURES, SOURCE_FAILURES
from broker.embedded.session_queue import QueueLimits
from broker.embedded.settings import BrokerSettings
from broker.errors import ServerError
from waystation.errors import ListenError, WaystationError

__all__ = [
    "BrokerPortInUse",
    "BrokerSettings",
    "EmbeddedBroker",
    "EmbeddedBrokerError",
    "broker_run",
    "main",
    "run",
    "serve",
]

log = structlog.get_logger(__name__)


class _NoStartupTraceback(logging.Filter):
    """amqtt logs a failed start with a traceback; EmbeddedBrokerError already says what
    failed in one line (port in use, TLS files), so keep amqtt's line, drop the trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Broker startup failed"):
            record.exc_info = None
            record.exc_text = None
        return True


logging.getLogger("amqtt.broker").addFilter(_NoStartupTraceback())
REPEATS = log_limits.install()
"""Holds back repeated lines a client causes (`broker.embedded.log_limits`)."""

class EmbeddedBrokerError(ServerError):
    """The embedded broker could not start (port in use, bad TLS files, ...)."""


class BrokerPortInUse(EmbeddedBrokerError, ListenError):
    """A listener's port is taken: exit code 4 (ListenError), as `--help` documents."""


SHUTDOWN_TIMEOUT_S = 5.0
"""How long `EmbeddedBroker.stop` waits for amqtt's shutdown before going on without it."""


class EmbeddedBroker:
    """One amqtt broker with Waystation's plugins; ``async with EmbeddedBroker(s): ...``."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self._broker: WaystationBroker | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> EmbeddedBroker:
        """Construct from a pydantic ``BrokerConfig`` (or anything with its attributes)."""
        return cls(BrokerSettings.from_config(cfg))

    @property
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._broker is not None

    async def start(self) -> None:
        """Open the listeners; raises EmbeddedBrokerError when that fails."""
        if self._broker is not None:
            return
        _check_amqtt()
        s = self.settings
        if s.data_dir is not None:
            s.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_password_file(s.password_file)
        try:
            broker = WaystationBroker(
                s.amqtt_config(), require_client_cert=s.tls_require_client_cert,
                max_packet=s.max_packet_bytes,
                queue_limits=QueueLimits(s.max_queued_messages, s.max_queued_bytes),
                connect_timeout=s.connect_timeout_s,
                conn_limits=s.conn_limits(), login_limits=s.login_limits(),
            )
            await broker.start()
        except Exception as exc:  # amqtt: BrokerError (bind failed, TLS files), dacite, ...
            in_use = _address_in_use(exc)
            if in_use is not None:  # taken since broker_run checked it: name it all the same
                raise BrokerPortInUse(f"the embedded broker could not start: {in_use}; stop "
                                      "the process holding the port or set port / tls_port "
                                      "in the broker config to a free one") from None
            raise EmbeddedBrokerError(f"the embedded broker could not start: {exc}") from exc
        self._broker = broker
        log.info("embedded broker listening", host=s.host, port=s.port, tls_port=s.tls_port,
                 prefix=s.prefix, password_file=str(s.password_file))

    async def stop(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Close every connection and listener (idempotent), giving amqtt's shutdown
        `timeout` seconds: now and then (more often on a loaded machine) it waits forever
        on a client handler, and SIGTERM must still end the broker. What it leaves open
        the process's exit closes."""
        broker, self._broker = self._broker, None
        if broker is None:
            return
        shutdown = asyncio.ensure_future(broker.shutdown())
        done, _ = await asyncio.wait({shutdown}, timeout=timeout)
        REPEATS.close()  # what it held back is said before the last line
        if done:
            shutdown.result()
            log.info("embedded broker stopped")
            return
        shutdown.cancel()
        log.warning("embedded broker shutdown did not finish; stopping without it",
                    timeout_s=timeout)

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def ensure_password_file(path: Path) -> None:
    """Create an empty password file (mode 0600) if there is none, and say what that means."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        log.warning(
            "created an empty password file: no device can connect until one is enrolled",
            path=str(path),
        )


async def serve(
    cfg: Any,
    ready: Callable[[], object] | None = None,
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set or the task is cancelled; call ``ready()`` once listening."""
    broker = EmbeddedBroker(BrokerSettings.from_config(cfg))
    await broker.start()
    try:
        if ready is not None:
            ready()
        await (stop or asyncio.Event()).wait()
    finally:
        await broker.stop()


def run(cfg: Any, *, env: Mapping[str, str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then shut down cleanly; returns 0 after SIGTERM, 130
    after SIGINT (Ctrl-C), the exit codes `waystation --help` documents.

    Blocking; for the CLI. A broker that cannot start raises EmbeddedBrokerError (the CLI
    prints it as one line). Under systemd (Type=notify) it reports READY once listening
    and feeds the watchdog while its event loop keeps turning.
    """
    from waystation import systemd

    notify_env: Mapping[str, str] = env if env is not None else {}
    beat = systemd.Heartbeat(30.0)
    watchdog = systemd.Watchdog(beat, env=notify_env)

    async def heartbeat(stop: asyncio.Event) -> None:
        while not stop.is_set():
            beat.beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)

    def ready() -> None:
        log.info("embedded broker ready")
        systemd.ready(env=notify_env)
        watchdog.start()

    received: list[int] = []

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            received.append(signum)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        beater = asyncio.create_task(heartbeat(stop))
        try:
            await serve(cfg, ready=ready, stop=stop)
        finally:
            stop.set()
            await beater

    try:
        asyncio.run(main())
    finally:
        systemd.stopping(env=notify_env)
        watchdog.stop()
    return 130 if received and received[0] == signal.SIGINT else 0


def broker_run(args: Any, env: Mapping[str, str]) -> int:
    """``waystation broker run``: load the ``broker`` part of the config file and serve."""
    from broker.embedded.server_login import ensure_server_login
    from waystation.config import BrokerConfig, load_config
    from waystation.logs import configure_logging
    from waystation.ports import check_listen
    from waystation.service import check_state_directory

    cfg = load_config(BrokerConfig, getattr(args, "config", None), env, part="broker")
    configure_logging(cfg.log)
    check_state_directory(cfg.data_dir, env, "broker")
    check_listen(cfg.host, cfg.port, "broker", "port")
    if cfg.tls_port is not None:
        check_listen(cfg.host, cfg.tls_port, "broker", "tls_port")
    ensure_server_login(cfg.resolved_password_file(), cfg.data_dir, cfg.server_users)
    return run(BrokerSettings.from_config(cfg), env=env)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m broker.embedded``: the broker configured from command-line options."""
    parser = argparse.ArgumentParser(prog="python -m broker.embedded", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--password-file", type=Path, default=None)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--prefix", default="waystation")
    parser.add_argument("--server-user", action="append", dest="server_users", default=None,
                        help="a user with full access under the prefix (repeatable)")
    parser.add_argument("--allow-anonymous", action="store_true")
    parser.add_argument("--tls-port", type=int, default=None)
    parser.add_argument("--tls-cert", type=Path, default=None)
    parser.add_argument("--tls-key", type=Path, default=None)
    parser.add_argument("--tls-ca", type=Path, default=None)
    parser.add_argument("--tls-require-client-cert", action="store_true")
    parser.add_argument("--max-packet-bytes", type=int, default=None)
    parser.add_argument("--max-queued-messages", type=int, default=None)
    parser.add_argument("--max-queued-mb", type=int, default=None)
    parser.add_argument("--connect-timeout-s", type=float, default=None,
                        help="close a connection that sends no CONNECT within this "
                             f"(default {CONNECT_TIMEOUT_S:g})")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="close a new connection beyond this many open ones "
                             f"(default {MAX_CONNECTIONS})")
    parser.add_argument("--max-connecting-per-ip", type=int, default=None,
                        help="close a new connection beyond this many from one address "
                             f"not logged in yet (default {MAX_CONNECTING_PER_IP})")
    parser.add_argument("--login-backoff-after", type=int, default=None,
                        help="failed logins of a username from one address before it is "
                             f"refused unchecked for a doubling backoff (default "
                             f"{LOGIN_FAILURES})")
    parser.add_argument("--login-backoff-max-s", type=float, default=None,
                        help=f"the longest such backoff (default {BACKOFF_MAX_S:g})")
    parser.add_argument("--login-failures-per-ip", type=int, default=None,
                        help="failed logins from one address in 60 s before it is refused "
                             f"for the rest of them (default {SOURCE_FAILURES})")
    parser.add_argument("--login-check-threads", type=int, default=None,
                        help="passwords checked at once, off the event loop (default 1)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-repeat-window-s", type=float, default=log_limits.INTERVAL_S,
                        help="log one line of a kind per client this often, with the count "
                             f"of those held back (default {log_limits.INTERVAL_S:g})")
    ns = parser.parse_args(argv)
    if not 0 < ns.log_repeat_window_s <= 3600:
        parser.error("--log-repeat-window-s must be between 0 and 3600 seconds")
    REPEATS.interval_s = ns.log_repeat_window_s
    from waystation.config import LogConfig
    from waystation.logs import configure_logging

    try:
        settings = BrokerSettings.from_config(ns)
        configure_logging(LogConfig(level=settings.log_level))  # type: ignore[arg-type]
        return run(settings)
    except WaystationError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code


def _address_in_use(exc: BaseException) -> str | None:
    """The bind error (EADDRINUSE) behind an amqtt start-up failure, if that is what it is."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno == errno.EADDRINUSE:
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    # amqtt may wrap the OSError into its BrokerError by message only.
    text = str(exc)
    return text if f"[Errno {errno.EADDRINUSE}]" in text else None


def _check_amqtt() -> None:
    missing = [name for name in OVERRIDDEN if not hasattr(Broker, name)]
    if amqtt.__version__ != AMQTT_VERSION or missing:
        raise EmbeddedBrokerError(
            f"amqtt {amqtt.__version__} is installed but broker/embedded.py was written for "
            f"amqtt {AMQTT_VERSION} (it overrides broker internals{': ' if missing else ''}"
            f"{', '.join(missing)}); install amqtt=={AMQTT_VERSION} or review the overrides"
        )
