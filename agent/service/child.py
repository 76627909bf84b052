"""The sync process: `python -m agent.service.child [CONFIG]`, started by the service.

Runs the AgentDaemon (MQTT sender and receiver) until SIGTERM. It dies with the service
(PR_SET_PDEATHSIG), holds `sync.lock` so two sync loops never share a store (a new one
waits for a dying one to let go), and exits non-zero when its engine loop stops turning,
so the service restarts it. Its main loop beats once a second on a pipe from the
service (BEAT_FD_ENV): a process that stops beating (stopped, stuck in a call) is killed
and restarted by the service (`agent.service.supervisor`). A damaged store is logged
once (`store_damaged`, naming the file and what to do) and ends it with exit 6, which
the service does not restart.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from pathlib import Path

import structlog

from agent.errors import StoreDamaged
from agent.service.lock import SYNC_LOCK, FileLock
from schemas.collection import load_catalog
from waystation.config import AgentConfig, load_config
from waystation.logs import configure_logging
from waystation.quickexit import skip_final_collections

log = structlog.get_logger("waystation.agent.sync")

EXIT_UNHEALTHY = 4
EXIT_LOCKED = 5
EXIT_DAMAGED = StoreDamaged.exit_code
"""The store is damaged: the service stops (exit 6) instead of restarting this process."""
RESTARTED_ENV = "WAYSTATION_SYNC_RESTARTED"
BEAT_FD_ENV = "WAYSTATION_SYNC_BEAT_FD"
"""The write end of the service's liveness pipe (absent: run on its own, no beats)."""
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent stops us on shutdown
        pass


def main(argv: list[str]) -> int:
    _die_with_parent()
    parent = int(os.environ.get("WAYSTATION_SERVICE_PID", "0"))
    if parent and os.getppid() != parent:
        return 0  # the service died before we got here
    env = dict(os.environ)
    cfg = load_config(AgentConfig, Path(argv[0]) if argv and argv[0] else None, env)
    configure_logging(cfg.log)
    lock = FileLock(Path(cfg.data_dir) / SYNC_LOCK)
    if not lock.acquire(wait_s=30.0):
        log.error("sync_lock_held", path=str(lock.path))
        return EXIT_LOCKED
    from agent.daemon import AgentDaemon

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        daemon = AgentDaemon(cfg, load_catalog(cfg.schema_path()), env=env)
        if os.environ.get(RESTARTED_ENV):
            # Started again after the previous sync process died: LMDB kills a process
            # with abort() on some damaged pages (no exception): walk the trees first.
            daemon.agent.store.verify()
    except StoreDamaged as exc:
        log.error("store_damaged", dev=cfg.device_id, file=exc.path, error=str(exc))
        lock.release()
        return EXIT_DAMAGED
    daemon.start()
    log.info("sync_started", dev=daemon.dev, broker=f"{cfg.mqtt.host}:{cfg.mqtt.port}")
    beat_fd = int(os.environ.get(BEAT_FD_ENV) or -1)
    if beat_fd >= 0:
        try:
            os.set_blocking(beat_fd, False)
        except OSError:  # not open here (the variable came from elsewhere): no beats
            beat_fd = -1
    code = 0
    try:
        while True:
            _beat(beat_fd)
            if stopping.wait(1.0):
                break
            if daemon.damaged is not None:  # logged once by the daemon
                code = EXIT_DAMAGED
                break
            if not daemon.healthy:
                log.error("sync_loop_stuck", dev=daemon.dev)
                code = EXIT_UNHEALTHY
                break
    finally:
        daemon.stop()
        lock.release()
    return code


def _beat(fd: int) -> None:
    """One sign of life to the service; never blocks (a full pipe has beats enough)."""
    if fd < 0:
        return
    # (full: the service reads them all; gone: it takes this process with it)
    with contextlib.suppress(BlockingIOError, BrokenPipeError):
        os.write(fd, b".")


if __name__ == "__main__":
    skip_final_collections()   # the sync process's entry point (waystation/quickexit.py)
    sys.exit(main(sys.argv[1:]))
