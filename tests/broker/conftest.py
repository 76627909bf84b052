"""Fixtures of the broker-side tests: real broker subprocesses (see tests/fixtures_brokers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

# tests/broker has no __init__.py (a package named "broker" here would shadow the real
# one), so pytest does not put tests/ on sys.path for us: do it for the shared modules.
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from fixtures_brokers import (  # noqa: E402
    any_broker,
    embedded_broker,
    mosquitto_broker,
)

__all__ = ["any_broker", "embedded_broker", "mosquitto_broker"]
