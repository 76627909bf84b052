"""Probes: files, commands and the Linux power_supply class, with wrong and hostile
answers (bounded output, timeouts, failing commands): never an exception, a problem."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.policy import Battery
from agent.policy.answers import BadAnswer, read_battery, read_metered
from agent.policy.probes import Probe, battery_probe, metered_probe, sysfs_battery


def test_answers() -> None:
    assert read_metered(" Metered\n") is True and read_metered("0") is False
    assert read_metered("maybe") is None
    assert read_battery("42 discharging") == Battery(42, False)
    assert read_battery("87% Charging\n") == Battery(87, True)
    assert read_battery("none") is None
    for bad in ("lots", "142", "-3 charging"):
        with pytest.raises(BadAnswer):
            read_battery(bad)


@given(st.text(max_size=200))
def test_any_text_is_an_answer_or_bad(text: str) -> None:
    """Whatever a probe prints is read or refused with BadAnswer, nothing else."""
    assert read_metered(text) in (True, False, None)
    with contextlib.suppress(BadAnswer):
        read_battery(text)


def test_file_probe(tmp_path: Path) -> None:
    f = tmp_path / "metered"
    f.write_text("yes\n")
    probe = metered_probe(file=f, interval_s=0.0)
    assert probe.ask() is True
    f.write_text("no")
    assert probe.ask() is False
    f.write_text("perhaps")
    assert probe.ask() is None and probe.problem is not None and "yes/no" in probe.problem
    f.unlink()
    assert probe.ask() is None and "No such file" in (probe.problem or "")


def test_command_probe(tmp_path: Path) -> None:
    script = tmp_path / "battery.sh"
    script.write_text("#!/bin/sh\necho 15 discharging\n")
    script.chmod(0o755)
    assert battery_probe(command=[str(script)]).ask() == Battery(15, False)
    failing = battery_probe(command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    assert failing.ask() is None and "status 3" in (failing.problem or "")
    missing = metered_probe(command=[str(tmp_path / "nope")])
    assert missing.ask() is None and missing.problem


def test_hostile_command_is_bounded() -> None:
    """A command that floods its output or hangs is cut off (4 KiB, the timeout)."""
    flood = metered_probe(command=[sys.executable, "-c",
                                   "import sys\nwhile True: sys.stdout.write('y'*65536)"],
                          timeout_s=2.0)
    start = time.monotonic()
    assert flood.ask() is None and "more than 4096" in (flood.problem or "")
    hang = metered_probe(command=[sys.executable, "-c", "import time; time.sleep(60)"],
                         timeout_s=0.5)
    assert hang.ask() is None and "timed out" in (hang.problem or "")
    assert time.monotonic() - start < 20


def test_probe_caches() -> None:
    calls = []
    now = [0.0]
    probe: Probe[bool] = Probe(lambda: calls.append(1) or True, 30.0, clock=lambda: now[0])
    assert probe.ask() and probe.ask() and len(calls) == 1
    now[0] = 31.0
    assert probe.ask() and len(calls) == 2


def _supply(root: Path, name: str, **files: str) -> None:
    (root / name).mkdir(parents=True)
    for key, value in files.items():
        (root / name / key).write_text(value + "\n")


def test_sysfs_battery(tmp_path: Path) -> None:
    """The power_supply class as Linux lays it out: a battery, mains on or off."""
    assert sysfs_battery(tmp_path / "absent") is None
    _supply(tmp_path, "AC", type="Mains", online="0")
    _supply(tmp_path, "BAT0", type="Battery", capacity="12", status="Discharging")
    assert sysfs_battery(tmp_path) == Battery(12, False)
    (tmp_path / "AC" / "online").write_text("1\n")
    assert sysfs_battery(tmp_path) == Battery(12, True)
    (tmp_path / "BAT0" / "capacity").write_text("garbage\n")
    assert sysfs_battery(tmp_path) is None  # unreadable battery: unknown, not an error
