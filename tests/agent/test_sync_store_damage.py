"""The sync process of `agent run` meeting store damage while it runs (the store was
sound when the service started; then an SD card's pages read back as zeros).

Before: every event it handled logged a traceback (`agent_event_failed`), or its loop
died with one and the service restarted it with backoff, for ever; the service ran on.
Now: ONE `store_damaged` event naming the file and what to do, the sync process exits 6,
is not restarted, and the service stops with exit 6 (systemd does not restart it).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.service.child import RESTARTED_ENV
from agent.service.supervisor import SyncSupervisor
from agent.store import ENV_DIRNAME
from schemas.collection import Catalog
from tests.agent.test_store_damage import PAGE, _build, _config, _overwrite
from tests.cli.procs import Proc, clean_env
from tests.helpers import wait_until
from waystation.cli.exitcodes import EXIT_DAMAGED


@pytest.fixture
def data_dir(catalog: Catalog) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="ws-"))  # short: the API's Unix socket path
    try:
        _build(root / "data", catalog)
        yield root / "data"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_sync_process_meeting_damage_logs_it_once_and_the_service_exits_6(
        data_dir: Path) -> None:
    data = data_dir / ENV_DIRNAME / "data.mdb"
    proc = Proc(data_dir, clean_env(), "agent", "agent", "run", "--config",
                str(_config(data_dir)))
    try:
        proc.wait_log("sync_started")
        # Every page but the two meta pages now reads as zeros.
        _overwrite(data, 2 * PAGE, bytes(data.stat().st_size - 2 * PAGE))
        code = proc.wait_exit(90)  # before: it ran on (and restarted its sync process)
    finally:
        proc.close()
    text = proc.text()
    assert code == EXIT_DAMAGED, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "agent_event_failed" not in text and "agent_loop_failed" not in text
    # Which process meets the damage first depends on timing: the sync process (one
    # `store_damaged` event, exit 6), the service itself (its status check), or LMDB's
    # assertion abort()ing the sync process inside a cursor walk (its restart walks the
    # store first and exits 6). Each way: said once, and never restarted after exit 6.
    events = [line for line in text.splitlines() if "store_damaged" in line
              and "sync_stopped_store_damaged" not in line]
    assert len(events) <= 1, text[-3000:]
    for event in events:
        assert str(data) in event and "deploy/README.md" in event
    starts = text.count("sync_process_started")
    aborted = "code=-6" in text and "mdb.c" in text
    assert starts == 1 or (starts == 2 and aborted), text[-3000:]
    assert "error: store damaged:" in text and str(data) in text


def test_sync_process_alone_exits_6_with_one_event(data_dir: Path) -> None:
    """The sync process itself (what the supervisor runs): one event, exit 6 — or, when
    LMDB meets a zeroed page inside a cursor walk, LMDB's own assertion abort()s it (no
    exception reaches Python: nothing can turn that into exit 6), and its next start,
    the supervisor's restart, walks the store and exits 6 with the one event."""
    data = data_dir / ENV_DIRNAME / "data.mdb"
    log_path = data_dir / "sync.log"
    with log_path.open("wb") as out:
        popen = subprocess.Popen([sys.executable, "-m", "agent.service.child",
                                  str(_config(data_dir))], stdout=out, stderr=subprocess.STDOUT,
                                 env=clean_env())
        try:
            wait_until(lambda: "sync_started" in log_path.read_text(), 60)
            _overwrite(data, 2 * PAGE, bytes(data.stat().st_size - 2 * PAGE))
            code = popen.wait(60)  # before: it ran on, a traceback per event
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait(10)
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    if code == -signal.SIGABRT:
        assert "Assertion" in text and "mdb.c" in text, text[-3000:]  # LMDB's, no other
        again = subprocess.run([sys.executable, "-m", "agent.service.child",
                                str(_config(data_dir))], capture_output=True, text=True,
                               env=clean_env({RESTARTED_ENV: "1"}), timeout=45, check=False)
        code, text = again.returncode, again.stdout + again.stderr
        assert "Traceback" not in text, text[-3000:]
    assert code == EXIT_DAMAGED, text[-3000:]
    events = [line for line in text.splitlines() if "store_damaged" in line]
    assert len(events) == 1, text[-3000:]
    assert str(data) in events[0] and "deploy/README.md" in events[0]


def test_supervisor_does_not_restart_a_sync_process_that_exited_6() -> None:
    """Exit 6 means the store is damaged: restarting cannot help (before: restarted with
    backoff for ever)."""
    sup = SyncSupervisor(None, clean_env(), initial_s=0.05,
                         argv=[sys.executable, "-c", "import sys; sys.exit(6)"])
    sup.start()
    try:
        wait_until(lambda: not sup.alive, 30)
    finally:
        sup.stop()
    assert sup.damaged and sup.restarts == 0


def test_a_restarted_sync_process_walks_the_store_first(data_dir: Path) -> None:
    """A sync process started again after the previous one died (LMDB abort()s on some
    damaged pages, no exception) walks the trees before it syncs: damage is found and
    said once, exit 6, instead of dying again at the same page after every restart."""
    data = data_dir / ENV_DIRNAME / "data.mdb"
    _overwrite(data, data.stat().st_size // PAGE // 2 * PAGE, bytes(PAGE))
    result = subprocess.run([sys.executable, "-m", "agent.service.child",
                             str(_config(data_dir))], capture_output=True, text=True,
                            env=clean_env({RESTARTED_ENV: "1"}), timeout=45, check=False)
    text = result.stdout + result.stderr
    assert result.returncode == EXIT_DAMAGED, text[-3000:]
    assert text.count("store_damaged") == 1 and "Traceback" not in text, text[-3000:]
