"""Killing a real agent process at a chosen point: a crasher script (tests/agent/*_crasher.py)
does its work up to that point inside an LMDB write transaction, creates its `ready` file
and waits; the test kills it with SIGKILL there and reads what it printed before."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]


def kill_when_ready(script: str, data: Path, ready: Path) -> str:
    """Run tests/agent/`script` on store `data`; SIGKILL it once `ready` exists. Returns
    its stdout; asserts it died of the SIGKILL and never printed "committed"."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/agent" / script), str(data), str(ready)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_until(ready.exists, timeout=60)
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert "committed" not in out
    return out
