"""pytest plugin: coverage in the pytest-xdist workers, not in the process that hands them tests.

scripts/test.sh runs the suite under coverage with `WAYSTATION_COVERAGE_WORKERS` set to
the coverage configuration file instead of `coverage run`. The controller only collects
and prints reports, and everything a traced interpreter runs, measured or not, is about
2.5 times slower on Python 3.11; it would compete for the same 2 cores as the workers.
So the controller runs untraced, and hands `COVERAGE_PROCESS_START` to the workers it
starts: coverage's .pth file then measures each worker from its first line, and
`patch = ["subprocess"]` carries the measurement on to every Python process a test
starts. Without xdist (`-n 0`) the tests run in this process, so scripts/test.sh uses
`coverage run` then and leaves the variable unset.

tests/conftest.py loads this plugin for the whole suite; without the variable it is inert.
"""

from __future__ import annotations

import os

import pytest

VARIABLE = "WAYSTATION_COVERAGE_WORKERS"


def pytest_configure(config: pytest.Config) -> None:
    # Runs in the controller before pytest-xdist starts the workers (pytest_sessionstart),
    # so they inherit the variable; in a worker it is already set.
    config_file = os.environ.get(VARIABLE)
    if config_file and not hasattr(config, "workerinput"):
        os.environ["COVERAGE_PROCESS_START"] = config_file
