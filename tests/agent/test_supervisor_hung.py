"""SyncSupervisor and a sync process that does not run (stopped, stuck in a call): once
it has beaten, `hung_after_s` without a beat gets it killed and another started; one that
never beats (still starting, or not a beating child) is left alone."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from agent.service.child import BEAT_FD_ENV
from agent.service.supervisor import SyncSupervisor
from tests.helpers import wait_until

# Beats every 0.1 s on the service's pipe, and appends its pid to a file when it starts.
BEATING = ("import os, time\n"
           "with open({log!r}, 'a') as f: f.write(f'{{os.getpid()}}\\n')\n"
           "fd = int(os.environ[{env!r}])\n"
           "while True:\n"
           "    os.write(fd, b'.')\n"
           "    time.sleep(0.1)\n")


def _pids(log: Path) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def test_a_stopped_sync_process_is_killed_and_started_again(tmp_path: Path) -> None:
    log = tmp_path / "pids"
    sup = SyncSupervisor(None, {**os.environ}, initial_s=0.05, hung_after_s=2.0,
                         argv=[sys.executable, "-c",
                               BEATING.format(log=str(log), env=BEAT_FD_ENV)])
    sup.start()
    try:
        wait_until(lambda: _pids(log), 30, message="the first sync process started")
        first = _pids(log)[0]
        time.sleep(0.5)   # beating a while: the check is armed
        os.kill(first, signal.SIGSTOP)
        stopped = time.monotonic()
        wait_until(lambda: len(_pids(log)) > 1, 30, message="another sync process started")
        took = time.monotonic() - stopped
        assert 2.0 <= took < 10, took
        assert sup.restarts == 1 and sup.pid == _pids(log)[1]
        assert not Path(f"/proc/{first}").exists(), "the stopped process was not reaped"
        # The new one beats: it is left running, well past hung_after_s.
        time.sleep(3)
        assert sup.restarts == 1 and sup.running
    finally:
        sup.stop()
    assert not sup.alive


def test_a_sync_process_that_never_beats_is_left_alone(tmp_path: Path) -> None:
    sup = SyncSupervisor(None, {**os.environ}, hung_after_s=2.0,
                         argv=[sys.executable, "-c", "import time; time.sleep(60)"])
    sup.start()
    try:
        wait_until(lambda: sup.running, 30)
        time.sleep(3.5)
        assert sup.restarts == 0 and sup.running
    finally:
        sup.stop()
