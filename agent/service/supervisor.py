"""Keeps the sync process running: start it, restart it with backoff when it exits.

The delay before a restart doubles from `initial_s` up to `max_s` and goes back to the
start once a run lasted `stable_s`. `stop()` asks the process to finish (SIGTERM, a
clean MQTT goodbye) and kills it if it does not within `grace_s`.

A process that does not run at all is killed too, and restarted: its main loop beats once
a second on a pipe (`child.BEAT_FD_ENV`); once it has beaten, `hung_after_s` without a
beat means it is stopped (SIGSTOP, a debugger) or stuck in a call (a stalled disk). Its
own check (`sync_loop_stuck`) needs it to run; the service's watchdog for systemd sees
only the service, which stays alive and healthy beside a hung sync process: without
this, nothing synced until a person restarted the service.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from agent.service.child import BEAT_FD_ENV, EXIT_DAMAGED, RESTARTED_ENV

log = structlog.get_logger("waystation.agent.service")


_OVERSLEPT_S = 5.0
"""A one-second wait for a beat that lasted this long: the service was not running."""


class SyncSupervisor:
    def __init__(self, config_path: Path | None, env: Mapping[str, str], *,
                 initial_s: float = 0.5, max_s: float = 30.0, stable_s: float = 60.0,
                 grace_s: float = 15.0, hung_after_s: float = 60.0,
                 argv: Sequence[str] | None = None) -> None:
        self._argv = list(argv) if argv is not None else [
            sys.executable, "-m", "agent.service.child",
            str(config_path) if config_path is not None else ""]
        self._env = {**env, "WAYSTATION_SERVICE_PID": str(os.getpid())}
        self._initial_s, self._max_s, self._stable_s = initial_s, max_s, stable_s
        self._grace_s = grace_s
        self._hung_after_s = hung_after_s
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.restarts = 0
        self.damaged = False
        """The sync process found the store damaged (exit 6): it is not restarted."""

    @property
    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def alive(self) -> bool:
        """The supervising thread runs (it restarts the sync process)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sync-supervisor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = self._initial_s
        while not self._stopping.is_set():
            started = time.monotonic()
            beats, beat_w = os.pipe()
            with self._lock:
                if self._stopping.is_set():
                    os.close(beats)
                    os.close(beat_w)
                    return
                try:
                    self._proc = subprocess.Popen(
                        self._argv, env={**self._env, BEAT_FD_ENV: str(beat_w)},
                        stdin=subprocess.DEVNULL, pass_fds=(beat_w,))
                except OSError as exc:
                    log.error("sync_start_failed", error=str(exc))
                    self._proc = None
                finally:
                    os.close(beat_w)  # the child's now: its end closes when it exits
            if self._proc is None:
                os.close(beats)
            else:
                log.info("sync_process_started", pid=self._proc.pid)
                try:
                    code = self._watch(self._proc, beats)
                finally:
                    os.close(beats)
                if self._stopping.is_set():
                    return
                if code == EXIT_DAMAGED:
                    # Restarting cannot repair a damaged file: stop, and let the service
                    # stop too (exit 6, not restarted by systemd).
                    log.error("sync_stopped_store_damaged", pid=self._proc.pid, code=code)
                    self.damaged = True
                    return
                log.warning("sync_process_exited", pid=self._proc.pid, code=code,
                            restart_in_s=delay)
            if time.monotonic() - started >= self._stable_s:
                delay = self._initial_s
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self._env[RESTARTED_ENV] = str(self.restarts)
            delay = min(self._max_s, delay * 2)

    def _watch(self, proc: subprocess.Popen[bytes], beats: int) -> int:
        """Wait for `proc` to end, killing it once it has beaten and then stays silent
        for `hung_after_s`; its exit code. The pipe's end of file (the process gone)
        wakes this at once, so a stop reaps it the moment it exits."""
        last: float | None = None  # no beat yet: still starting, or a child that never beats
        looked = time.monotonic()
        while True:
            ready, _, _ = select.select([beats], [], [], 1.0)
            now = time.monotonic()
            if now - looked > _OVERSLEPT_S and last is not None:
                # This process did not run either (the whole agent stopped, then
                # continued): the sync process gets a whole new wait to beat again.
                last = now
            looked = now
            if ready:
                if not os.read(beats, 4096):
                    return proc.wait()
                last = now
            elif proc.poll() is not None:
                return proc.returncode
            silent = 0.0 if last is None else now - last
            if silent > self._hung_after_s and not self._stopping.is_set():
                log.error("sync_process_hung", pid=proc.pid, silent_s=round(silent, 1),
                          action="killed and started again",
                          hint="stopped (SIGSTOP, a debugger) or stuck in a call: a "
                               "stalled disk shows in the kernel log (dmesg)")
                proc.kill()
                return proc.wait()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            # The supervising thread's blocking wait() reaps the process the moment it
            # ends, and the thread then returns (stopping is set): joining it ends this
            # wait at once. (Popen.wait with a timeout polls, in sleeps of up to 50 ms.)
            if self._thread is not None:
                self._thread.join(self._grace_s)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        if self._thread is not None:
            self._thread.join(10)


__all__ = ["SyncSupervisor"]
