"""Real `waystation` processes for the CLI tests: started in a directory of their own with
a clean environment, their output in files, waited on with deadlines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.helpers import terminate, wait_until

__all__ = ["Proc", "clean_env", "run_cli", "waystation_argv"]


def waystation_argv(*args: str) -> list[str]:
    """The installed `waystation` command (next to this interpreter) with `args`."""
    script = Path(sys.executable).with_name("waystation")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "waystation", *args]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without WAYSTATION_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(cwd: Path, env: Mapping[str, str], *args: str, stdin: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run one short `waystation` command to completion."""
    return subprocess.run(waystation_argv(*args), cwd=cwd, env=dict(env), input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


def run_json(cwd: Path, env: Mapping[str, str], *args: str) -> Any:
    """Run a `--json` command; its stdout must be one JSON document."""
    result = run_cli(cwd, env, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class Proc:
    """A long-running `waystation` process (a daemon), stdout and stderr in one file."""

    def __init__(self, cwd: Path, env: Mapping[str, str], name: str, *args: str) -> None:
        self.log_path = cwd / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(waystation_argv(*args), cwd=cwd, env=dict(env),
                                      stdout=self._log, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_log(self, needle: str, timeout: float = 60) -> None:
        wait_until(lambda: needle in self.text() or self.popen.poll() is not None, timeout,
                   message=lambda: f"{needle!r} in the log:\n{self.text()[-3000:]}")
        assert needle in self.text(), f"exited {self.popen.returncode}:\n{self.text()[-3000:]}"

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n"
                                 f"{self.text()[-3000:]}") from None

    def close(self) -> None:
        terminate(self.popen, 20)
        self._log.close()
