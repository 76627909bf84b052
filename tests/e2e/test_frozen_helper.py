"""`tests.e2e.fault_pairs.frozen`: its body runs only once the process is stopped.

kill(SIGSTOP) returns as soon as the signal is queued: the kernel wakes one thread of
the process (the main one) to take the stop, and that thread stops the others only when
it gets a CPU. Another thread already running goes on meanwhile: an agent's sync
process committed an ack (20 changes off its outbox) after kill() had returned, so the
agent-frozen fault test read "150 pending" and, later in the same freeze, 130.

Here the main thread of the process frozen is made to wait for a CPU on purpose (a
SCHED_IDLE thread pinned behind a busy process), while its other thread runs on
another CPU: what a loaded host does by chance.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.e2e.fault_pairs import _thread_states, frozen
from tests.helpers import terminate, wait_until

_CHILD = """
import os, sys, threading
busy, spin_cpu = int(sys.argv[1]), int(sys.argv[2])
def spin():
    os.sched_setaffinity(0, {spin_cpu})   # this thread: a CPU of its own, running
    while True:
        pass
threading.Thread(target=spin, daemon=True).start()
os.sched_setaffinity(0, {busy})      # the main thread (it takes the stop): on the
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))   # hog's CPU, behind it
print("ready", flush=True)
threading.Event().wait()
"""

_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


@pytest.mark.skipif(len(_CPUS) < 2, reason="needs two CPUs and Linux scheduling calls")
def test_frozen_body_runs_once_every_thread_is_stopped() -> None:
    busy, spin_cpu = _CPUS[:2]
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(busy), str(spin_cpu)],
                             stdout=subprocess.PIPE, text=True)
    try:
        os.sched_setaffinity(hog.pid, {busy})
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        wait_until(lambda: len(_thread_states([child.pid])) == 2, 10,
                   message="the child's spinning thread started")
        for _ in range(5):
            with frozen([child.pid]):
                states = _thread_states([child.pid])
                assert set(states.values()) == {"T"}, states
    finally:
        for proc in (child, hog):
            terminate(proc, 10)
