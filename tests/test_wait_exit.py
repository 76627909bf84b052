"""tests.helpers.wait_exit: Popen.wait(timeout) woken by the exit itself (a pidfd)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.helpers import wait_exit


def test_returns_the_exit_code_as_soon_as_the_process_ends() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.3); "
                                                   "sys.exit(3)"])
    assert wait_exit(proc, 30) == 3
    assert proc.returncode == 3
    assert wait_exit(proc, 30) == 3   # already reaped: the same answer


def test_times_out_like_popen_wait_and_leaves_the_process_running() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            wait_exit(proc, 0.2)
        assert time.monotonic() - started >= 0.2
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)
