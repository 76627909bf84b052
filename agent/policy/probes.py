"""Probes: thin adapters that ask the device "metered?" and "battery?".

A probe is a file to read, a command to run (its stdout is the answer), a fixed value,
or for the battery the Linux power-supply class (/sys/class/power_supply). Answers are
read by `agent.policy.answers`. Every probe is bounded (4 KiB of output, a timeout),
cached for `interval_s`, and never raises: a failing probe answers None (unknown) and
keeps the failure in `.problem` for the status.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from agent.policy.answers import BadAnswer, read_battery, read_metered
from agent.policy.decide import Battery

T = TypeVar("T")
MAX_ANSWER = 4096
POWER_SUPPLY = Path("/sys/class/power_supply")


def read_file(path: Path) -> str:
    with path.open("rb") as fh:
        return fh.read(MAX_ANSWER).decode("utf-8", "replace")


def run_command(argv: Sequence[str], timeout_s: float) -> str:
    """The command's stdout (at most 4 KiB, within `timeout_s`); OSError,
    TimeoutExpired or BadAnswer when it cannot run, takes too long or fails."""
    deadline = time.monotonic() + timeout_s
    with subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        out = b""
        try:
            fd = proc.stdout.fileno()
            while len(out) < MAX_ANSWER:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    raise subprocess.TimeoutExpired(list(argv), timeout_s)
                chunk = os.read(fd, MAX_ANSWER - len(out))
                if not chunk:
                    break
                out += chunk
            # More than 4 KiB is no answer of ours: stop reading, stop the command.
            code = (proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    if len(out) < MAX_ANSWER else -1)
        finally:
            with contextlib.suppress(OSError):
                proc.kill()
    if code == -1:
        raise BadAnswer(f"{argv[0]} printed more than {MAX_ANSWER} bytes")
    if code != 0:
        raise BadAnswer(f"{argv[0]} exited with status {code}")
    return out.decode("utf-8", "replace")


def sysfs_battery(root: Path = POWER_SUPPLY) -> Battery | None:
    """The first battery under `root` (Linux power_supply class): capacity and whether
    it charges (status Charging/Full, or a mains supply online). None: no battery."""
    if not root.is_dir():
        return None
    mains = False
    battery: tuple[float, str] | None = None
    for supply in sorted(root.iterdir()):
        with contextlib.suppress(OSError, ValueError):
            kind = read_file(supply / "type").strip()
            if kind == "Mains" and read_file(supply / "online").strip() == "1":
                mains = True
            elif kind == "Battery" and battery is None:
                battery = (float(read_file(supply / "capacity").strip()),
                           read_file(supply / "status").strip().lower())
    if battery is None:
        return None
    percent, status = battery
    return Battery(percent, mains or status in ("charging", "full"))


class Probe(Generic[T]):
    """One cached question; `ask()` answers from cache within `interval_s`."""

    def __init__(self, ask: Callable[[], T | None], interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ask = ask
        self._interval = interval_s
        self._clock = clock
        self._at: float | None = None
        self._value: T | None = None
        self.problem: str | None = None

    def ask(self) -> T | None:
        now = self._clock()
        if self._at is None or now - self._at >= self._interval:
            self._at = now
            try:
                self._value = self._ask()
                self.problem = None
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                self._value = None
                self.problem = str(exc)[:200]
        return self._value


def metered_probe(*, file: Path | None = None, command: Sequence[str] | None = None,
                  value: bool | None = None, timeout_s: float = 5.0,
                  interval_s: float = 30.0) -> Probe[bool]:
    def ask() -> bool | None:
        if value is not None:
            return value
        text = (read_file(file) if file is not None
                else run_command(command, timeout_s) if command else None)
        if text is None:
            return None
        answer = read_metered(text)
        if answer is None:
            raise BadAnswer(f"{text.strip()[:60]!r} is not yes/no (1/0, metered/unmetered)")
        return answer
    return Probe(ask, interval_s)


def battery_probe(*, file: Path | None = None, command: Sequence[str] | None = None,
                  sysfs: Path | None = POWER_SUPPLY, timeout_s: float = 5.0,
                  interval_s: float = 30.0) -> Probe[Battery]:
    def ask() -> Battery | None:
        if file is not None:
            return read_battery(read_file(file))
        if command:
            return read_battery(run_command(command, timeout_s))
        return sysfs_battery(sysfs) if sysfs is not None else None
    return Probe(ask, interval_s)


__all__ = ["MAX_ANSWER", "POWER_SUPPLY", "Probe", "battery_probe", "metered_probe",
           "read_file", "run_command", "sysfs_battery"]
