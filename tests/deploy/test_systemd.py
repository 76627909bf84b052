"""waystation.systemd against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import itertools
import os
import socket
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_until
from waystation import systemd
from waystation.systemd import Heartbeat, Watchdog


class FakeSystemd:
    """Receives sd_notify datagrams on a bound socket, like PID 1 does."""

    def __init__(self, address: str | bytes, env_value: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.env = {"NOTIFY_SOCKET": env_value}
        self.lock = threading.Lock()
        self.received: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.received.append(data.decode())

    def messages(self) -> list[str]:
        """Every datagram so far, in order."""
        with self.lock:
            return list(self.received)

    def pings(self) -> int:
        """WATCHDOG=1 datagrams received so far."""
        return self.messages().count("WATCHDOG=1")

    def close(self) -> None:
        """Stop receiving and close the socket."""
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def fake_systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    """A notify socket bound to a path in tmp_path."""
    path = str(tmp_path / "notify.sock")
    fake = FakeSystemd(path, path)
    yield fake
    fake.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    """A notify socket in the abstract namespace (NOTIFY_SOCKET=@name)."""
    name = f"waystation-test-{os.getpid()}-{uuid.uuid4().hex}"
    fake = FakeSystemd(b"\0" + name.encode(), "@" + name)
    yield fake
    fake.close()


def test_ready_is_received(fake_systemd: FakeSystemd) -> None:
    """ready() delivers READY=1 to the socket named by NOTIFY_SOCKET."""
    assert systemd.ready(env=fake_systemd.env)
    assert wait_until(lambda: fake_systemd.messages() == ["READY=1"])


def test_ready_on_an_abstract_socket(abstract_systemd: FakeSystemd) -> None:
    """A NOTIFY_SOCKET starting with '@' is reached in the abstract namespace."""
    assert systemd.ready(env=abstract_systemd.env, status_text="serving 3 devices")
    assert wait_until(
        lambda: abstract_systemd.messages() == ["READY=1\nSTATUS=serving 3 devices"])


def test_status_and_stopping(fake_systemd: FakeSystemd) -> None:
    """status() sends one STATUS line (newlines flattened); stopping() sends STOPPING=1."""
    assert systemd.status("syncing\n42 pending", env=fake_systemd.env)
    assert systemd.stopping(env=fake_systemd.env)
    assert wait_until(lambda: len(fake_systemd.messages()) == 2)
    assert fake_systemd.messages() == ["STATUS=syncing 42 pending", "STOPPING=1"]


def test_no_notify_socket_is_a_no_op() -> None:
    """Without NOTIFY_SOCKET (not under systemd) every call returns False and sends nothing."""
    assert systemd.notify("READY=1", env={}) is False
    assert systemd.ready(env={}) is False
    assert systemd.stopping(env={"NOTIFY_SOCKET": ""}) is False
    assert systemd.status("x", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    dog = Watchdog(lambda: True, env={"WATCHDOG_USEC": "1000000"})
    assert not dog.enabled
    dog.start()
    assert not dog.running
    dog.stop()


def test_unreachable_socket_returns_false(tmp_path: Path) -> None:
    """A NOTIFY_SOCKET nobody listens on makes notify() return False, not raise."""
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """WATCHDOG_USEC becomes seconds, unless unset, invalid, or meant for another PID."""
    assert systemd.watchdog_interval(env) == expected


def test_watchdog_pings_at_about_half_the_interval(fake_systemd: FakeSystemd) -> None:
    """With a 0.2 s watchdog, a round comes every 0.1 s: never sooner (no busy loop, no
    double ping), and typically well before the 0.2 s interval (not once per interval).

    The times are taken in the watchdog's own thread (healthy() runs right before each
    ping), so a loaded machine can only make gaps longer, never shorter: the lower bound
    holds exactly and the median tolerates stalls of a few rounds.
    """
    env = {**fake_systemd.env, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    rounds: list[float] = []

    def healthy() -> bool:
        rounds.append(time.monotonic())
        return True

    dog = Watchdog(healthy, env=env)
    assert dog.enabled and dog.interval == pytest.approx(0.2)
    with dog:
        assert wait_until(lambda: fake_systemd.pings() >= 1, timeout=2)   # one at start()
        assert wait_until(lambda: dog.pings >= 21, timeout=30)
    assert not dog.running
    assert wait_until(lambda: fake_systemd.pings() == dog.pings)   # every ping arrived
    assert len(rounds) == dog.pings and dog.skipped == 0
    gaps = [b - a for a, b in itertools.pairwise(rounds)]
    # Event.wait(0.1) never returns early; 5 ms covers clock granularity only.
    assert min(gaps) >= 0.095, gaps
    # Pinging once per interval would put every gap at >= 0.2 s.
    assert statistics.median(gaps) < 0.17, gaps


def test_watchdog_stops_feeding_while_unhealthy(fake_systemd: FakeSystemd) -> None:
    """Pings stop while healthy() is False and resume when it is True again."""
    healthy = threading.Event()
    healthy.set()
    dog = Watchdog(healthy.is_set, env=fake_systemd.env, interval=0.1)
    with dog:
        assert wait_until(lambda: fake_systemd.pings() >= 3)
        healthy.clear()
        assert wait_until(lambda: dog.skipped >= 1)
        sent = dog.pings
        assert wait_until(lambda: dog.skipped >= 6)       # ~0.5 s of unhealthy rounds
        assert dog.pings == sent
        assert wait_until(lambda: fake_systemd.pings() == sent)   # all arrived, none more
        healthy.set()
        assert wait_until(lambda: fake_systemd.pings() >= sent + 3)


def test_watchdog_treats_a_failing_check_as_unhealthy(fake_systemd: FakeSystemd) -> None:
    """A healthy() that raises skips the ping instead of killing the watchdog thread."""
    def broken() -> bool:
        raise RuntimeError("store unreachable")

    with Watchdog(broken, env=fake_systemd.env, interval=0.05) as dog:
        assert wait_until(lambda: dog.skipped >= 4)
        assert dog.running
    assert fake_systemd.pings() == 0


def test_hung_main_loop_starves_the_watchdog(fake_systemd: FakeSystemd) -> None:
    """With a Heartbeat as healthy(), a loop that stops beating stops the pings."""
    beat = Heartbeat(max_age_s=0.15)
    stop_loop = threading.Event()

    def main_loop() -> None:
        while not stop_loop.wait(0.02):
            beat.beat()

    loop = threading.Thread(target=main_loop, daemon=True)
    loop.start()
    with Watchdog(beat, env=fake_systemd.env, interval=0.1) as dog:
        assert wait_until(lambda: fake_systemd.pings() >= 4)
        stop_loop.set()                                   # the loop "hangs"
        loop.join(5)
        assert wait_until(lambda: not beat())
        assert wait_until(lambda: dog.skipped >= 1)
        sent = dog.pings
        assert wait_until(lambda: dog.skipped >= 5)
        assert dog.pings == sent
        assert wait_until(lambda: fake_systemd.pings() == sent)


def test_heartbeat_age_with_a_fake_clock() -> None:
    """A Heartbeat is healthy until max_age_s passes without a beat."""
    now = [100.0]
    beat = Heartbeat(5.0, clock=lambda: now[0])
    assert beat()
    now[0] += 5.0
    assert beat()
    now[0] += 0.1
    assert not beat()
    beat.beat()
    assert beat() and beat.age() == 0.0
    with pytest.raises(ValueError):
        Heartbeat(0)
