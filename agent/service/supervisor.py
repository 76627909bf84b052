"""Keeps the sync process running: start it, restart it with backoff when it exits.

The delay before a restart doubles from `initial_s` up to `max_s` and goes back to the
start once a run lasted `stable_s`. `stop()` asks the process to finish (SIGTERM, a
clean MQTT goodbye) and kills it if it does not within `grace_s`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from agent.service.child import EXIT_DAMAGED, RESTARTED_ENV

log = structlog.get_logger("waystation.agent.service")


class SyncSupervisor:
    def __init__(self, config_path: Path | None, env: Mapping[str, str], *,
                 initial_s: float = 0.5, max_s: float = 30.0, stable_s: float = 60.0,
                 grace_s: float = 15.0, argv: Sequence[str] | None = None) -> None:
        self._argv = list(argv) if argv is not None else [
            sys.executable, "-m", "agent.service.child",
            str(config_path) if config_path is not None else ""]
        self._env = {**env, "WAYSTATION_SERVICE_PID": str(os.getpid())}
        self._initial_s, self._max_s, self._stable_s = initial_s, max_s, stable_s
        self._grace_s = grace_s
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
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._proc = subprocess.Popen(self._argv, env=self._env,
                                                  stdin=subprocess.DEVNULL)
                except OSError as exc:
                    log.error("sync_start_failed", error=str(exc))
                    self._proc = None
            if self._proc is not None:
                log.info("sync_process_started", pid=self._proc.pid)
                code = self._proc.wait()
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
