"""The `waystation` command and the agent's sync process skip the collector's walk over
every live object at exit (waystation/quickexit.py): ~0.1-0.2 s of CPU at each stop of
a daemon, each CLI run. Checked in a process of its own, after its atexit handlers ran,
as the interpreter would before finalizing."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import atexit, gc, sys
sys.argv = ["waystation", "--version"]
from waystation.cli import main
main({args})
atexit._run_exitfuncs()
print(gc.get_freeze_count())
"""


def _frozen_at_exit(args: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return int(out.split()[-1])


def test_the_command_line_entry_point_freezes_everything_at_exit() -> None:
    assert _frozen_at_exit("") > 10_000


def test_main_called_by_another_program_leaves_its_collector_alone() -> None:
    # tests/e2e/fleet.py's cli_here runs commands inside the test process like this
    assert _frozen_at_exit('["--version"]') == 0


def test_the_sync_process_entry_point_freezes_everything_at_exit() -> None:
    # `python -m agent.service.child`, told that its service is gone: it returns at once
    probe = """
import atexit, gc, os, runpy
os.environ["WAYSTATION_SERVICE_PID"] = str(os.getppid() + 1)
try:
    runpy.run_module("agent.service.child", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    assert exc.code == 0, exc.code
atexit._run_exitfuncs()
print(gc.get_freeze_count())
"""
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    assert int(out.split()[-1]) > 10_000
