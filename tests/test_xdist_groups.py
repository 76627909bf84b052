"""tests/xdist_groups.py with real pytest-xdist workers: every test carrying a grouped mark
runs on one worker, whatever the order (regression: the marks once came after xdist read
them, and pytest 9.2 dropped xdist's node-id suffix, so the group was split)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["pytester"]

GROUPED = """
import os
import pytest

pytestmark = pytest.mark.rabbitmq

@pytest.mark.parametrize("i", range(8))
def test_grouped(i, tmp_path_factory):
    # the worker's basetemp is BASE/popen-gwN: the record goes to BASE
    out = tmp_path_factory.getbasetemp().parent / f"grouped-{i}"
    out.write_text(os.environ["PYTEST_XDIST_WORKER"])
"""

PLAIN = """
import pytest

@pytest.mark.parametrize("i", range(8))
def test_plain(i):
    pass
"""


def test_a_group_runs_on_one_worker(pytester: pytest.Pytester,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight grouped tests between sixteen plain ones, two workers: the grouped ones carry
    the "@rabbitmq" node-id suffix xdist's scheduler groups by, and all ran on one worker."""
    pytester.makepyfile(test_a_plain=PLAIN, test_b_grouped=GROUPED, test_c_plain=PLAIN)
    pytester.makeini("[pytest]\nmarkers =\n  rabbitmq: grouped\n")
    env_path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", env_path)  # the subprocess imports tests.xdist_groups
    result = pytester.runpytest_subprocess(
        "-p", "tests.xdist_groups", "-n", "2", "--dist", "loadgroup", "-v",
        "--basetemp", str(pytester.path / "base"))
    result.assert_outcomes(passed=24)
    grouped = [line for line in result.outlines if "test_grouped" in line and "PASSED" in line]
    assert len(grouped) == 8 and all("@rabbitmq" in line for line in grouped), grouped
    ran_on = [p.read_text() for p in (pytester.path / "base").glob("grouped-*")]
    assert len(ran_on) == 8 and len(set(ran_on)) == 1, ran_on
