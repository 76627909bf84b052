"""SyncSupervisor.stop: SIGTERM to the sync process, reaped as soon as it ends; killed
when it ignores SIGTERM past grace_s."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from agent.service.supervisor import SyncSupervisor
from tests.helpers import wait_until

# Prints "ready" once its SIGTERM disposition is set, then sleeps.
CHILD = ("import signal, sys, time\n"
         "{setup}\n"
         "print('ready', flush=True)\n"
         "time.sleep(60)\n")


def _started(setup: str, tmp_log: str, grace_s: float) -> SyncSupervisor:
    code = CHILD.format(setup=setup)
    sup = SyncSupervisor(None, {**os.environ}, grace_s=grace_s,
                         argv=[sys.executable, "-c",
                               f"import sys; sys.stdout = open({tmp_log!r}, 'w'); "
                               f"exec({code!r})"])
    sup.start()
    log = Path(tmp_log)
    wait_until(lambda: log.exists() and "ready" in log.read_text(), 30)
    return sup


def test_stop_reaps_a_sync_process_that_ends_on_sigterm(tmp_path: object) -> None:
    sup = _started("", f"{tmp_path}/log", grace_s=15)
    proc = sup._proc
    assert proc is not None
    sup.stop()
    assert proc.returncode == -15 and not sup.alive


def test_stop_kills_a_sync_process_that_ignores_sigterm(tmp_path: object) -> None:
    sup = _started("signal.signal(signal.SIGTERM, signal.SIG_IGN)", f"{tmp_path}/log",
                   grace_s=0.5)
    proc = sup._proc
    assert proc is not None
    started = time.monotonic()
    sup.stop()
    assert proc.returncode == -9 and not sup.alive
    assert time.monotonic() - started >= 0.5
