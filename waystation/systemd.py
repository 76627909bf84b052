"""systemd integration, without a dependency: readiness, status and the watchdog.

    notify("READY=1", env=os.environ)     one sd_notify(3) datagram; False when not under systemd
    ready(env=...) / stopping(env=...) / status("text", env=...)
    watchdog_interval(env) -> seconds     from WATCHDOG_USEC (None: no watchdog for us)
    Watchdog(healthy, env=...)            feeds WATCHDOG=1 only while healthy() is true
    Heartbeat(max_age_s)                  a healthy() for a main loop: beat() each turn

The units in deploy/systemd are `Type=notify` with `WatchdogSec=`: systemd waits for
READY=1 before it counts the service as started, and restarts it when WATCHDOG=1 stops
arriving. A thread that pings unconditionally would keep a deadlocked daemon "alive"
forever, so `Watchdog` pings only while its `healthy()` callback says the work is
progressing; `Heartbeat` is the usual such callback: the main loop calls `beat()` on
every turn, and the heartbeat is healthy while the last beat is recent.

The protocol (sd_notify(3)): newline-separated `NAME=value` assignments in a single
datagram to the AF_UNIX socket named by $NOTIFY_SOCKET; a name starting with `@` is in
the abstract namespace. Nothing here reads os.environ: the entry point passes its
environment down, as it does for the configuration.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

__all__ = [
    "Heartbeat",
    "Watchdog",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog_interval",
]


def _address(env: Mapping[str, str]) -> str | bytes | None:
    """The datagram address in $NOTIFY_SOCKET, or None if unset or unusable."""
    name = env.get("NOTIFY_SOCKET", "")
    if name.startswith("@") and len(name) > 1:
        return b"\0" + name[1:].encode("utf-8")   # abstract namespace
    if name.startswith("/"):
        return name
    return None   # unset, empty, or a transport we do not speak (e.g. vsock:)


def notify(state: str, *, env: Mapping[str, str]) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=serving") to systemd.

    True when the datagram was sent; False when $NOTIFY_SOCKET is unset (not run by
    systemd, or by a unit that is not Type=notify) or the send failed. Never raises for
    a socket problem: a daemon must not die because its supervisor went away.
    """
    address = _address(env)
    if address is None or not state:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def ready(*, env: Mapping[str, str], status_text: str | None = None) -> bool:
    """Tell systemd the service is up (READY=1), optionally with a status line."""
    state = "READY=1"
    if status_text:
        state += f"\nSTATUS={_one_line(status_text)}"
    return notify(state, env=env)


def stopping(*, env: Mapping[str, str]) -> bool:
    """Tell systemd the service is shutting down (STOPPING=1)."""
    return notify("STOPPING=1", env=env)


def status(text: str, *, env: Mapping[str, str]) -> bool:
    """Set the one-line status `systemctl status` shows (newlines become spaces)."""
    return notify(f"STATUS={_one_line(text)}", env=env)


def watchdog_interval(env: Mapping[str, str], *, pid: int | None = None) -> float | None:
    """The watchdog timeout in seconds that systemd expects pings within, or None.

    None when WATCHDOG_USEC is unset, not a positive integer, or when WATCHDOG_PID is
    set and names another process (`pid`, default: this one) - the variables were then
    meant for a parent and merely inherited.
    """
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1_000_000


class Heartbeat:
    """Healthy while `beat()` was called within the last `max_age_s` seconds.

    Pass the instance itself as `Watchdog`'s `healthy` callback; call `beat()` from the
    loop whose progress matters. A new heartbeat counts as having just beaten.
    """

    def __init__(self, max_age_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, not {max_age_s}")
        self.max_age_s = max_age_s
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        """Record progress now."""
        self._last = self._clock()

    def age(self) -> float:
        """Seconds since the last beat."""
        return self._clock() - self._last

    def __call__(self) -> bool:
        return self.age() <= self.max_age_s


class Watchdog:
    """Sends WATCHDOG=1 every `interval / 2` seconds while `healthy()` returns True.

    `interval` defaults to `watchdog_interval(env)`; when that is None (no watchdog
    configured, or not for this process) `start()` does nothing and `enabled` is False.
    When `healthy()` returns False - or raises - that round's ping is skipped; if the
    main loop stays stuck, systemd's timeout expires and it restarts the service
    (`Restart=on-failure`). The first ping goes out at `start()`.
    """

    def __init__(self, healthy: Callable[[], bool], *, env: Mapping[str, str],
                 interval: float | None = None) -> None:
        self._healthy = healthy
        self._env = dict(env)
        self.interval = watchdog_interval(env) if interval is None else interval
        if self.interval is not None and self.interval <= 0:
            raise ValueError(f"interval must be positive, not {self.interval}")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.pings = 0
        """WATCHDOG=1 datagrams sent so far."""
        self.skipped = 0
        """Rounds in which healthy() was not true, so nothing was sent."""

    @property
    def enabled(self) -> bool:
        """True when there is a watchdog to feed."""
        return self.interval is not None and _address(self._env) is not None

    @property
    def running(self) -> bool:
        """True while the feeding thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start feeding in a daemon thread (no-op when disabled or already running)."""
        if not self.enabled or self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop feeding and wait for the thread (at most `timeout` seconds)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        assert self.interval is not None
        period = self.interval / 2
        while True:
            self._tick()
            if self._stop.wait(period):
                return

    def _tick(self) -> None:
        try:
            ok = bool(self._healthy())
        except Exception:
            ok = False
        if ok and notify("WATCHDOG=1", env=self._env):
            self.pings += 1
        elif not ok:
            self.skipped += 1
