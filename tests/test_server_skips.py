"""CI turns a "server missing" skip into a failure (tests/conftest.py), checked with a
real pytest run in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.http.browserkit import INSTALL_HINT
from tests.pgserver import unavailable_reason
from tests.server_skips import is_browser_skip, is_server_skip

ROOT = Path(__file__).resolve().parent.parent


def test_server_skip_reasons_are_recognised() -> None:
    assert is_server_skip("the mosquitto binary is not installed (apt-get install mosquitto)")
    assert is_server_skip("PostgreSQL server binaries (initdb, postgres) not found")
    assert is_server_skip("RabbitMQ is not installed")
    assert not is_server_skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert is_browser_skip(f"chromium not found at /usr/bin/chromium: {INSTALL_HINT}")
    assert is_browser_skip(f"chromium tests need the playwright package: {INSTALL_HINT}")
    assert not is_browser_skip("RabbitMQ is not installed")
    assert not is_server_skip(f"chromium not found at /usr/bin/chromium: {INSTALL_HINT}")
    reason = unavailable_reason()
    assert reason is None or is_server_skip(reason)


def _run(tmp_path: Path, require: str | None,
         browser: str | None = None) -> subprocess.CompletedProcess[str]:
    test = tmp_path / "test_probe.py"
    test.write_text(
        "import pytest\n"
        "def test_needs_mosquitto():\n"
        "    pytest.skip('the mosquitto binary is not installed')\n"
        "def test_needs_kernel():\n"
        "    pytest.skip('this kernel has no PR_SET_MDWE')\n"
        "def test_needs_chromium():\n"
        "    pytest.skip('chromium not found at /usr/bin/chromium')\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("WAYSTATION_REQUIRE_SERVERS", "WAYSTATION_REQUIRE_BROWSER")}
    if require is not None:
        env["WAYSTATION_REQUIRE_SERVERS"] = require
    if browser is not None:
        env["WAYSTATION_REQUIRE_BROWSER"] = browser
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p",
                           "no:cacheprovider", "-p", "tests.server_skips",
                           "--rootdir", str(tmp_path), str(test)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_ci_fails_when_a_server_test_would_skip(tmp_path: Path) -> None:
    result = _run(tmp_path, "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 2 skipped" in result.stdout, result.stdout
    assert "WAYSTATION_REQUIRE_SERVERS" in result.stdout


def test_ci_fails_when_a_browser_test_would_skip(tmp_path: Path) -> None:
    result = _run(tmp_path, "1", "1")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 failed, 1 skipped" in result.stdout, result.stdout
    assert "WAYSTATION_REQUIRE_BROWSER is set" in result.stdout


def test_outside_ci_a_missing_server_skips(tmp_path: Path) -> None:
    result = _run(tmp_path, None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 skipped" in result.stdout, result.stdout
